"""Issue 12: W&B runs as users run them (no server needed), the loadable dictionary and the Python API,
packaging (configs found inside the package, console scripts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_train
from sparse_coding.errors import ConfigError
from sparse_coding.loggers import flat_config, wandb_mode
from wandb_records import run_files, summary

TINY = ["data=sparse_linear", "data.dim=8", "data.active=3", "data.n=256", "data.n_val=96", "data.batch_size=64",
        "trainer.max_epochs=1", "dictionary.mult=2", "trainer.enable_progress_bar=false"]
METRICS = ("normalized_loss", "avg_coef_norm", "l0", "loss", "fvu", "explained_variance", "mean_l1", "mean_max",
           "dead_fraction", "capped_fraction", "mean_steps")
AGENT_VARS = ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in AGENT_VARS}
    env.update(WANDB_MODE="offline", **extra)
    return env


# ---- W&B --------------------------------------------------------------------------------------


def test_the_wandb_mode_rule():
    assert wandb_mode(None, {}) == "offline"  # the default: never needs a login
    assert wandb_mode(None, {"WANDB_MODE": "online"}) == "online"  # the environment beats the default
    assert wandb_mode(None, {"WANDB_MODE": "dryrun"}) == "offline"
    assert wandb_mode(None, {"WANDB_SWEEP_ID": "abc"}) == "online"  # a wandb agent's run reaches its server
    assert wandb_mode(None, {"WANDB_SWEEP_ID": "abc", "WANDB_MODE": "offline"}) == "offline"
    assert wandb_mode("disabled", {"WANDB_MODE": "online", "WANDB_SWEEP_ID": "abc"}) == "disabled"  # explicit config
    assert flat_config({"data": {"dim": 8, "name": "x"}, "layer": 3, "tags": [1]}) == {
        "data.dim": 8, "data.name": "x", "layer": 3, "tags": [1]}


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


# ---- SparseDictionary and measure() -------------------------------------------------------------


def assert_same_metrics(got: dict, want: dict) -> None:
    for key in METRICS:
        assert got[key] == want[key], key  # the same solver, layout and sums: exactly
    assert got["lam"] == want["lam"] and got["dict_size"] == want["dict_size"]


def test_measure_api_and_the_loaded_dictionary_reproduce_metrics_json(tmp_path):
    from sparse_coding import SparseDictionary
    import sparse_coding
    from sparse_coding.data.synthetic_datamodule import FreshSyntheticDataModule

    out = tmp_path / "run"
    result = sparse_coding.measure([*TINY, "logger=none", f"out_dir={out}"])
    written = json.loads((out / "metrics.json").read_text())
    assert result["normalized_loss"] == written["normalized_loss"] > 0
    d = SparseDictionary.load(out)
    assert (d.dim, d.dict_size, d.lam, d.mean) == (8, 16, written["lam"], None)
    data = FreshSyntheticDataModule("sparse_linear", 8, 256, 96, seed=0, active=3, batch_size=64)  # data.fresh=true
    val_x = data.val_x
    assert_same_metrics(d.measure(val_x), written)
    in_sample = d.measure(data.in_sample_x)  # and the in-sample numbers, on the training rows metrics.json used
    assert {k: in_sample[k] for k in written["in_sample"]} == written["in_sample"]
    alpha = d.encode(val_x)
    assert alpha.shape == (96, 16) and (alpha >= 0).all()
    assert d.decode(alpha).shape == (96, 8)
    with pytest.raises(ConfigError, match="data.dim"):
        sparse_coding.measure(["data.dim=0"])  # a bad config raises (one line), it does not exit


def test_a_centred_cache_dictionary_encodes_raw_activations(tmp_path):
    from sparse_coding import SparseDictionary
    from sparse_coding.cache import build
    from sparse_coding.config.checks import validate
    from sparse_coding.config.compose import compose_config
    from sparse_coding.data.cache_datamodule import CacheDataModule
    from sparse_coding.run import run
    from sparse_coding.solver import solve

    rng = np.random.default_rng(0)
    acts = (rng.standard_normal((600, 8)) + 5.0).astype(np.float32)  # far from centred: the mean matters
    np.save(tmp_path / "acts.npy", acts)
    path = build.import_array(tmp_path / "acts.npy", tmp_path / "cache")
    cfg = compose_config(["logger=none", "trainer.enable_progress_bar=false", "data=cache", f"data.path={path}",
                                "data.batch_size=64", "trainer.max_epochs=1", "dictionary.mult=2",
                                "dictionary.lam=[0.5,auto]"])
    validate(cfg)
    out = tmp_path / "run"
    run(cfg, out)
    written = {e["label"]: e for e in json.loads((out / "metrics.json").read_text())["dictionaries"]}
    bank = SparseDictionary.load_bank(out)
    assert sorted(bank) == sorted(written)  # a bank: one loadable dictionary per member
    with pytest.raises(ConfigError, match="bank of 2"):
        SparseDictionary.load(out)
    raw = CacheDataModule(path, center=False, batch_size=64)
    raw_val = torch.cat([b for b, _ in raw.val_dataloader()])  # the held-out rows as stored, not centred
    mean = torch.from_numpy(np.load(path / "layers" / "data" / "mean.npy").astype(np.float32))
    for label, d in bank.items():
        assert torch.equal(d.mean, mean)
        assert_same_metrics(d.measure(raw_val), written[label])
        assert SparseDictionary.load(out / "dictionary.safetensors", label=label).lam == d.lam
        want = solve(raw_val - mean, d.phi, d.lam, d.max_steps, tol=d.tol).alpha
        assert torch.equal(d.encode(raw_val), want)
        assert torch.allclose(d.decode(want), (want @ d.phi.T) + mean)


# ---- packaging ----------------------------------------------------------------------------------


def test_configs_are_found_the_same_way_everywhere():
    from sparse_coding.paths import config_dir

    assert (config_dir() / "train.yaml").is_file()  # the installed scripts and packaged conf/: tests/test_wheel.py


def test_the_cache_cli_shows_its_composed_config():
    proc = subprocess.run([sys.executable, "-m", "sparse_coding.cache", "build", "--cfg", "model=minilm", "layer=2",
                           "corpus.max_tokens=1000"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "max_tokens: 1000" in proc.stdout and "name: minilm" in proc.stdout and "layer: 2" in proc.stdout


def test_cache_batch_size_is_the_global_batch(tmp_path):
    from sparse_coding.cache import build
    from sparse_coding.data.cache_datamodule import CacheDataModule

    np.save(tmp_path / "a.npy", np.random.default_rng(0).standard_normal((1200, 4)).astype(np.float32))
    path = build.import_array(tmp_path / "a.npy", tmp_path / "c")
    for world in (1, 2, 4):
        sizes = [len(b) for b in CacheDataModule(path, batch_size=200, rank=0, world_size=world,
                                                 center=False).train_dataloader()]
        assert max(sizes) == 200 // world  # W ranks together take data.batch_size rows per step
