"""W&B runs as users run them (issue 12; no server needed): Hydra multirun jobs are separate runs with their own
config, and what `wandb agent` sets (sweep id, run id, locked parameters) is honoured. (The mode rule:
tests/test_loggers.py; the Python API: tests/test_api.py.)"""

from __future__ import annotations

import os

from tests.helpers import run_train
from tests.wandb_records import run_files, summary

TINY = ["data=sparse_linear", "data.dim=8", "data.active=3", "data.n=256", "data.n_val=96", "data.batch_size=64",
        "trainer.max_epochs=1", "dictionary.mult=2", "trainer.enable_progress_bar=false"]
AGENT_VARS = ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in AGENT_VARS}
    env.update(WANDB_MODE="offline", **extra)
    return env


def test_multirun_jobs_are_separate_wandb_runs_with_their_own_config(tmp_path):
    proc = run_train(["-m", *TINY, "dictionary.lam=0.3,0.6", f"hydra.sweep.dir={tmp_path}"], env=clean_env(),
                     timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reuse this run" not in proc.stderr + proc.stdout
    runs = []
    for job, lam in ((0, 0.3), (1, 0.6)):
        files = run_files(tmp_path / str(job))
        assert len(files) == 1, files
        info = summary(files[0])
        assert info["config"]["dictionary.lam"] == lam and info["config"]["dictionary"]["lam"] == lam
        assert info["config"]["data.dim"] == 8 and info["exit_code"] == 0
        name, kind, contents = info["artifacts"][0]
        assert kind == "dictionary" and contents == ["dictionary.json", "dictionary.safetensors", "metrics.json"]
        images = sorted(p.name.split("_")[0] for p in files[0].parent.glob("files/media/images/plots/*.png"))
        assert "metrics" in images, images
        runs.append(info["run_id"])
    assert runs[0] != runs[1]


def test_an_agent_environment_is_honoured(tmp_path):
    """What `wandb agent` sets: sweep id, run id and the parameter file (its keys are locked in the config)."""
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  value: sparse_linear\ndictionary.lam:\n  value: 0.3\n")
    env = clean_env(WANDB_SWEEP_ID="sw123", WANDB_RUN_ID="agentrun1", WANDB_SWEEP_PARAM_PATH=str(params))
    proc = run_train([*TINY, "dictionary.lam=0.3"], cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = list(tmp_path.glob("outputs/*/*-agentrun1"))
    assert len(dirs) == 1, list(tmp_path.glob("outputs/*/*"))  # the run id keeps agents' directories apart
    info = summary(run_files(dirs[0])[0])
    assert info["run_id"] == "agentrun1" and info["sweep_id"] == "sw123"
    assert info["config"]["data"] == "sparse_linear"  # locked by the sweep: the nested section is dropped ...
    assert info["config"]["data.dim"] == 8 and info["config"]["dictionary.mult"] == 2  # ... the flat keys stay
