"""Hostile use that needs real processes and real signals (GitHub issue 13)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.helpers import ROOT, error_lines
from tests.reliability.helpers import child_env, run_py
from tests.subprocesses import default_sigint

TRAIN = ["train.py", "logger=none", "trainer.enable_progress_bar=false", "data.dim=16", "data.n=2048", "data.n_val=256",
         "data.batch_size=128", "dictionary.mult=2", "convergence.stop=false",
         "trainer.checkpoint_every_n_steps=2"]


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    end = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.2)


def test_a_second_run_on_the_same_directory_is_refused_and_sigterm_leaves_a_resumable_run(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TRAIN, f"hydra.run.dir={run_dir}"]
    first = subprocess.Popen([sys.executable, *args, "trainer.max_epochs=100000"], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        _wait_for(run_dir / "checkpoints" / "last.ckpt", first)
        second = run_py([*args, "trainer.max_epochs=3"])
        assert second.returncode == 2 and "in use by another run" in error_lines(second)[-1]
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 2, err[-2000:]
    assert "Traceback" not in err and "stopped by SIGTERM" in err.strip().splitlines()[-1]
    assert not (run_dir / "metrics.json").exists()
    assert not list(run_dir.rglob(".*.tmp-*")) and not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("tmp*.ckpt"))
    import torch

    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]
    args.append(f"trainer.max_epochs={stopped_at + 2}")  # not a module setting: a resume may change it
    resumed = run_py([*args, "ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run_dir / "metrics.json").is_file() and (run_dir / "dictionary.safetensors").is_file()
    again = run_py([*args, "ckpt_path=last"])  # a finished run is not silently re-measured
    assert again.returncode == 2 and "already finished" in error_lines(again)[-1]


def test_trainer_settings_fail_fast_with_one_line_in_a_real_process(tmp_path):
    for bad in ("trainer.precision=16-mixed", "+trainer.gradient_clip_val=-1", "trainer.devices=64",
                "trainer.accelerator=gpu", "trainer.limit_train_batches=0"):
        proc = run_py(["train.py", "logger=none", bad, f"hydra.run.dir={tmp_path / 'r'}"])
        assert proc.returncode == 2 and len(error_lines(proc)) == 1 and "Traceback" not in proc.stderr, (bad, proc.stderr)
        assert "GPU available:" not in proc.stdout + proc.stderr, bad  # refused before a Trainer was built


def test_ctrl_c_in_the_cache_cli_prints_one_line(tmp_path):
    import fcntl

    src = tmp_path / "a.npy"
    np.save(src, np.zeros((64, 4), np.float32))
    with open(tmp_path / ".out.lock", "a+b") as lock:  # "another builder" holds the cache: the CLI waits
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-m", "sparse_coding.cache", "import", "--input", str(src), "--output",
                                 str(tmp_path / "out")], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
        waiting = proc.stderr.readline()
        assert "waiting for it" in waiting, waiting
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and err.strip().splitlines() == [
        "interrupted: the shards written so far are complete; rerun the same command to resume"]
