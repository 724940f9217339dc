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

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file

from sparse_coding.errors import ConfigError, StorageError
from sparse_coding.run import run
from tests.helpers import QUIET, RANK_VARIABLES, ROOT, compose, train
from tests.subprocesses import default_sigint

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


def overrides(name: str, resume_cache: Path, *extra: str) -> list:
    data = [f"data.path={resume_cache}"] if name == "cache" else []
    return [*CONFIGS[name], *COMMON, *data, *extra]


def outputs(path: Path):
    metrics = json.loads((path / "metrics.json").read_text())
    metrics.pop("timing")  # wall-clock seconds differ run to run
    return metrics, load_file(str(path / "dictionary.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, resume_cache):
    """The uninterrupted run of each configuration, trained once (default checkpointing)."""
    done = {}

    def get(name: str):
        if name not in done:
            out = tmp_path_factory.mktemp(f"straight-{name}")
            run(compose(overrides(name, resume_cache)), out)
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


def resume(name, resume_cache, out, *extra) -> None:
    assert not (out / "metrics.json").exists()
    run(compose(overrides(name, resume_cache, *extra, "ckpt_path=last")), out)


# --------------------------------------------------------------------------------------------
# In-process stops: a crash at an epoch end or mid-epoch, a full disk, a budget raised afterwards


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_crash_after_an_epoch_end_checkpoint_resumes_exactly(tmp_path, reference, resume_cache, name):
    """Default checkpointing: last.ckpt only at epoch ends; the crash is 2 batches into the next epoch."""
    per_epoch = 9 if name == "cache" else 8
    with pytest.raises(Killed):
        run(compose(overrides(name, resume_cache)), tmp_path, callbacks=[KillAt(per_epoch + 2)])
    ckpt = saved(tmp_path)
    assert ckpt["global_step"] == per_epoch  # the epoch-end checkpoint of epoch 0
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches_done": 0}]
    resume(name, resume_cache, tmp_path)
    assert_identical(outputs(tmp_path), reference(name))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_crash_mid_epoch_resumes_exactly(tmp_path, reference, resume_cache, name):
    """last.ckpt every 3 steps: the crash at step 14 leaves the checkpoint of step 12, mid-epoch."""
    every = ["trainer.checkpoint_every_n_steps=3"]
    with pytest.raises(Killed):
        run(compose(overrides(name, resume_cache, *every)), tmp_path, callbacks=[KillAt(14)])
    ckpt = saved(tmp_path)
    assert ckpt["global_step"] == 12
    per_epoch = 9 if name == "cache" else 8
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches_done": 12 - per_epoch}]
    resume(name, resume_cache, tmp_path, *every)
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
def test_a_full_disk_while_writing_a_checkpoint_resumes_exactly(tmp_path, reference, resume_cache, name,
                                                                  disk_full_at_step, monkeypatch):
    every = ["trainer.checkpoint_every_n_steps=3"]
    disk_full_at_step(15)
    with pytest.raises(StorageError, match="no space left on device while writing a checkpoint; the previous "
                                          "checkpoint is intact"):
        run(compose(overrides(name, resume_cache, *every)), tmp_path)
    monkeypatch.undo()
    assert saved(tmp_path)["global_step"] == 12
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]  # the partial file was removed
    resume(name, resume_cache, tmp_path, *every)
    assert_identical(outputs(tmp_path), reference(name))


@pytest.mark.parametrize("name", ["fixed", "fresh"])
def test_a_full_disk_while_writing_the_outputs_resumes_exactly(tmp_path, reference, resume_cache, name, monkeypatch):
    from sparse_coding import outputs as outputs_mod

    real = outputs_mod.atomic_write_bytes

    def full(path, data):
        if Path(path).name == "metrics.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(outputs_mod, "atomic_write_bytes", full)
    with pytest.raises(StorageError, match="could not write metrics.json .No space left on device."):
        run(compose(overrides(name, resume_cache)), tmp_path)
    monkeypatch.undo()
    resume(name, resume_cache, tmp_path)
    assert_identical(outputs(tmp_path), reference(name))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_budget_raised_afterwards_resumes_exactly(tmp_path, reference, resume_cache, name):
    """The run ends at a smaller budget (outputs written), then goes on to the reference's budget."""
    run(compose(overrides(name, resume_cache, *SMALLER_BUDGET[name])), tmp_path)
    first, _ = outputs(tmp_path)
    assert first["samples_seen"] < reference(name)[0]["samples_seen"]
    run(compose(overrides(name, resume_cache, "ckpt_path=last")), tmp_path)
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
def test_a_train_py_process_stopped_by_a_signal_resumes_exactly(tmp_path, reference, resume_cache, name, sig):
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
    for key in RANK_VARIABLES:
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, "train.py", *QUIET, *overrides(name, resume_cache, *every), f"out_dir={out}",
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
    resume(name, resume_cache, out, *every)
    assert_identical(outputs(out), reference(name))


# --------------------------------------------------------------------------------------------
# A run that ended but was killed before its outputs (what a resume refuses: tests/lifecycle/test_resume.py)

SMALL = ["data=sparse_linear", "data.dim=16", "data.active=4", "data.n=2048", "data.n_val=1024",
         "data.batch_size=256", "dictionary.mult=4"]


@pytest.mark.parametrize("protocol", [[], ["convergence.stop=false", "trainer.max_epochs=2"]], ids=["converged", "fixed"])
def test_a_run_killed_before_writing_its_outputs_resumes_to_them(tmp_path, protocol):
    """Ended (converged or at its budget), checkpointed, then killed before metrics.json: resuming writes the
    outputs from the checkpoint without training further, and only then refuses to resume it again."""
    first = train(tmp_path, SMALL + protocol)
    (tmp_path / "metrics.json").unlink()
    again = train(tmp_path, SMALL + protocol + ["ckpt_path=last"])
    for key in ("optimizer_steps", "samples_seen", "converged", "stopped_by", "normalized_loss", "avg_coef_norm"):
        assert again[key] == first[key], key
    assert (tmp_path / "metrics.json").is_file()
    with pytest.raises(ConfigError, match="already (converged|finished)"):
        train(tmp_path, SMALL + protocol + ["ckpt_path=last"])
