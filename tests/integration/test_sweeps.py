"""Sweep files: every YAML in sweeps/ is a valid W&B sweep whose runs compose into valid configs;
one tiny sweep runs end to end offline (its W&B runs hold the Hydra config only, with the logger.* settings);
the runner refuses a command that is not the training entry point; Hydra multirun keeps working.
(tests/test_wheel.py runs a sweep from an installed wheel.)"""

import json
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir

from conftest import ROOT, run_train
from sparse_coding.config.checks import validate
from sparse_coding.config.schema import register_configs
from sparse_coding.errors import ConfigError
from sparse_coding.loggers import flat_config
from sparse_coding.sweep import build_command, check_sweep, entry_point_problem, find_sweep, load_sweep, propose
from sparse_coding.sweep import main as sweep_main
from wandb_records import run_files, summary

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
        assert command[:4] == ["/usr/bin/env", sys.executable, "-m", "sparse_coding"]  # any directory, installed or not
        assert entry_point_problem(command) is None
        overrides = command[4:]
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
     ({"program": "other.py"}, "program must be sparse_coding.*--allow-any-command"),
     ({"method": "sideways"}, "sideways")],
)
def test_bad_sweep_files_are_rejected(change, message):
    config = yaml.safe_load((ROOT / "sweeps" / "synthetic_active.yaml").read_text())
    config.update(change)
    with pytest.raises(ConfigError, match=message):
        check_sweep(config)


TINY_SWEEP = {
    "program": "sparse_coding", "method": "grid",
    "metric": {"name": "val/normalized_loss", "goal": "minimize"},
    "command": ["${env}", "${interpreter}", "-m", "${program}", "logger=wandb", "${args_no_hyphens}"],
    "parameters": {"data": {"value": "sparse_linear"}, "data.active": {"value": 3},
                   "dictionary.lam": {"values": [0.3, "auto"]}},
}


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
    overrides = build_command(config, propose(config, []), [])[4:]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    assert cfg.logger.name == "wandb" and config["project"] == cfg.logger.project
    assert wandb_mode(cfg.logger.mode, {"WANDB_SWEEP_ID": "abc", "WANDB_RUN_ID": "r1"}) == "online"
    assert wandb_mode(cfg.logger.mode, {}) == "offline"  # the same command by hand: offline, no login needed
