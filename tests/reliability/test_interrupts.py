"""Issue 6, interrupted and concurrent work, with real subprocesses and real signals.

- SIGKILL during a cache build, then the same command again: the cache is identical (sha256 of
  every file) to an uninterrupted build, the shards complete before the kill are kept, a half-written one is not
  taken (the suite's one test of a build's resume; a failed shard write and a full disk: tests/cache/test_build.py,
  test_storage.py).
- Two processes building the same cache at once: both succeed, the cache verifies and is
  identical to a single build (the second waits on the build lock, then finds it finished).
- SIGKILL during training, then `ckpt_path=last`: the same Phi and metrics as an uninterrupted run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparse_coding.cache import build, store
from sparse_coding.config.compose import compose_config
from sparse_coding.errors import DataError
from tests.helpers import ROOT
from tests.reliability.helpers import child_env, file_digests, run_py

TOKENS = 5000


def build_args(tiny, cache_dir):
    return ["-m", "sparse_coding.cache", "build", "--shard-rows", "64", "model=gpt2", f"model.path={tiny}",
            "layer=all", "corpus=kjv", "corpus.context_len=16", f"corpus.max_tokens={TOKENS}", "corpus.batch_size=4",
            f"cache_dir={cache_dir}"]


def start(args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def cache_folder(cache_dir: Path) -> Path:
    found = list(cache_dir.glob("gpt2-*/hidden_states/*"))
    found = [p for p in found if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process ended (rc={proc.returncode}) before it could be interrupted: {err[-1500:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the process to make progress")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference_cache(tiny_gpt2, tmp_path_factory) -> Path:
    """The same build, uninterrupted, in this process (the CLI's code path: compose, validate, ensure_cache)."""
    from sparse_coding.config.checks import validate

    cache_dir = tmp_path_factory.mktemp("reference")
    cfg = compose_config(build_args(tiny_gpt2, cache_dir)[5:])
    validate(cfg)
    return build.ensure_cache(cfg, shard_rows=64)


def test_sigkill_during_cache_build_then_rerun_gives_the_identical_cache(tiny_gpt2, reference_cache, tmp_path):
    """The one test of a cache build's resume: killed mid-way, the same command finishes the cache to the bytes of
    an uninterrupted build, without recomputing the shards that were complete or taking a half-written one."""
    proc = start(build_args(tiny_gpt2, tmp_path))
    shards = lambda: len(list(tmp_path.glob("gpt2-*/hidden_states/*/layers/0/shard_*.npy")))
    wait_for(lambda: shards() >= 8, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    partial = cache_folder(tmp_path)
    assert not (partial / "manifest.json").exists()  # killed mid-way: not a cache yet
    with pytest.raises(DataError, match="no manifest"):
        store.read_manifest(partial)
    n_before = shards()
    done = {p: p.stat().st_mtime_ns for p in partial.glob("layers/*/shard_*.npy")}  # renamed into place: complete
    # a half-written shard a crash leaves is a temporary file, never taken for a shard
    (partial / "layers" / "0" / f".shard_{n_before:05d}.npy.tmp-999").write_bytes(b"partial")
    rerun = run_py(build_args(tiny_gpt2, tmp_path), timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert cache_folder(tmp_path) == partial
    assert 8 <= n_before < len(json.loads((partial / "manifest.json").read_text())["shards"]["0"])
    assert {p: p.stat().st_mtime_ns for p in done} == done  # the complete shards were not computed again
    assert file_digests(partial) == file_digests(reference_cache)
    assert not [p for p in partial.rglob("*") if ".tmp-" in p.name]  # the killed build's leftovers are gone
    assert store.verify(partial)["files"] > 0


def test_two_processes_building_the_same_cache_at_once(tiny_gpt2, reference_cache, tmp_path):
    procs = [start(build_args(tiny_gpt2, tmp_path)) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    path = cache_folder(tmp_path)
    assert store.verify(path)["files"] > 0
    assert file_digests(path) == file_digests(reference_cache)
    # each process either waited on the lock or found the finished cache; exactly one computed the shards
    computed = [err.count("needs ") for _, err in outs]
    assert sorted(computed) == [0, 1], [err[-500:] for _, err in outs]


# --------------------------------------------------------------------------------------------
# Training


TRAIN = ["logger=none", "trainer.enable_progress_bar=false", "data=sparse_linear", "data.dim=16", "data.active=3",
         "data.n=2048", "data.n_val=256", "data.batch_size=64", "dictionary.mult=4", "trainer.max_epochs=4",
         "trainer.checkpoint_every_n_steps=4", "seed=3", "data.seed=3"]


def outputs(out: Path):
    from safetensors.torch import load_file

    metrics = json.loads((out / "metrics.json").read_text())
    return load_file(str(out / "dictionary.safetensors")), metrics


def test_sigkill_during_training_then_resume_gives_the_same_phi_and_metrics(tmp_path):
    from sparse_coding.config.checks import validate
    from sparse_coding.run import run

    clean = tmp_path / "clean"  # the uninterrupted run, in this process (train.py's code path)
    cfg = compose_config(TRAIN)
    validate(cfg)
    run(cfg, clean)

    out = tmp_path / "killed"
    args = ["train.py", *TRAIN, f"out_dir={out}", f"hydra.run.dir={tmp_path / 'h2'}"]
    proc = start(args)
    last = out / "checkpoints" / "last.ckpt"
    first_seen = []

    def progressed():  # the checkpoint has been rewritten at least twice since it first appeared
        if not last.exists():
            return False
        first_seen.append(last.stat().st_mtime_ns)
        return len(set(first_seen)) >= 3

    wait_for(progressed, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    resumed = run_py([*args, "ckpt_path=last"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    phi_clean, m_clean = outputs(clean)
    phi_resumed, m_resumed = outputs(out)
    assert phi_clean.keys() == phi_resumed.keys()
    for key in phi_clean:
        assert (phi_clean[key] == phi_resumed[key]).all(), key
    for m in (m_clean, m_resumed):
        m.pop("timing", None)  # wall-clock seconds differ run to run
    assert m_resumed == m_clean
