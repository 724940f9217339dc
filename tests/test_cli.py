"""The command line (`python train.py`, sparse_coding.cli): a problem found before training is one line on stderr,
exit 2, no traceback, and nothing heavy built. (Every bad value, through real processes:
tests/reliability/test_config_validation.py; trainer settings: tests/reliability/test_hostile_processes.py.)"""

import os
import subprocess
import sys

from tests.helpers import ROOT, error_lines, run_train

# the line Lightning prints when a Trainer is built: a check that stops early never prints it
BUILT_A_TRAINER = "GPU available:"


def test_cuda_without_cuda_stops_train_py_with_one_line():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no device, even on a machine with one
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=minilm", "layer=1", "model.device=cuda"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = error_lines(proc)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "model.device=cuda" in lines[-1] and "model.device=cpu" in lines[-1], lines


def test_a_multirun_answers_a_misspelled_key_in_one_line_before_its_first_job(tmp_path):
    """(A single run's misspelled key, with or without +: tests/reliability/test_config_validation.py.)"""
    proc = run_train(["-m", "dictionary.lam=0.1,0.2", "dictionary.mutl=4", "logger=none",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}"], timeout=120)
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and "did you mean dictionary.mult?" in lines[0], proc.stderr
    assert not (tmp_path / "sweep").exists()


def test_train_py_offline_without_weights_stops_fast(empty_hf):
    env = {"HF_HOME": str(empty_hf), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=gpt2", "layer=3"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "model=gpt2" in proc.stderr and "model.path=" in proc.stderr and "minilm, smollm2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert BUILT_A_TRAINER not in proc.stdout + proc.stderr  # stopped before any heavy work
