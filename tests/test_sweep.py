"""W&B sweep files (sparse_coding.sweep): every YAML in sweeps/ is a valid sweep whose runs compose into valid
configs and log online under a real agent; bad files, commands that are not the training entry point and
unknown names are refused in one line. (Sweeps that run: tests/integration/test_sweeps.py.)"""

import sys

import pytest
import yaml

from sparse_coding.config.checks import validate
from sparse_coding.config.compose import compose_config
from sparse_coding.errors import ConfigError
from sparse_coding.loggers import wandb_mode
from sparse_coding.sweep import (build_command, check_sweep, entry_point_problem, find_sweep, load_sweep, propose,
                                 run_sweep)
from sparse_coding.sweep import main as sweep_main
from tests.helpers import ROOT, TINY_SWEEP

SWEEP_FILES = sorted((ROOT / "sweeps").glob("*.yaml"))


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
        assert command[:4] == ["/usr/bin/env", sys.executable, "-m", "sparse_coding"]  # any directory, installed or not
        assert entry_point_problem(command) is None
        overrides = command[4:]
        cfg = compose_config(overrides)
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
     ({"program": "other.py"}, "program must be sparse_coding.*--allow-any-command"),
     ({"method": "sideways"}, "sideways")],
)
def test_bad_sweep_files_are_rejected(change, message):
    config = yaml.safe_load((ROOT / "sweeps" / "synthetic_active.yaml").read_text())
    config.update(change)
    with pytest.raises(ConfigError, match=message):
        check_sweep(config)


@pytest.mark.parametrize("command,problem", [
    (["/bin/sh", "-c", "echo pwned", "${args_no_hyphens}"], "not the training entry point"),
    (["${env}", "${interpreter}", "-c", "import os", "${args_no_hyphens}"], "not the training entry point"),
    (["${env}", "LD_PRELOAD=x.so", "${interpreter}", "-m", "${program}", "${args_no_hyphens}"], "not the training"),
    (["${env}", "${interpreter}", "-m", "${program}", "--config-dir=/tmp", "${args_no_hyphens}"], "not a Hydra override"),
    (["${env}", "${interpreter}", "-m", "${program}", "hydra.job.env_set.X=1", "${args_no_hyphens}"], "Hydra itself"),
    (["${env}", "${interpreter}", "-m", "${program}", "+callbacks.x._target_=os.system", "${args_no_hyphens}"],
     "_target_"),
])
def test_only_the_training_entry_point_runs_unless_allowed(tmp_path, capsys, command, problem):
    (tmp_path / "evil.yaml").write_text(yaml.safe_dump({**TINY_SWEEP, "command": command}))
    args = [str(tmp_path / "evil.yaml"), "--out", str(tmp_path / "out"), "--dry-run"]
    assert sweep_main(args) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1, lines
    assert "refusing to run this sweep's command" in lines[0] and problem in lines[0], lines
    assert "--allow-any-command" in lines[0]
    assert sweep_main([*args, "--allow-any-command"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # listed (a dry run), not run


def test_a_refused_program_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "ran"
    sweep = {**TINY_SWEEP, "program": "evil.sh", "command": ["${env}", "/bin/sh", "-c", f"touch {marker}",
                                                               "${args_no_hyphens}"]}
    (tmp_path / "evil.yaml").write_text(yaml.safe_dump(sweep))
    assert sweep_main([str(tmp_path / "evil.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "program must be sparse_coding" in err and "--allow-any-command" in err


def test_named_sweeps_resolve_to_the_shipped_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a name, not a path: found wherever the command runs
    assert find_sweep("lambda_grid") == find_sweep("lambda_grid.yaml") == ROOT / "sweeps" / "lambda_grid.yaml"
    with pytest.raises(ConfigError, match="no such sweep file.*shipped: dict_size"):
        find_sweep("lambda_gird")
    assert sweep_main(["--list"]) == 0
    assert {ln.split()[0] for ln in capsys.readouterr().out.splitlines()} == {p.stem for p in SWEEP_FILES}
    assert sweep_main(["lambda_grid", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7 and all(ln.split()[1:4] == [sys.executable, "-m", "sparse_coding"] for ln in lines)


def test_random_sweep_needs_a_count():
    with pytest.raises(ConfigError, match="--count"):
        run_sweep(ROOT / "sweeps" / "lambda_random.yaml", dry_run=True)


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_runs_reach_the_server_under_a_real_agent(path):
    """`wandb agent` sets WANDB_SWEEP_ID (and WANDB_RUN_ID): the YAML's runs then log online, to its project."""
    config = load_sweep(path)
    overrides = build_command(config, propose(config, []), [])[4:]
    cfg = compose_config(overrides)
    assert cfg.logger.name == "wandb" and config["project"] == cfg.logger.project
    assert wandb_mode(cfg.logger.mode, {"WANDB_SWEEP_ID": "abc", "WANDB_RUN_ID": "r1"}) == "online"
    assert wandb_mode(cfg.logger.mode, {}) == "offline"  # the same command by hand: offline, no login needed
