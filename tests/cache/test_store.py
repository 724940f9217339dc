"""Extracting activations into a cache (issue 20 item 4): `model.device`, the one-copy shard path, statistics
summed while shards are written, the lazily read corpora; a CUDA build against the CPU one (`-m cuda`)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_coding import corpus, models
from sparse_coding.cache import build, store
from sparse_coding.config.checks import validate
from sparse_coding.errors import ConfigError, StorageError
from tinymodels import gpt2_cfg, make_tiny_gpt2, run_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


def shards(path: Path, key: str) -> np.ndarray:
    m = store.read_manifest(path)
    return np.concatenate([np.load(path / "layers" / key / s["file"]) for s in m["shards"][key]])


def manifest_without_provenance(path: Path) -> dict:
    m = json.loads((path / "manifest.json").read_text())
    for key in ("build_seconds", "build_device"):
        m.pop(key)
    return m


# ---- model.device


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


def test_cuda_without_cuda_is_one_line(tiny_gpt2, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        validate(run_cfg(["model=gpt2", f"model.path={tiny_gpt2}", "layer=1", "model.device=cuda"]))
    msg = str(err.value)
    assert "\n" not in msg and "model.device=cuda" in msg and "no CUDA device" in msg and "model.device=cpu" in msg
    with pytest.raises(ConfigError, match=r"model.device='gpu': choose auto .*, cpu or cuda"):
        validate(run_cfg(["model=gpt2", f"model.path={tiny_gpt2}", "layer=1", "model.device=gpu"]))


def test_cuda_without_cuda_stops_train_py_with_one_line():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no device, even on a machine with one
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=minilm", "layer=1", "model.device=cuda"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "model.device=cuda" in lines[-1] and "model.device=cpu" in lines[-1], lines


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


# ---- the shard path: one copy, bytes as np.save writes them, statistics while writing


@pytest.mark.parametrize("shape,dtype", [((5, 3), np.float32), ((32768, 384), np.float16), ((1, 1), np.float32),
                                         ((0, 7), np.float32), ((3, 100_000), np.float16)])
def test_shard_bytes_are_np_save_bytes(tmp_path, shape, dtype):
    arr = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    digest = store.write_shard(tmp_path / "shard_00000.npy", arr)
    assert (tmp_path / "shard_00000.npy").read_bytes() == buf.getvalue()
    assert digest == store.sha256_file(tmp_path / "shard_00000.npy")
    assert (tmp_path / "shard_00000.npy.sha256").read_text().strip() == digest
    # written as the rows come, in pieces: the same file
    streamed = store.ShardFile(tmp_path / "shard_00001.npy", *shape, dtype)
    for lo in range(0, shape[0] + 1, max(1, shape[0] // 3)):
        streamed.write(arr[lo : lo + max(1, shape[0] // 3)])
    assert streamed.finish() == digest and (tmp_path / "shard_00001.npy").read_bytes() == buf.getvalue()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_00000.npy", "shard_00000.npy.sha256",
                                                         "shard_00001.npy", "shard_00001.npy.sha256"]


def test_a_shard_file_refuses_rows_it_does_not_hold(tmp_path):
    with pytest.raises(ValueError, match="more bytes than the shard holds"):
        store.ShardFile(tmp_path / "shard_00000.npy", 4, 3, np.float32).write(np.zeros((5, 3), np.float32))
    short = store.ShardFile(tmp_path / "shard_00000.npy", 4, 3, np.float32)
    short.write(np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="short of the shard"):
        short.finish()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_statistics_summed_while_writing_equal_those_read_back(tmp_path):
    """The same bits whether the shards are added from memory or read from disk, across shards and chunks,
    non-finite rows included."""
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((r, 24)).astype(np.float32) * 30 for r in (70, 70, 33)]
    arrays[1][5, 3] = np.nan
    arrays[2][0, 0] = np.inf
    running = store.LayerStats(24, chunk=16)
    for i, a in enumerate(arrays):
        store.write_shard(tmp_path / "layers" / "0" / store.shard_name(i), a)
        running.add(a, store.shard_name(i))
    files = [tmp_path / "layers" / "0" / store.shard_name(i) for i in range(3)]
    from_disk = store.layer_stats(files, [70, 70, 33], 24, "float32", chunk=16)
    got = running.result()
    assert got.pop("mean").tobytes() == from_disk.pop("mean").tobytes()
    assert got == from_disk and got["n_nonfinite"] == 2 and got["first_nonfinite"] == {"file": "shard_00001.npy", "row": 5}


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


# ---- corpora read only as far as needed


def test_wiki_is_read_and_tokenised_only_as_far_as_the_contexts_need(monkeypatch):
    from omegaconf import OmegaConf

    cleaned = []
    real = corpus.clean_wiki
    monkeypatch.setattr(corpus, "clean_wiki", lambda text: cleaned.append(1) or real(text))

    batches = []  # word counts of the documents of each tokenizer call

    class Tok:  # one token per word; "\n\n" is one token
        def __call__(self, texts, add_special_tokens=True):
            if isinstance(texts, str):
                return {"input_ids": [1] * max(1, len(texts.split()))}
            batches.append([len(t.split()) for t in texts])
            return {"input_ids": [[1] * len(t.split()) for t in texts]}

    cfg = OmegaConf.create({"name": "wiki", "context_len": 16, "max_tokens": 100_000, "keep_special_tokens": False})
    ctx = corpus.build_contexts(cfg, Tok())

    def stream(bs):
        return sum(words + 1 for b in bs for words in b)

    assert ctx.n_rows == 100_000 and len(batches) > 1
    assert len(cleaned) == sum(map(len, batches))  # no article read beyond those tokenised
    assert stream(batches[:-1]) < 100_000 <= stream(batches) == ctx.corpus_tokens
    assert ctx.corpus_tokens - (batches[-1][-1] + 1) < 100_000  # the last article tokenised was needed


def test_kjv_chapters_are_the_documents_datasets_read():
    """The Bible read with `json` (fast) gives the chapters the `datasets` JSON loader gave (the caches' tokens)."""
    import datasets
    from omegaconf import OmegaConf

    (path,) = corpus.source_files(OmegaConf.create({"name": "kjv"}))
    verses = datasets.load_dataset("json", data_files=str(path), split="train")
    chapters: dict = {}
    for book, chapter, text in zip(verses["book"], verses["chapter"], verses["text"]):
        chapters.setdefault((book, chapter), []).append(text)
    assert corpus._kjv_chapters(path) == [" ".join(v) for v in chapters.values()]
