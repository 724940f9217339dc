"""Sweep files: every YAML in sweeps/ is a valid W&B sweep whose runs compose into valid configs;
one tiny sweep runs end to end offline; Hydra multirun keeps working."""

import json
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir

from conftest import ROOT, run_train
from sparse_coding.config import register_configs, validate
from sparse_coding.errors import ConfigError
from sparse_coding.sweep import build_command, check_sweep, load_sweep, propose

register_configs()

SWEEP_FILES = sorted((ROOT / "sweeps").glob("*.yaml"))
TINY = ["data.dim=16", "data.n=512", "data.n_val=256", "data.batch_size=256", "trainer.max_epochs=1",
        "dictionary.mult=2", "trainer.enable_progress_bar=false"]


def test_the_common_studies_are_there():
    assert {p.stem for p in SWEEP_FILES} >= {"lambda_grid", "layers", "dict_size", "synthetic_active", "lambda_random"}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_file_is_valid_and_every_run_composes(path):
    config = load_sweep(path)  # wandb's schema + program/command/metric rules
    assert config["metric"] == {"name": "val/normalized_loss", "goal": "minimize"}
    history = []
    while len(history) < (20 if config["method"] == "grid" else 3):
        params = propose(config, history)
        if params is None:
            break
        command = build_command(config, params, [])
        assert command[:3] == ["/usr/bin/env", sys.executable, "train.py"]
        overrides = command[3:]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        validate(cfg)
        for key, value in params.items():
            if "." in key:
                got = cfg
                for part in key.split("."):
                    got = got[part]
                assert got == value or str(got) == str(value), (key, got, value)
        history.append({"name": f"run-{len(history)}", "params": params, "returncode": 0, "metric": 1.0})
    if config["method"] == "grid":
        expected = 1
        for spec in config["parameters"].values():
            expected *= len(spec.get("values", [None]))
        assert len(history) == expected  # the whole grid, then None


@pytest.mark.parametrize(
    "change,message",
    [({"command": ["${env}", "${interpreter}", "${program}", "${args}"]}, "args_no_hyphens"),
     ({"metric": {"name": "val/loss", "goal": "minimize"}}, "val/normalized_loss"),
     ({"program": "other.py"}, "train.py"),
     ({"method": "sideways"}, "sideways")],
)
def test_bad_sweep_files_are_rejected(change, message):
    config = yaml.safe_load((ROOT / "sweeps" / "synthetic_active.yaml").read_text())
    config.update(change)
    with pytest.raises(ConfigError, match=message):
        check_sweep(config)


def test_tiny_sweep_runs_offline_end_to_end(tmp_path):
    sweep = {
        "program": "train.py", "method": "grid",
        "metric": {"name": "val/normalized_loss", "goal": "minimize"},
        "command": ["${env}", "${interpreter}", "${program}", "logger=wandb", "${args_no_hyphens}"],
        "parameters": {"data": {"value": "sparse_linear"}, "data.active": {"value": 3},
                       "dictionary.lam": {"values": [0.3, "auto"]}},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(sweep))
    proc = subprocess.run(
        [sys.executable, "-m", "sparse_coding.sweep", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "out"),
         "--name", "tiny-sweep", "--", *TINY],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sweep_dir = tmp_path / "out" / "tiny-sweep"
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["params"]["dictionary.lam"] for r in record["runs"]] == [0.3, "auto"]
    for run in record["runs"]:
        metrics = json.loads((sweep_dir / run["name"] / "metrics.json").read_text())
        assert run["metric"] == metrics["normalized_loss"] > 0
        assert metrics["dict_size"] == 32
        offline = list((sweep_dir / run["name"] / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(offline) == 1  # a real offline W&B run, ready for `wandb sync`
        data = offline[0].read_bytes()
        assert b"tiny-sweep" in data and b"normalized_loss" in data  # its group and the metric are recorded
    assert [r["lam_mode"] for r in map(lambda r: json.loads((sweep_dir / r["name"] / "metrics.json").read_text()),
                                       record["runs"])] == ["fixed", "auto"]
    assert "wandb sync" in proc.stdout
    # run again under the same name: the grid is done, nothing new runs
    again = subprocess.run([sys.executable, "-m", "sparse_coding.sweep", str(tmp_path / "tiny.yaml"), "--out",
                            str(tmp_path / "out"), "--name", "tiny-sweep"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and len(json.loads((sweep_dir / "sweep.json").read_text())["runs"]) == 2


def test_random_sweep_needs_a_count():
    with pytest.raises(ConfigError, match="--count"):
        from sparse_coding.sweep import run_sweep

        run_sweep(ROOT / "sweeps" / "lambda_random.yaml", dry_run=True)


def test_hydra_multirun_still_works(tmp_path):
    proc = run_train(["-m", "logger=none", *TINY, "dictionary.lam=0.3,0.6", f"hydra.sweep.dir={tmp_path}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lams = sorted(json.loads((tmp_path / str(k) / "metrics.json").read_text())["lam"] for k in (0, 1))
    assert lams == [0.3, 0.6]


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_runs_reach_the_server_under_a_real_agent(path):
    """`wandb agent` sets WANDB_SWEEP_ID (and WANDB_RUN_ID): the YAML's runs then log online, to its project."""
    from sparse_coding.loggers import wandb_mode

    config = load_sweep(path)
    overrides = build_command(config, propose(config, []), [])[3:]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    assert cfg.logger.name == "wandb" and config["project"] == cfg.logger.project
    assert wandb_mode(cfg.logger.mode, {"WANDB_SWEEP_ID": "abc", "WANDB_RUN_ID": "r1"}) == "online"
    assert wandb_mode(cfg.logger.mode, {}) == "offline"  # the same command by hand: offline, no login needed
