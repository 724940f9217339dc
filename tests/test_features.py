"""`sparse-coding-features RUN_DIR` (sparse_coding.features; docs/method.md §9): every feature's density and top-k
contexts checked against SparseDictionary.encode on the same rows, recovery of a sparse-linear generator's true
features against an independent count, the W&B table, the rows a run left out, and one-line errors. (The HTML:
tests/test_feature_report.py.)"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from sparse_coding.cache import store
from sparse_coding.cache.store import cache_blocks, split_blocks
from sparse_coding.data.cache_datamodule import CacheDataModule
from sparse_coding.data.synthetic_datamodule import FreshSyntheticDataModule, SyntheticDataModule
from sparse_coding.dictionary import SparseDictionary
from sparse_coding.features import CacheRows, FeatureStats, main, recovery, synthetic_rows, true_features, windows
from sparse_coding.solver import from_dense
from tests.helpers import ROOT, compose, train
from tests.wandb_records import records, summary


def features(run_dir, *args):
    main([str(run_dir), "--no-wandb", *args])
    return json.loads((run_dir / "features" / "features.json").read_text())


def error_line(capsys, run_dir, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([str(run_dir), "--no-wandb", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


# ---- synthetic sparse-linear data: the truth is known ----------------------------------------------------

SYNTHETIC = ["data=sparse_linear", "data.dim=8", "data.active=2", "data.fresh=false", "data.n=2048", "data.n_val=512",
             "data.seed=3", "convergence.max_samples=4096"]


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_run")
    train(out, SYNTHETIC)
    return out, compose(SYNTHETIC)


def test_recovered_true_features_match_an_independent_count(synthetic_run, capsys):
    out, cfg = synthetic_run
    report = features(out)
    printed = capsys.readouterr().out
    (entry,) = report["dictionaries"]
    rec = entry["recovery"]
    # independently: the generator's features are the unit columns of its first draw from data.seed (§7.1)
    f = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    f = (f / f.norm(dim=0, keepdim=True)).double().numpy()
    phi = SparseDictionary.load(out).phi.double().numpy()
    best = (f.T @ phi).max(axis=1)
    assert rec["true_features"] == 32 and rec["recovered"] == int((best > 0.9).sum())
    np.testing.assert_allclose(rec["max_cosine"], best, atol=1e-6)
    assert rec["max_cosine_quantiles"]["q50"] == pytest.approx(float(np.median(best)))
    assert sum(rec["max_cosine_histogram"]["counts"]) == 32
    # training found features a random dictionary of the same size does not
    random_phi = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    chance = recovery(torch.from_numpy(f), random_phi / random_phi.norm(dim=0))["recovered"]
    assert rec["recovered"] >= 8 > chance
    assert f"recovered {rec['recovered']} of 32 true features" in printed
    # the density is counted on the run's own training rows, regenerated from its config
    train_x = SyntheticDataModule.from_config(cfg).train_x
    alpha = SparseDictionary.load(out).encode(train_x)
    density = [x["density"] for x in entry["features"]]
    np.testing.assert_array_equal(density, ((alpha > 0).sum(0) / len(train_x)).numpy())
    assert report["rows_used"] == 2048 and (out / "features" / "density_histogram.png").stat().st_size > 0


def test_controls_have_no_true_features_and_fresh_rows_are_the_runs():
    cfg = compose(["data=gaussian", "data.dim=8"])
    feats, line = true_features(cfg)
    assert feats is None and "no true features" in line and "\n" not in line
    cfg = compose(["data=sparse_linear", "data.dim=8", "data.n=300", "data.n_val=100", "data.batch_size=64"])
    dm = FreshSyntheticDataModule.from_config(cfg)
    assert torch.equal(synthetic_rows(cfg, "train", 100), dm.in_sample_x)  # the first rows of epoch 0
    assert torch.equal(synthetic_rows(cfg, "heldout", None), dm.val_x)


# ---- a tiny model's cache: contexts -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_run(tiny_gpt2_cache, tmp_path_factory):
    tiny, path = tiny_gpt2_cache
    out = tmp_path_factory.mktemp("cache_run")
    train(out, ["model=gpt2", f"model.path={tiny}", "data=cache", f"data.path={path}", "layer=1", "dictionary.mult=2",
                "data.batch_size=128", "convergence.max_samples=4096", "data.val_fraction=0.2"])
    return out, tiny, path


def test_density_and_top_k_are_those_of_encode_on_the_training_rows(cache_run, capsys):
    out, tiny, path = cache_run
    report = features(out, "--top-k", "5", "--window", "3")
    (entry,) = report["dictionaries"]
    dm = CacheDataModule(path, "1", batch_size=128, val_fraction=0.2)
    m = store.read_manifest(path)
    assert split_blocks(cache_blocks([int(e["rows"]) for e in m["shards"]["1"]]), 0.2) == (dm.train_blocks, dm.val_blocks)
    raw = np.concatenate([np.load(f) for f in store.shard_paths(path, m, "1")])
    offsets = np.concatenate([[0], np.cumsum(dm.shard_rows)])
    rows = np.concatenate([np.arange(offsets[s] + lo, offsets[s] + hi) for s, lo, hi in dm.train_blocks])
    alpha = SparseDictionary.load(out).encode(torch.from_numpy(raw[rows])).numpy()
    assert report["rows_used"] == len(rows) == dm.train_rows and report["all_rows"]
    density = np.array([f["density"] for f in entry["features"]])
    np.testing.assert_array_equal(density, (alpha > 0).sum(0) / len(rows))
    assert entry["dead"] == int(((alpha > 0).sum(0) == 0).sum())
    position = {int(r): j for j, r in enumerate(rows)}
    tokens = np.load(path / "tokens.npy")
    from transformers import AutoTokenizer  # heavy: only here

    tok = AutoTokenizer.from_pretrained(str(tiny))
    checked = 0
    for i, f in enumerate(entry["features"]):
        values = [t["value"] for t in f["top"]]
        column = np.sort(alpha[:, i])[::-1]
        expected = column[: min(5, int((column > 0).sum()))]
        np.testing.assert_array_equal(np.float32(values), expected)  # sorted, and truly the largest
        for t in f["top"]:
            assert alpha[position[t["row"]], i] == np.float32(t["value"])  # the row's own coefficient
            assert t["token_id"] == int(tokens[t["row"]])  # the marked token is the cache's token at that row
            alone = tok.decode([t["token_id"]], clean_up_tokenization_spaces=False)
            assert t["token"] == (alone.lstrip() if alone.strip() else alone)
            assert f"«{t['token']}»" in t["text"]
            context = t["row"] // 16  # the window stays inside the row's 16-token context
            window = tokens[max(context * 16, t["row"] - 3):min(context * 16 + 16, t["row"] + 4)]
            decoded = tok.decode(window.tolist(), clean_up_tokenization_spaces=False).replace("\n", "↵")
            assert decoded == t["text"].replace("«", "").replace("»", "")
            checked += 1
    assert checked > 0
    html = (out / "features" / "features.html").read_text()
    assert "<script" not in html and 'src="http' not in html and "<link" not in html  # nothing runs or is fetched
    assert html.count("<mark>") >= checked


def test_max_rows_heldout_split_one_dictionary_and_the_wandb_table(cache_run, capsys, monkeypatch):
    out, _, path = cache_run
    monkeypatch.setenv("WANDB_MODE", "offline")  # never a login prompt
    main([str(out), "--max-rows", "300"])  # with the W&B table
    # finish() ends the W&B run; W&B's service, which writes the run file and outlives the run in this process (a
    # CLI process exits), is waited for before the file is read (seen once under load: the history record missing)
    import wandb

    wandb.teardown()
    report = json.loads((out / "features" / "features.json").read_text())
    assert report["rows_used"] == 300 and not report["all_rows"]
    assert "coded 300 train rows (of " in capsys.readouterr().out
    (file,) = (out / "features" / "wandb").glob("offline-run-*/run-*.wandb")
    logged = {tuple(item.nested_key): json.loads(item.value_json) for rec in records(file)
              if rec.WhichOneof("record_type") == "history" for item in rec.history.item}
    assert logged[("features/table", "nrows")] == 64 and logged[("features/density_histogram", "format")] == "png"
    assert summary(file)["job_type"] == "features"
    (table,) = file.parent.glob("files/media/table/features/table_*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"][:3] == ["dictionary", "feature", "density"] and len(content["data"]) == 64
    dm = CacheDataModule(path, "1", batch_size=128, val_fraction=0.2)
    label = SparseDictionary.load(out).label
    report = features(out, "--split", "heldout", "--dictionary", label)
    assert report["rows_used"] == dm.val_rows and [d["label"] for d in report["dictionaries"]] == [label]
    assert "no dictionary 'nope'" in error_line(capsys, out, "--dictionary", "nope")


def test_the_rows_a_run_left_out_are_left_out(tiny_gpt2_cache):
    """data.drop_positions and data.max_norm_ratio: the rows coded are those the run's data module trains on."""
    _, path = tiny_gpt2_cache
    dm = CacheDataModule(path, "1", batch_size=128, val_fraction=0.2, drop_positions=2, max_norm_ratio=1.1)
    stream = dm._stream(dm.train_blocks, dm._bad[0], False)
    want = np.concatenate([stream._read_block_rows(b)[1] for b in range(len(dm.train_blocks))])
    rows = CacheRows(path, store.read_manifest(path), "1", dm.train_blocks, 2, 1.1, dm.median_norm)
    got = np.concatenate([r for _, r in rows.chunks(None)])
    assert dm.norm_dropped > 0 and len(got) == dm.train_rows < sum(hi - lo for _, lo, hi in dm.train_blocks)
    np.testing.assert_array_equal(got, want)


# ---- pieces and errors ------------------------------------------------------------------------------------


def test_windows_stay_inside_their_context_and_the_top_k_merge_keeps_the_largest():
    tokens = np.arange(100, 140)
    ids, valid = windows(np.array([0, 15, 16, 39]), tokens, 16, 2)
    assert ids[:, 2].tolist() == [100, 115, 116, 139]
    assert valid.tolist() == [[False, False, True, True, True], [True, True, True, False, False],
                              [False, False, True, True, True], [True, True, True, False, False]]
    gen = torch.Generator().manual_seed(0)
    alpha = torch.rand(50, 6, generator=gen) * (torch.rand(50, 6, generator=gen) < 0.3)
    stats = FeatureStats(6, 3)
    for part in torch.arange(50).split(7):  # batches of 7 rows, row ids 1000 + i
        stats.update(from_dense(alpha[part], torch.zeros(len(part)), torch.zeros(len(part), dtype=torch.bool)),
                     1000 + part)
    top = alpha.topk(3, dim=0)
    assert torch.equal(stats.values, top.values.T)
    hit = stats.values > 0
    assert torch.equal(stats.row_ids[hit], (1000 + top.indices.T)[hit])
    assert torch.equal(stats.counts, (alpha > 0).sum(0))


def test_bad_inputs_are_one_line(tmp_path, capsys, synthetic_run):
    assert "does not exist" in error_line(capsys, tmp_path / "missing")
    assert "not a run directory" in error_line(capsys, tmp_path)
    (tmp_path / "checkpoints").mkdir()
    err = error_line(capsys, tmp_path)
    assert "unfinished run" in err and "ckpt_path=last" in err
    # a cache run whose cache is gone
    run_dir = tmp_path / "moved"
    shutil.copytree(synthetic_run[0], run_dir, ignore=shutil.ignore_patterns("features", "checkpoints"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["data"] = {"source": "cache", "cache_path": str(tmp_path / "gone"), "layer": "1"}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    full = json.loads((run_dir / "dictionary.json").read_text())
    full["config"]["data"]["name"] = "cache"
    (run_dir / "dictionary.json").write_text(json.dumps(full))
    assert "--cache DIR" in error_line(capsys, run_dir)
    # the entry point (python -m) on the whole path: exit 0, and Lightning never imported on its way
    code = ("import runpy, sys\nsys.argv = ['sparse-coding-features', sys.argv[1], '--no-wandb', '--max-rows', '100']\n"
            "try:\n    runpy.run_module('sparse_coding.features', run_name='__main__')\n"
            "finally:\n    print('lightning' if 'pytorch_lightning' in sys.modules else 'no lightning')")
    proc = subprocess.run([sys.executable, "-c", code, str(synthetic_run[0])], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "coded 100 train rows" in proc.stdout and proc.stdout.strip().endswith("no lightning")
