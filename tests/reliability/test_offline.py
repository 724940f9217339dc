"""Issue 6, offline: with no network and no W&B login nothing hangs.

Every test of this suite runs behind the guard in conftest.py (in-process) and
offline_site/sitecustomize.py (subprocesses), which conftest.py checks before the first test; these tests check a
default W&B run with no API key and no ~/.netrc, and a model that is not on the machine.
"""

from __future__ import annotations

import time

from tests.helpers import error_lines
from tests.reliability.helpers import child_env, run_py


def test_default_wandb_logger_run_finishes_offline_without_login(tmp_path):
    """logger=wandb (the default) with WANDB_API_KEY unset, WANDB_MODE unset, an empty HOME (no ~/.netrc)."""
    home = tmp_path / "home"
    home.mkdir()
    env = child_env(WANDB_API_KEY=None, WANDB_MODE=None, WANDB_BASE_URL=None, WANDB_DIR=None, WANDB_CONFIG_DIR=None,
                    HOME=home, NETRC=None, XDG_CONFIG_HOME=None, XDG_CACHE_HOME=None)
    out = tmp_path / "run"
    start = time.monotonic()
    proc = run_py(["train.py", "data=gaussian", "data.dim=8", "data.n=256", "data.n_val=64", "data.batch_size=64",
                   "trainer.max_epochs=1", "dictionary.mult=2", "trainer.enable_progress_bar=false", f"out_dir={out}",
                   f"hydra.run.dir={tmp_path / 'h'}"], env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((out / "wandb").glob("offline-run-*")), "no offline W&B run directory"
    assert not (home / ".netrc").exists()
    assert (out / "metrics.json").exists()
    print(f"wandb offline run: {time.monotonic() - start:.1f} s")


def test_a_model_that_is_not_here_fails_at_once_without_offline_variables(tmp_path):
    """HF_HUB_OFFLINE etc. unset and an empty Hugging Face cache: one line, no download attempt, no hang."""
    env = child_env(HF_HUB_OFFLINE=None, HF_DATASETS_OFFLINE=None, TRANSFORMERS_OFFLINE=None, HF_HOME=tmp_path / "hf",
                    HF_HUB_CACHE=None)
    proc = run_py(["train.py", "model=bert_tiny", "layer=1", "logger=none", f"hydra.run.dir={tmp_path / 'h'}"],
                  env=env, timeout=120)
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and "not on this machine (no network access)" in lines[0], proc.stderr
