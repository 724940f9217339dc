"""The activation cache: round trip against a direct forward pass, checksums, resume, import, statistics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_coding import models
from sparse_coding.cache import build, store
from sparse_coding.config.plan import resolve
from sparse_coding.corpus import build_contexts
from sparse_coding.errors import ConfigError, DataError, StorageError
from tinymodels import forward_hidden, gpt2_cfg, make_tiny_gpt2, run_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


def all_files(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): store.sha256_file(p) for p in sorted(d.rglob("*"))
            if p.is_file() and p.name not in ("verified.json",)}


@pytest.fixture(scope="module")
def gpt2_cache(tiny_gpt2, tmp_path_factory):
    cfg = gpt2_cfg(tiny_gpt2, tmp_path_factory.mktemp("cache"))
    return cfg, build.ensure_cache(cfg, shard_rows=64)


def test_round_trip_equals_direct_forward_pass(tiny_gpt2, gpt2_cache):
    cfg, path = gpt2_cache
    m = store.read_manifest(path)
    assert m["layers"] == ["0", "1", "2"] and m["d"] == 32 and m["n_rows"] == 300 and m["dtype"] == "float32"
    assert m["model"]["name"] == "gpt2" and m["corpus"]["name"] == "kjv" and m["corpus"]["rows_per_context"] == 16
    assert m["rows_per_shard"] == 64 and [s["rows"] for s in m["shards"]["1"]] == [64, 64, 64, 64, 44]
    # token ids: the tokenizer applied to the corpus independently of the cache
    model, tok, _ = models.load_model(cfg.model)
    tokens = np.load(path / "tokens.npy")
    first = tok("In the beginning God created the heaven and the earth.", add_special_tokens=False)["input_ids"]
    assert tokens.tolist()[: len(first)] == first
    ctx = tokens[: (300 // 16) * 16].reshape(-1, 16)
    hs = forward_hidden(model, ctx)
    for k in range(3):
        rows = np.concatenate([np.load(path / "layers" / str(k) / s["file"]) for s in m["shards"][str(k)]])
        assert rows.shape == (300, 32)
        np.testing.assert_allclose(rows[: ctx.size], hs[k].reshape(-1, 32), rtol=1e-5, atol=1e-5)
        # statistics: the mean row and mean squared norm over every row
        mean = np.load(path / "layers" / str(k) / "mean.npy")
        np.testing.assert_allclose(mean, rows.astype(np.float64).mean(0), rtol=1e-10, atol=1e-12)
        st = m["stats"][str(k)]
        assert st["mean_sq_norm"] == pytest.approx(float((rows.astype(np.float64) ** 2).sum(1).mean()), rel=1e-10)
        assert st["n_nonfinite"] == 0 and st["n_finite"] == 300
    assert store.verify(path)["files"] == 3 * 5 + 1


def test_finished_cache_is_not_rebuilt(tiny_gpt2, gpt2_cache, monkeypatch):
    cfg, path = gpt2_cache
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*.npy")}
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a finished cache loaded the model"))
    assert build.ensure_cache(cfg, shard_rows=64) == path
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*.npy")} == before


def test_interrupted_build_resumes_to_the_identical_cache(tiny_gpt2, gpt2_cache, tmp_path, monkeypatch):
    _, clean = gpt2_cache
    cfg = gpt2_cfg(tiny_gpt2, tmp_path)
    finish = store.ShardFile.finish

    def fail_at_the_third_shard(self):
        if self.path.name == "shard_00002.npy":
            raise RuntimeError("fault injection: stopped after 2 shards")
        return finish(self)

    with monkeypatch.context() as patched:
        patched.setattr(store.ShardFile, "finish", fail_at_the_third_shard)
        with pytest.raises(RuntimeError, match="fault injection"):
            build.ensure_cache(cfg, shard_rows=64)
    partial = next((tmp_path).glob("gpt2-*/hidden_states/*"))
    assert not (partial / "manifest.json").exists()
    assert sorted(p.name for p in (partial / "layers" / "0").glob("shard_*.npy")) == ["shard_00000.npy", "shard_00001.npy"]
    done_before = (partial / "layers" / "0" / "shard_00000.npy").stat().st_mtime_ns
    # a half-written shard left by a crash is a temporary file, never taken for a shard
    (partial / "layers" / "0" / ".shard_00002.npy.tmp-999").write_bytes(b"partial")
    path = build.ensure_cache(cfg, shard_rows=64)
    assert path == partial
    assert (partial / "layers" / "0" / "shard_00000.npy").stat().st_mtime_ns == done_before  # not recomputed
    got = {k: v for k, v in all_files(path).items() if ".tmp-" not in k}
    want = all_files(clean)
    m1, m2 = json.loads((path / "manifest.json").read_text()), json.loads((clean / "manifest.json").read_text())
    for m in (m1, m2):
        m.pop("build_seconds")
    assert m1 == m2
    got.pop("manifest.json"), want.pop("manifest.json")
    assert got == want


def test_real_subprocess_killed_mid_build_resumes(tiny_gpt2, gpt2_cache, tmp_path):
    """A real process dies (os._exit) right after its first shard; the rerun completes to the same bytes."""
    _, clean = gpt2_cache
    code = (
        "import os, sys; sys.path.insert(0, %r); from sparse_coding.cache import build, store; from tinymodels import run_cfg\n"
        "orig = store.ShardFile.finish\n"
        "def dying(self):\n    d = orig(self)\n    os._exit(9)\n"
        "store.ShardFile.finish = dying\n"
        "build.ensure_cache(run_cfg(['model=gpt2','model.path=%s','layer=all','corpus=kjv','corpus.context_len=16',"
        "'corpus.max_tokens=300','corpus.batch_size=4','cache_dir=%s']), shard_rows=64)\n"
    ) % (str(ROOT / "tests"), tiny_gpt2, tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    path = build.ensure_cache(gpt2_cfg(tiny_gpt2, tmp_path), shard_rows=64)
    got, want = all_files(path), all_files(clean)
    got.pop("manifest.json"), want.pop("manifest.json")
    assert got == want


def test_corruption_is_detected(gpt2_cache, tmp_path):
    import shutil

    _, clean = gpt2_cache
    path = tmp_path / "c"
    shutil.copytree(clean, path)
    shard = path / "layers" / "1" / "shard_00002.npy"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # one bit of one value
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard_00002\.npy: sha256 does not match"):
        store.verify(path)
    proc = subprocess.run([sys.executable, "-m", "sparse_coding.cache", "verify", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "shard_00002.npy" in proc.stderr
    shard.write_bytes(bytes(data[:-100]))  # truncated
    with pytest.raises(DataError, match=r"shard_00002\.npy: cannot be read as \.npy, truncated"):
        store.verify(path)
    shutil.copy(clean / "layers" / "1" / "shard_00002.npy", shard)
    store.verify(path)
    m = json.loads((path / "manifest.json").read_text())
    m["shards"]["1"][0]["rows"] = 63
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="shards of layer 1 hold 299 rows, the manifest says 300"):
        store.verify(path)
    m["shards"]["1"][0]["rows"] = 64
    m["d"] = 31
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"shard_00000\.npy: shape \(64, 32\) float32 does not match .*\(64, 31\)"):
        store.verify(path)
    (path / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest"):
        store.verify(path)


def test_layers_are_added_to_an_existing_cache(tiny_gpt2, gpt2_cache, tmp_path):
    _, clean = gpt2_cache
    one = build.ensure_cache(gpt2_cfg(tiny_gpt2, tmp_path, "layer=1"), shard_rows=64)
    assert store.read_manifest(one)["layers"] == ["1"]
    first = (one / "layers" / "1" / "shard_00000.npy").stat().st_mtime_ns
    path = build.ensure_cache(gpt2_cfg(tiny_gpt2, tmp_path, "layer=all"), shard_rows=64)
    assert path == one and store.read_manifest(path)["layers"] == ["0", "1", "2"]
    assert (one / "layers" / "1" / "shard_00000.npy").stat().st_mtime_ns == first
    got, want = all_files(path), all_files(clean)
    got.pop("manifest.json"), want.pop("manifest.json")
    assert got == want


def test_float16_cache_and_special_tokens(tmp_path):
    """MiniLM (real weights) on a few hundred wiki tokens: [CLS]/[SEP] excluded by default, kept on request."""
    cfg = run_cfg(["model=minilm", "layer=all", "corpus=wiki", "corpus.context_len=32", "corpus.max_tokens=300",
                   "cache_dtype=float16", f"cache_dir={tmp_path}"])
    path = build.ensure_cache(cfg)
    m = store.read_manifest(path)
    assert m["d"] == 384 and m["n_rows"] == 300 and m["dtype"] == "float16" and len(m["layers"]) == 7
    assert m["corpus"]["rows_per_context"] == 30 and m["corpus"]["keep_positions"] == list(range(1, 31))
    model, tok, _ = models.load_model(cfg.model)
    tokens = np.load(path / "tokens.npy")
    assert tok.cls_token_id not in tokens and tok.sep_token_id not in tokens
    body = tokens.reshape(10, 30)
    ids = np.concatenate([np.full((10, 1), tok.cls_token_id), body, np.full((10, 1), tok.sep_token_id)], axis=1)
    hs = forward_hidden(model, ids)
    for k in (0, 3, 6):
        rows = np.load(path / "layers" / str(k) / "shard_00000.npy")
        assert rows.dtype == np.float16
        np.testing.assert_allclose(rows.astype(np.float32), hs[k][:, 1:31].reshape(-1, 384), rtol=2e-3, atol=2e-3)
    keep = build.ensure_cache(run_cfg(["model=minilm", "layer=0", "corpus.context_len=32", "corpus.max_tokens=64",
                                       "corpus.keep_special_tokens=true", f"cache_dir={tmp_path}"]))
    t = np.load(keep / "tokens.npy")
    assert t[0] == tok.cls_token_id and t[31] == tok.sep_token_id and t[32] == tok.cls_token_id
    assert keep != path


def test_token_embeddings_cache(tiny_gpt2, tmp_path):
    cfg = run_cfg(["model=gpt2", f"model.path={tiny_gpt2}", "activation=token_embeddings", f"cache_dir={tmp_path}"])
    path = build.ensure_cache(cfg, shard_rows=100)
    m = store.read_manifest(path)
    model, _, _ = models.load_model(cfg.model)
    w = model.get_input_embeddings().weight.detach().numpy()
    assert m["kind"] == "token_embeddings" and m["layers"] == ["embeddings"] and m["n_rows"] == w.shape[0]
    rows = np.concatenate([np.load(path / "layers" / "embeddings" / s["file"]) for s in m["shards"]["embeddings"]])
    np.testing.assert_array_equal(rows, w)
    np.testing.assert_allclose(np.load(path / "layers" / "embeddings" / "mean.npy"), w.astype(np.float64).mean(0),
                               atol=1e-12)


def test_text_corpus_from_local_files(tiny_gpt2, tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("First paragraph about cats.\n\nSecond paragraph about the mat.\n" * 30)
    jsl = tmp_path / "b.jsonl"
    jsl.write_text("".join(json.dumps({"text": f"record {i} says the cat sat"}) + "\n" for i in range(40)))
    cfg = run_cfg(["model=gpt2", f"model.path={tiny_gpt2}", "layer=1", "corpus=text", f"corpus.files=[{txt},{jsl}]",
                   "corpus.context_len=8", "corpus.max_tokens=200", f"cache_dir={tmp_path / 'c'}"])
    path = build.ensure_cache(cfg)
    _, tok, _ = models.load_model(cfg.model)
    ctx = build_contexts(cfg.corpus, tok)
    np.testing.assert_array_equal(np.load(path / "tokens.npy"), ctx.row_token_ids())
    first = tok("First paragraph about cats.", add_special_tokens=False)["input_ids"]
    assert np.load(path / "tokens.npy").tolist()[: len(first)] == first


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_import_user_array(tmp_path, suffix):
    x = np.random.default_rng(0).standard_normal((1000, 12)).astype(np.float32)
    src = tmp_path / f"acts{suffix}"
    if suffix == ".npy":
        np.save(src, x)
    elif suffix == ".pt":
        torch.save(torch.from_numpy(x), src)
    else:
        from safetensors.numpy import save_file

        save_file({"acts": x}, str(src))
    out = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "sparse_coding.cache", "import", "--input", str(src), "--output",
                           str(out), "--shard-rows", "300"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    m = store.read_manifest(out)
    assert m["kind"] == "imported" and m["layers"] == ["data"] and [s["rows"] for s in m["shards"]["data"]] == [300, 300, 300, 100]
    rows = np.concatenate([np.load(out / "layers" / "data" / s["file"]) for s in m["shards"]["data"]])
    np.testing.assert_array_equal(rows, x)
    assert m["stats"]["data"]["mean_sq_norm"] == pytest.approx(float((x.astype(np.float64) ** 2).sum(1).mean()))
    assert store.verify(out)["files"] == 4


def test_import_rejects_bad_input(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="pickled data"):
        build.import_array(tmp_path / "obj.npy", tmp_path / "o1")
    np.save(tmp_path / "three.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(DataError, match=r"2-D \(n × d\)"):
        build.import_array(tmp_path / "three.npy", tmp_path / "o2")
    np.save(tmp_path / "ints.npy", np.zeros((4, 3), np.int64))
    with pytest.raises(DataError, match="floating-point"):
        build.import_array(tmp_path / "ints.npy", tmp_path / "o3")


def test_refuses_when_disk_is_too_small(tmp_path, monkeypatch, capsys):
    import collections
    import shutil

    x = np.zeros((1000, 64), np.float32)
    np.save(tmp_path / "x.npy", x)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 0, 10_000))
    with pytest.raises(StorageError, match="needs 250.0 KiB but only 9.8 KiB is free"):
        build.import_array(tmp_path / "x.npy", tmp_path / "out")
    assert "needs 250.0 KiB on disk" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_model_dtype_is_part_of_the_cache_identity(tiny_gpt2, gpt2_cache, tmp_path):
    """Issue 22 item 7: a float16 model's activations are not a float32 model's: their own folder and build
    record, and a cache given by data.path that another model.dtype made is refused."""
    from sparse_coding.data.cache_datamodule import CacheDataModule

    cfg32, path32 = gpt2_cache
    cfg16 = gpt2_cfg(tiny_gpt2, Path(cfg32.cache_dir), "model.dtype=float16", "layer=1")
    assert build.cache_dir_for(cfg16, "f" * 64, "c" * 64) != build.cache_dir_for(cfg32, "f" * 64, "c" * 64)
    path16 = build.ensure_cache(cfg16, shard_rows=64)
    assert path16 != path32 and path16.name.endswith("-float32-model_float16")
    m16, m32 = store.read_manifest(path16), store.read_manifest(path32)
    assert m16["build"]["model_dtype"] == "float16" and m32["build"]["model_dtype"] == "float32"
    assert m16["model"]["dtype"] == "float16"
    rows16 = np.load(path16 / "layers" / "1" / "shard_00000.npy")
    rows32 = np.load(path32 / "layers" / "1" / "shard_00000.npy")
    assert rows16.shape == rows32.shape and not np.array_equal(rows16, rows32)  # computed in float16
    for cfg, path, other in ((cfg32, path16, "float16"), (cfg16, path32, "float32")):
        run = run_cfg(["model=gpt2", f"model.path={tiny_gpt2}", "layer=1", f"data.path={path}",
                       f"model.dtype={cfg.model.dtype}"])
        with pytest.raises(ConfigError, match=f"computed with model.dtype={other}, the run asks for "
                                              f"model.dtype={cfg.model.dtype}"):
            CacheDataModule.from_config(run, resolve(run).data, path)
    # a cache recorded before model_dtype was (float32 by construction) is still this float32 cache
    legacy = {**m32, "build": {k: v for k, v in m32["build"].items() if k != "model_dtype"}}
    legacy["model"] = {k: v for k, v in m32["model"].items() if k != "dtype"}
    assert store.same_build(legacy, m32["build"]) and store.model_dtype_of(legacy) == "float32"
    assert not store.same_build(legacy, m16["build"])
