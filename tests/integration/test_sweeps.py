"""Sweeps that run: one tiny sweep end to end offline (its W&B runs hold the Hydra config only, with the logger.*
settings), a failed run that stops the sweep and is retried on --keep-going, and Hydra multirun. (The sweep
files and the runner's refusals: tests/test_sweep.py; a sweep from an installed wheel: tests/integration/test_wheel.py.)
"""

import json
import subprocess
import sys

import yaml

from sparse_coding.loggers import flat_config
from tests.helpers import ROOT, TINY_SWEEP, run_train
from tests.wandb_records import run_files, summary

TINY = ["data.dim=16", "data.n=512", "data.n_val=256", "data.batch_size=256", "trainer.max_epochs=1",
        "dictionary.mult=2", "trainer.enable_progress_bar=false"]


def sweep_cli(*args, cwd=ROOT, timeout=400):
    return subprocess.run([sys.executable, "-m", "sparse_coding.sweep", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_tiny_sweep_runs_offline_end_to_end(tmp_path):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_SWEEP))
    proc = sweep_cli(tmp_path / "tiny.yaml", "--out", tmp_path / "out", "--name", "tiny-sweep", "--", *TINY,
                     "logger.entity=team-x", "logger.job_type=sweep-run", cwd=tmp_path)  # runs start in the cwd
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sweep_dir = tmp_path / "out" / "tiny-sweep"
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["params"]["dictionary.lam"] for r in record["runs"]] == [0.3, "auto"]
    for run in record["runs"]:
        run_dir = sweep_dir / run["name"]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert run["metric"] == metrics["normalized_loss"] > 0
        assert metrics["dict_size"] == 32
        offline = run_files(run_dir)
        assert len(offline) == 1  # a real offline W&B run, ready for `wandb sync`
        info = summary(offline[0])
        assert info["exit_code"] == 0 and info["project"] == "sparse-coding"
        assert (info["entity"], info["group"], info["job_type"]) == ("team-x", "tiny-sweep", "sweep-run")
        assert info["tags"] == ["sweep", "tiny-sweep"] and info["name"] == f"tiny-sweep-{run['name']}"
        # the config is the Hydra config, nested and as flat dotted keys, and nothing else: not the module's
        # constructor arguments that Lightning logs (dim, grid, lr, max_steps, tol, ...)
        hydra_cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        assert set(info["config"]) - {"_wandb"} == set(hydra_cfg) | set(flat_config(hydra_cfg))
        assert not {"dim", "grid", "lr", "max_steps", "tol", "inner_steps"} & set(info["config"])
        assert info["config"]["dictionary.lam"] == run["params"]["dictionary.lam"]
        assert info["config"]["logger"]["entity"] == "team-x" and info["config"]["logger.job_type"] == "sweep-run"
    assert [r["lam_mode"] for r in map(lambda r: json.loads((sweep_dir / r["name"] / "metrics.json").read_text()),
                                       record["runs"])] == ["fixed", "auto"]
    assert f"upload later: wandb sync {sweep_dir}/run-*/wandb/offline-run-*" in proc.stdout
    # run again under the same name: the grid is done, nothing new runs
    again = sweep_cli(tmp_path / "tiny.yaml", "--out", tmp_path / "out", "--name", "tiny-sweep", cwd=tmp_path,
                      timeout=120)
    assert again.returncode == 0 and len(json.loads((sweep_dir / "sweep.json").read_text())["runs"]) == 2
    assert "wandb sync" not in again.stdout  # nothing ran: nothing new to upload


def test_a_failed_run_stops_the_sweep_with_one_line_and_is_retried_on_continue(tmp_path):
    sweep = {**TINY_SWEEP, "parameters": {"data": {"value": "sparse_linear"},
                                          "data.dim": {"values": [0, 8]}}}  # data.dim=0: refused, exit 2
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(sweep))
    args = [tmp_path / "bad.yaml", "--out", tmp_path / "out", "--name", "bad", "--", *TINY[1:], "logger=csv"]
    proc = sweep_cli(*args, cwd=tmp_path, timeout=200)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sweep bad stopped: run-0 failed (exit 2: error: data.dim"), lines
    record = json.loads((tmp_path / "out" / "bad" / "sweep.json").read_text())
    assert [r["returncode"] for r in record["runs"]] == [2] and record["stopped_by"] == "run-0"  # run-1 never started
    assert "wandb sync" not in proc.stdout  # logger=csv and a failure: nothing to upload
    # --keep-going: the failed point again (and failing again), then the rest
    proc = sweep_cli(*args[:5], "--keep-going", *args[5:], cwd=tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads((tmp_path / "out" / "bad" / "sweep.json").read_text())
    assert [(r["params"]["data.dim"], r["returncode"]) for r in record["runs"]] == [(0, 2), (0, 2), (8, 0)]
    assert "run-1 failed (exit 2" in proc.stderr and "1 of 2 runs succeeded" in proc.stdout


def test_hydra_multirun_still_works(tmp_path):
    proc = run_train(["-m", "logger=none", *TINY, "dictionary.lam=0.3,0.6", f"hydra.sweep.dir={tmp_path}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lams = sorted(json.loads((tmp_path / str(k) / "metrics.json").read_text())["lam"] for k in (0, 1))
    assert lams == [0.3, 0.6]
