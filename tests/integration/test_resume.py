"""Checkpoint and resume (issue 22 items 5, 6): a run stopped in any way and resumed with ckpt_path=last ends
bit-identical to an uninterrupted run (the same Phi tensors, the same metrics.json but its timings), and a resume
never continues on other data.

Stops: at an epoch end (only epoch-end checkpoints, the default), mid-epoch (checkpoint_every_n_steps), SIGKILL,
SIGINT and SIGTERM of a real `train.py` process (paused at a known step by a sitecustomize hook, so the signal
lands at a known point), a full disk while writing a checkpoint or the run's outputs, and a budget that is then
raised. Each on fixed-sample and fresh synthetic data and on a cache; the uninterrupted reference is trained once
per configuration (module-scoped).
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file

from conftest import ROOT
from subprocesses import default_sigint
from sparse_coding.cache import build
from sparse_coding.errors import ConfigError, StorageError
from sparse_coding.lifecycle.resume import resume_checkpoint
from sparse_coding.run import run

QUIET = ["logger=none", "trainer.enable_progress_bar=false"]
# 8 batches of 256 rows an epoch; 3 epochs (24 steps) in every configuration
SYNTHETIC = ["data=sparse_linear", "data.dim=16", "data.active=4", "data.n=2048", "data.n_val=512", "dictionary.mult=4"]
COMMON = ["data.batch_size=256", "seed=3"]
# fixed sample: the paper's fixed protocol (3 epochs, lambda rounds at epoch ends); budget raised: max_epochs 2 -> 3
FIXED = [*SYNTHETIC, "data.fresh=false", "convergence.stop=false", "trainer.max_epochs=3"]
# fresh batches, trained to a sample budget (never converging: tol tiny), evaluated and lambda rounds every 4 batches
TO_BUDGET = ["convergence.tol=1e-12", "convergence.eval_every=1024", "convergence.max_samples=6144"]
FRESH = [*SYNTHETIC, "data.fresh=true", *TO_BUDGET]
CONFIGS = {"fixed": FIXED, "fresh": FRESH, "cache": ["data=cache", "data.shuffle_buffer=500", *TO_BUDGET]}
SMALLER_BUDGET = {"fixed": ["trainer.max_epochs=2"], "fresh": ["convergence.max_samples=3584"],
                  "cache": ["convergence.max_samples=3584"]}  # 14 of the 24 steps


def compose_cfg(overrides):
    from sparse_coding.api import compose

    return compose([*QUIET, *overrides])


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory) -> Path:
    """A cache of 2304 training rows: 9 batches of 256 an epoch (not 8: the epochs of a cache fall elsewhere)."""
    folder = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2560, 16)) * rng.random(16)).astype(np.float32)
    np.save(folder / "acts.npy", x)
    return build.import_array(folder / "acts.npy", folder / "cache", shard_rows=1000)


def overrides(name: str, cache_path: Path, *extra: str) -> list:
    data = [f"data.path={cache_path}"] if name == "cache" else []
    return [*CONFIGS[name], *COMMON, *data, *extra]


def outputs(path: Path):
    metrics = json.loads((path / "metrics.json").read_text())
    metrics.pop("timing")  # wall-clock seconds differ run to run
    return metrics, load_file(str(path / "dictionary.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_path):
    """The uninterrupted run of each configuration, trained once (default checkpointing)."""
    done = {}

    def get(name: str):
        if name not in done:
            out = tmp_path_factory.mktemp(f"straight-{name}")
            run(compose_cfg(overrides(name, cache_path)), out)
            done[name] = outputs(out)
        return done[name]
    return get


def assert_identical(got, want) -> None:
    (got_m, got_phi), (want_m, want_phi) = got, want
    assert got_phi.keys() == want_phi.keys()
    for label in want_phi:
        assert torch.equal(got_phi[label], want_phi[label]), label
    assert got_m["lam_history"] == want_m["lam_history"]
    assert got_m["in_sample"] == want_m["in_sample"]
    for key in ("normalized_loss", "avg_coef_norm", "samples_seen", "optimizer_steps", "history", "stopped_by"):
        assert got_m[key] == want_m[key], key
    assert got_m == want_m


class Killed(RuntimeError):
    pass


class KillAt(pl.Callback):
    """Stands in for a crash: the run dies after `step` optimizer steps, no clean shutdown."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


def saved(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def resume(name, cache_path, out, *extra) -> None:
    assert not (out / "metrics.json").exists()
    run(compose_cfg(overrides(name, cache_path, *extra, "ckpt_path=last")), out)


# --------------------------------------------------------------------------------------------
# In-process stops: a crash at an epoch end or mid-epoch, a full disk, a budget raised afterwards


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_crash_after_an_epoch_end_checkpoint_resumes_exactly(tmp_path, reference, cache_path, name):
    """Default checkpointing: last.ckpt only at epoch ends; the crash is 2 batches into the next epoch."""
    per_epoch = 9 if name == "cache" else 8
    with pytest.raises(Killed):
        run(compose_cfg(overrides(name, cache_path)), tmp_path, callbacks=[KillAt(per_epoch + 2)])
    ckpt = saved(tmp_path)
    assert ckpt["global_step"] == per_epoch  # the epoch-end checkpoint of epoch 0
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches_done": 0}]
    resume(name, cache_path, tmp_path)
    assert_identical(outputs(tmp_path), reference(name))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_crash_mid_epoch_resumes_exactly(tmp_path, reference, cache_path, name):
    """last.ckpt every 3 steps: the crash at step 14 leaves the checkpoint of step 12, mid-epoch."""
    every = ["trainer.checkpoint_every_n_steps=3"]
    with pytest.raises(Killed):
        run(compose_cfg(overrides(name, cache_path, *every)), tmp_path, callbacks=[KillAt(14)])
    ckpt = saved(tmp_path)
    assert ckpt["global_step"] == 12
    per_epoch = 9 if name == "cache" else 8
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches_done": 12 - per_epoch}]
    resume(name, cache_path, tmp_path, *every)
    assert_identical(outputs(tmp_path), reference(name))


@pytest.fixture
def disk_full_at_step(monkeypatch):
    """torch.save of the checkpoint of a chosen step fails like a full disk (ENOSPC) after writing a part."""
    real = torch.save

    def arm(step: int) -> None:
        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("global_step") == step and "loops" in obj:
                f.write(b"a partial checkpoint")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(obj, f, *args, **kwargs)
        monkeypatch.setattr(torch, "save", save)
    yield arm
    monkeypatch.setattr(torch, "save", real)


@pytest.mark.parametrize("name", ["fixed", "fresh"])
def test_a_full_disk_while_writing_a_checkpoint_resumes_exactly(tmp_path, reference, cache_path, name,
                                                                  disk_full_at_step, monkeypatch):
    every = ["trainer.checkpoint_every_n_steps=3"]
    disk_full_at_step(15)
    with pytest.raises(StorageError, match="no space left on device while writing a checkpoint; the previous "
                                          "checkpoint is intact"):
        run(compose_cfg(overrides(name, cache_path, *every)), tmp_path)
    monkeypatch.undo()
    assert saved(tmp_path)["global_step"] == 12
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]  # the partial file was removed
    resume(name, cache_path, tmp_path, *every)
    assert_identical(outputs(tmp_path), reference(name))


@pytest.mark.parametrize("name", ["fixed", "fresh"])
def test_a_full_disk_while_writing_the_outputs_resumes_exactly(tmp_path, reference, cache_path, name, monkeypatch):
    from sparse_coding import outputs as outputs_mod

    real = outputs_mod.atomic_write_bytes

    def full(path, data):
        if Path(path).name == "metrics.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(outputs_mod, "atomic_write_bytes", full)
    with pytest.raises(StorageError, match="could not write metrics.json .No space left on device."):
        run(compose_cfg(overrides(name, cache_path)), tmp_path)
    monkeypatch.undo()
    resume(name, cache_path, tmp_path)
    assert_identical(outputs(tmp_path), reference(name))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_budget_raised_afterwards_resumes_exactly(tmp_path, reference, cache_path, name):
    """The run ends at a smaller budget (outputs written), then goes on to the reference's budget."""
    run(compose_cfg(overrides(name, cache_path, *SMALLER_BUDGET[name])), tmp_path)
    first, _ = outputs(tmp_path)
    assert first["samples_seen"] < reference(name)[0]["samples_seen"]
    run(compose_cfg(overrides(name, cache_path, "ckpt_path=last")), tmp_path)
    assert_identical(outputs(tmp_path), reference(name))


# --------------------------------------------------------------------------------------------
# Real processes and real signals

PAUSE_HOOK = r"""
import os, time
from pathlib import Path
_step = int(os.environ["SC_TEST_PAUSE_AT_STEP"])
from sparse_coding import module as _m
_base = _m.SparseCodingModule.on_train_batch_end

def on_train_batch_end(self, outputs, batch, batch_idx):
    _base(self, outputs, batch, batch_idx)
    if self.global_step == _step:  # after the checkpoint callbacks of this step: the state on disk is known
        Path(os.environ["SC_TEST_PAUSED"]).write_text(str(os.getpid()))
        end = time.monotonic() + 300
        while time.monotonic() < end and not self.trainer.received_sigterm:
            time.sleep(0.05)

_m.SparseCodingModule.on_train_batch_end = on_train_batch_end
"""

SIGNALS = {"SIGKILL": (signal.SIGKILL, 12), "SIGINT": (signal.SIGINT, 12), "SIGTERM": (signal.SIGTERM, 14)}


@pytest.mark.parametrize("name, sig", [("fixed", "SIGKILL"), ("fresh", "SIGINT"), ("cache", "SIGTERM")])
def test_a_train_py_process_stopped_by_a_signal_resumes_exactly(tmp_path, reference, cache_path, name, sig):
    """train.py paused at step 14 (last.ckpt of step 12 written) receives the signal; ckpt_path=last (in
    process: the same code path, without a second start-up) ends bit-identical to the uninterrupted run."""
    signum, step = SIGNALS[sig]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PAUSE_HOOK)
    out, paused = tmp_path / "run", tmp_path / "paused"
    every = ["trainer.checkpoint_every_n_steps=3"]
    env = {**os.environ, "SC_TEST_PAUSE_AT_STEP": "14", "SC_TEST_PAUSED": str(paused),
           "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for key in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, "train.py", *QUIET, *overrides(name, cache_path, *every), f"out_dir={out}",
                             f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 300  # start-up (imports) takes seconds to a minute on a loaded machine
        while not paused.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "train.py never reached step 14"
            time.sleep(0.05)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "Traceback" not in err, err[-3000:]
    if signum == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # one line saying where the resumable checkpoint is, exit 2 (SIGTERM: a checkpoint at the stop)
        last = err.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith("error: stopped by ") and "ckpt_path=last" in last, err[-2000:]
    assert saved(out)["global_step"] == step
    assert not (out / "metrics.json").exists()
    resume(name, cache_path, out, *every)
    assert_identical(outputs(out), reference(name))


# --------------------------------------------------------------------------------------------
# A resume never continues on other data (issue 22 item 6)


def resume_check(out: Path, overrides_: list):
    """What `ckpt_path=last` decides for this config, without training: resume_checkpoint as run() calls it."""
    from sparse_coding.api import compose_and_plan
    from sparse_coding.run import build_datamodule, build_module

    cfg, plan = compose_and_plan([*QUIET, *overrides_, "ckpt_path=last"])
    dm = build_datamodule(cfg, plan)
    return resume_checkpoint(cfg.ckpt_path, out, build_module(cfg, plan, dm), cfg.trainer, dm)


@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory, cache_path):
    """Runs stopped after 4 steps (resumable): fresh synthetic data, and a cache (in a folder of its own)."""
    import shutil

    base = tmp_path_factory.mktemp("stopped")
    own_cache = base / "cache"
    shutil.copytree(cache_path, own_cache)
    runs = {"fresh": (base / "fresh", overrides("fresh", cache_path, "data.n_val=64")),
            "cache": (base / "cache-run", overrides("cache", own_cache))}
    for out, ovr in runs.values():
        run(compose_cfg([*ovr, "trainer.max_steps=4"]), out)
    return runs


@pytest.mark.parametrize("change, differs", [
    (["data.active=20", "data.seed=5"], "data.active: 4.0 there, 20.0 here; data.seed: 0 there, 5 here"),
    (["data.fresh=false"], "data.fresh: True there, False here"),
    (["data.n=4096"], "data.n: 2048 there, 4096 here"),
    (["data.n_val=128"], "data.n_val: 64 there, 128 here"),
    (["data.noise=0.2"], "data.noise: 0.1 there, 0.2 here"),
    (["data.scale=2"], "data.scale: 1.0 there, 2.0 here"),
    (["data=gaussian"], "data.name: 'sparse_linear' there, 'gaussian' here"),
])
def test_a_resume_on_other_synthetic_data_is_refused_with_one_line(stopped_runs, change, differs):
    out, ovr = stopped_runs["fresh"]
    with pytest.raises(ConfigError) as e:
        resume_check(out, [*ovr, *change, "trainer.max_steps=20"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{out / 'checkpoints' / 'last.ckpt'} was trained on other data ("), msg
    assert differs in msg and msg.endswith("resume with the same data, or start a new run (another hydra.run.dir)"), msg


def test_a_resume_on_the_same_synthetic_data_is_accepted(stopped_runs):
    out, ovr = stopped_runs["fresh"]
    assert resume_check(out, [*ovr, "trainer.max_steps=20"]) == str(out / "checkpoints" / "last.ckpt")


def test_a_resume_on_another_cache_or_a_cache_swapped_under_its_path_is_refused(stopped_runs, cache_path, tmp_path):
    import shutil

    out, ovr = stopped_runs["cache"]
    own = Path(next(a for a in ovr if a.startswith("data.path="))[len("data.path="):])
    other = build.import_array(cache_path.parent / "acts.npy", tmp_path / "other", shard_rows=900)  # same rows, other shards
    moved = tmp_path / "moved"
    shutil.copytree(own, moved)
    assert resume_check(out, [*ovr, f"data.path={moved}", "trainer.max_steps=20"])  # the same cache elsewhere: fine
    for change, differs in (([f"data.path={other}"], f"at {own} there, "),
                            (["data.center=false"], "data.center: True there, False here"),
                            (["data.val_fraction=0.2"], "data.val_fraction: 0.1 there, 0.2 here"),
                            (["data.normalize=token"], "data.normalize: 'none' there, 'token' here")):
        with pytest.raises(ConfigError, match="was trained on other data") as e:
            resume_check(out, [*ovr, *change, "trainer.max_steps=20"])
        assert differs in str(e.value) and "\n" not in str(e.value), str(e.value)
    # another array imported with --force under the same path
    x = np.random.default_rng(5).standard_normal((2560, 16)).astype(np.float32)
    np.save(tmp_path / "b.npy", x)
    build.import_array(tmp_path / "b.npy", own, shard_rows=1000, force=True)
    with pytest.raises(ConfigError, match=r"was trained on other data \(cache build: \w+ at .* there, \w+ at .* here; "
                                          r"cache content: "):
        resume_check(out, [*ovr, "trainer.max_steps=20"])


@pytest.mark.parametrize("workers", [0, 2])
def test_cache_loader_skips_exactly_the_batches_already_trained(tmp_path, workers):
    from sparse_coding.data.cache_datamodule import CacheDataModule

    x = np.random.default_rng(1).standard_normal((3000, 8)).astype(np.float32)
    np.save(tmp_path / "acts.npy", x)
    path = build.import_array(tmp_path / "acts.npy", tmp_path / "cache", shard_rows=700)
    dm = CacheDataModule(path, batch_size=100, shuffle_buffer=300, seed=3, num_workers=workers)
    dm.set_epoch(2)
    full = [b.clone() for b in dm.train_dataloader()]
    for done in (0, 5, len(full) - 1):
        loader = dm.train_dataloader()
        loader.load_state_dict({"epoch": 2, "batches_done": done})
        rest = list(loader)
        assert len(rest) == len(full) - done
        assert all(torch.equal(a, b) for a, b in zip(rest, full[done:]))
    loader = dm.train_dataloader()
    loader.load_state_dict({"epoch": 1, "batches_done": 5})  # another epoch's position: ignored
    assert len(list(loader)) == len(full)


def test_cache_init_rows_are_seeded_centred_training_rows(tmp_path):
    from sparse_coding.data.cache_datamodule import CacheDataModule

    x = (np.random.default_rng(2).standard_normal((2000, 8)) + 5).astype(np.float32)
    np.save(tmp_path / "acts.npy", x)
    path = build.import_array(tmp_path / "acts.npy", tmp_path / "cache", shard_rows=600)
    dm = CacheDataModule(path, batch_size=100, seed=0)
    rows = dm.init_rows(50, seed=7)
    assert rows.shape == (50, 8) and rows.dtype == torch.float32
    assert torch.equal(rows, dm.init_rows(50, seed=7))
    assert torch.equal(rows[:20], dm.init_rows(20, seed=7))  # a prefix: independent of k
    assert not torch.equal(rows, dm.init_rows(50, seed=8))
    val = torch.cat([b for b, _ in dm.val_dataloader()])
    centred = torch.from_numpy(x - dm.mean)
    matches = [(centred == r).all(dim=1).nonzero().flatten() for r in rows]
    assert all(len(m) == 1 for m in matches)  # every row is one row of the cache, centred
    val_hits = sum(bool((val == r).all(dim=1).any()) for r in rows)
    assert val_hits == 0  # and never a validation row
    assert len({int(m) for m in matches}) == 50  # no repeats while k <= training rows
