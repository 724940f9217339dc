"""Building caches (sparse_coding.cache.build): a model's hidden states against a direct forward pass, token
embeddings, imported arrays, the build identity (source, settings, model dtype), the device, and what an
interrupted or failed build leaves (a build killed mid-way resumes: tests/reliability/test_interrupts.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_coding import models
from sparse_coding.cache import build, store
from sparse_coding.config.checks import validate
from sparse_coding.config.plan import resolve
from sparse_coding.corpus import build_contexts
from sparse_coding.errors import ConfigError, DataError, StorageError
from tests.helpers import digests, import_cache, one_line
from tests.tinymodels import forward_hidden, gpt2_cfg, run_cfg


def all_files(d: Path) -> dict[str, str]:
    return digests(d, skip=("verified.json",))


def shards(path: Path, key: str) -> np.ndarray:
    m = store.read_manifest(path)
    return np.concatenate([np.load(path / "layers" / key / s["file"]) for s in m["shards"][key]])


def manifest_without_provenance(path: Path) -> dict:
    m = json.loads((path / "manifest.json").read_text())
    for key in ("build_seconds", "build_device"):
        m.pop(key)
    return m


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



def test_device_auto_runs_on_the_cpu_without_cuda(tiny_gpt2, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = gpt2_cfg(tiny_gpt2, tmp_path)
    assert cfg.model.device == "auto"  # the schema's default
    validate(cfg)
    assert models.resolve_device(cfg.model) == "cpu"
    path = build.ensure_cache(cfg, shard_rows=64)
    assert store.read_manifest(path)["build_device"] == "cpu"
    # the device is provenance, not identity: model.device=cpu names the same folder and finds it finished
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a finished cache loaded the model"))
    assert build.ensure_cache(gpt2_cfg(tiny_gpt2, tmp_path, "model.device=cpu"), shard_rows=64) == path


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_cache_matches_the_cpu_cache(tiny_gpt2, tmp_path):
    """The same tiny caches built on CUDA and on the CPU: same folder name, tokens and format; values within
    float32 rounding of the two devices' kernels; the device recorded as provenance only."""
    for extra, tol in (((), 1e-4), (("cache_dtype=float16",), 2e-3)):
        on_cpu = build.ensure_cache(gpt2_cfg(tiny_gpt2, tmp_path / "cpu", "model.device=cpu", *extra), shard_rows=64)
        on_gpu = build.ensure_cache(gpt2_cfg(tiny_gpt2, tmp_path / "gpu", "model.device=cuda", *extra), shard_rows=64)
        assert on_cpu.relative_to(tmp_path / "cpu") == on_gpu.relative_to(tmp_path / "gpu")
        mc, mg = store.read_manifest(on_cpu), store.read_manifest(on_gpu)
        assert mc["build_device"] == "cpu" and mg["build_device"].startswith("cuda")
        assert mc["build"] == mg["build"] and mc["layers"] == mg["layers"] == ["0", "1", "2"]
        np.testing.assert_array_equal(np.load(on_cpu / "tokens.npy"), np.load(on_gpu / "tokens.npy"))
        for key in mc["layers"]:
            a, b = shards(on_cpu, key), shards(on_gpu, key)
            assert a.dtype == b.dtype and a.shape == b.shape == (300, 32)
            np.testing.assert_allclose(b.astype(np.float32), a.astype(np.float32), rtol=tol, atol=tol)
            assert mg["stats"][key]["mean_sq_norm"] == pytest.approx(mc["stats"][key]["mean_sq_norm"], rel=1e-4)
        assert store.verify(on_gpu)["files"] == store.verify(on_cpu)["files"]
    # a real model in bfloat16 on the GPU: hidden states come back as float32 rows of the same format
    cfg = ["model=minilm", "layer=3", "corpus=wiki", "corpus.context_len=32", "corpus.max_tokens=300"]
    ref = build.ensure_cache(run_cfg([*cfg, "model.device=cpu", f"cache_dir={tmp_path / 'mcpu'}"]))
    bf16 = build.ensure_cache(run_cfg([*cfg, "model.device=cuda", "model.dtype=bfloat16", f"cache_dir={tmp_path / 'mgpu'}"]))
    a, b = shards(ref, "3"), shards(bf16, "3")
    assert b.dtype == np.float32 and b.shape == a.shape == (300, 384)
    assert np.abs(b - a).mean() < 0.05 * np.abs(a).mean()  # bfloat16's 8-bit mantissa through 3 blocks


def test_a_failed_shard_write_stops_the_build_with_its_error(tiny_gpt2, tmp_path, monkeypatch):
    """A write on the background thread that fails (a full disk) raises in the build, nothing half-done is kept,
    and the rerun resumes to the same cache as an undisturbed build."""
    real, calls = store.ShardFile.write, []

    def failing(self, rows):
        calls.append(self.path)
        if len(calls) == 4:  # shard 1 of layer 0: shard 0 of every layer is complete
            raise StorageError(f"{self.path}: no space left on device")
        return real(self, rows)

    monkeypatch.setattr(store.ShardFile, "write", failing)
    cfg = gpt2_cfg(tiny_gpt2, tmp_path / "a")
    with pytest.raises(StorageError, match="no space left on device"):
        build.ensure_cache(cfg, shard_rows=64)
    partial = next((tmp_path / "a").glob("gpt2-*/hidden_states/*"))
    assert not (partial / "manifest.json").exists() and not list(partial.rglob("*.tmp-*"))
    monkeypatch.setattr(store.ShardFile, "write", real)
    resumed = build.ensure_cache(cfg, shard_rows=64)
    clean = build.ensure_cache(gpt2_cfg(tiny_gpt2, tmp_path / "b"), shard_rows=64)
    assert manifest_without_provenance(resumed) == manifest_without_provenance(clean)
    for key in ("0", "1", "2"):
        np.testing.assert_array_equal(shards(resumed, key), shards(clean, key))


def test_a_resumed_or_repeated_import_of_another_source_is_refused_and_force_replaces(tmp_path):
    a = np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((400, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    out = tmp_path / "cache"

    def dies_after_three(lo, hi):  # the import of A is killed part-way (after 3 of 25 shards)
        if lo >= 48:
            raise KeyboardInterrupt
        return a[lo:hi]

    identity = {"kind": "imported", "source_sha256": store.sha256_file(tmp_path / "a.npy"), "key": None,
                "shape": [400, 8], "dtype": "float32", "rows_per_shard": 16}
    with pytest.raises(KeyboardInterrupt):
        build.write_array_cache(out, dies_after_three, 400, 8, "data", {"kind": "imported"}, shard_rows=16,
                                identity=identity)
    with pytest.raises(ConfigError, match="partial build of another source") as e:
        build.import_array(tmp_path / "b.npy", out, shard_rows=16)
    one_line(e.value)
    build.import_array(tmp_path / "a.npy", out, shard_rows=16)  # the same source resumes
    assert store.verify(out)["files"] == 25
    with pytest.raises(ConfigError, match="finished cache of another source"):
        build.import_array(tmp_path / "b.npy", out, shard_rows=16)
    with pytest.raises(ConfigError, match="finished cache of another source"):  # other settings, same file
        build.import_array(tmp_path / "a.npy", out, shard_rows=32)
    build.import_array(tmp_path / "b.npy", out, shard_rows=16, force=True)
    rows = np.concatenate([np.load(p) for p in sorted((out / "layers" / "data").glob("shard_*.npy"))])
    np.testing.assert_array_equal(rows, b)
    assert store.verify(out)["files"] == 25
    assert not list(tmp_path.glob(".cache.*-*"))  # no sibling left by --force


def test_an_output_that_is_a_file_or_a_foreign_folder_is_refused(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((10, 4), np.float32))
    (tmp_path / "file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="existing file"):
        build.import_array(tmp_path / "a.npy", tmp_path / "file")
    with pytest.raises(ConfigError, match="not empty"):
        build.import_array(tmp_path / "a.npy", tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_inputs_get_messages_that_say_what_they_are(tmp_path):
    (tmp_path / "text.npy").write_text("just some words\n")
    np.save(tmp_path / "full.npy", np.ones((100, 8), np.float32))
    data = (tmp_path / "full.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[: len(data) // 2])
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    np.save(tmp_path / "wide.npy", np.zeros((1, store.MAX_D + 1), np.float16))
    for name, pattern in (("text.npy", "not a .npy file"), ("cut.npy", "truncated"),
                          ("bad.safetensors", "not a readable .safetensors"), ("wide.npy", "width d=1048577")):
        with pytest.raises(DataError, match=pattern) as e:
            build.import_array(tmp_path / name, tmp_path / f"out-{name}")
        assert "pickle" not in one_line(e.value)
        assert not (tmp_path / f"out-{name}").exists()


def test_cache_force_replaces_a_cache_a_partial_build_or_an_empty_folder_only(tmp_path):
    a = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", a + 1)
    done = import_cache(tmp_path / "done", a, shard_rows=16)
    store.verify(done)  # verified.json is part of a cache too
    partial = tmp_path / "partial"
    with pytest.raises(KeyboardInterrupt):
        def dies(lo, hi):
            if lo >= 16:
                raise KeyboardInterrupt
            return a[lo:hi]
        build.write_array_cache(partial, dies, 40, 4, "data", {"kind": "imported"}, shard_rows=16)
    (tmp_path / "empty").mkdir()
    for out in (done, partial, tmp_path / "empty", tmp_path / "new"):
        build.import_array(tmp_path / "b.npy", out, shard_rows=16, force=True)
        assert store.verify(out)["files"] == 3, out
    mixed = import_cache(tmp_path / "mixed", a, shard_rows=16)
    (mixed / "notes.txt").write_text("mine")  # a user's file inside a cache: --force would delete it
    (mixed / "layers" / "data" / "keep.npy").write_bytes(b"x")
    before = digests(mixed)
    with pytest.raises(ConfigError, match=r"not a cache folder: it holds layers/data/keep.npy, notes.txt;"):
        build.import_array(tmp_path / "b.npy", mixed, shard_rows=16, force=True)
    assert digests(mixed) == before
