"""The config checks (sparse_coding.config.checks): what `validate` refuses, in one line, before any heavy work,
and what it accepts; `check_trainable`; the checks import nothing heavy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sparse_coding.api import compose
from sparse_coding.config.checks import check_trainable, validate
from sparse_coding.config.compose import compose_config
from sparse_coding.config.keys import RUN_OWNED
from sparse_coding.errors import ConfigError, DataError
from tests.helpers import QUIET, ROOT
from tests.tinymodels import run_cfg

# the line Lightning prints when a Trainer is built: a check that stops early never prints it
BUILT_A_TRAINER = "GPU available:"
TRAINER = [*QUIET, "data=sparse_linear", "data.dim=16", "data.active=4", "data.n=1024", "data.n_val=512",
           "data.batch_size=256", "trainer.max_epochs=2", "convergence.stop=false", "dictionary.mult=2"]
TINY = [*QUIET, "data.dim=8", "data.n=256", "data.n_val=64", "data.batch_size=64", "dictionary.mult=2",
        "trainer.max_epochs=2"]


def one_line_error(overrides) -> str:
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_cuda_without_cuda_is_one_line(tiny_gpt2, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        validate(run_cfg(["model=gpt2", f"model.path={tiny_gpt2}", "layer=1", "model.device=cuda"]))
    msg = str(err.value)
    assert "\n" not in msg and "model.device=cuda" in msg and "no CUDA device" in msg and "model.device=cpu" in msg
    with pytest.raises(ConfigError, match=r"model.device='gpu': choose auto .*, cpu or cuda"):
        validate(run_cfg(["model=gpt2", f"model.path={tiny_gpt2}", "layer=1", "model.device=gpu"]))


HEAVY_AT_IMPORT = ("torch", "pytorch_lightning", "lightning", "transformers", "numpy")
HEAVY_TO_VALIDATE = ("torch", "pytorch_lightning", "lightning", "transformers")  # numpy: corpus.py (corpus checks)


def test_the_checks_import_nothing_heavy_and_validate_a_model_without_torch(tmp_path):
    """Importing the checks loads no heavy module; validating a model run (model=minilm: its config.json only)
    loads no torch, Lightning or transformers either."""
    code = ("import json, sys\n"
            "import sparse_coding.config.checks, sparse_coding.config.overrides, sparse_coding.config.preflight\n"
            f"at_import = sorted(m for m in {HEAVY_AT_IMPORT!r} if m in sys.modules)\n"
            "from sparse_coding.config.compose import compose_config\n"
            "sparse_coding.config.checks.validate(compose_config(['model=minilm', 'layer=2']))\n"
            f"print(json.dumps([at_import, sorted(m for m in {HEAVY_TO_VALIDATE!r} if m in sys.modules)]))")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}  # no Hugging Face cache: nothing found there by chance
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[], []]


@pytest.mark.parametrize("overrides", [
    ["+trainer.gradient_clip_val=1.0"], ["trainer.gradient_clip_val=1.0", "trainer.gradient_clip_algorithm=value"],
    ["trainer.strategy=ddp_spawn", "trainer.devices=2", "trainer.accelerator=cpu"], ["trainer.fast_dev_run=true"],
    ["trainer.profiler=simple"], ["trainer.limit_val_batches=0.5"], ["trainer.accelerator=mps"],
    ["trainer.accelerator=tpu"],
    ["trainer=ddp_cpu"], ["trainer.strategy=ddp_fork", "trainer.devices=2", "trainer.accelerator=cpu"],
    ["trainer.min_epochs=1", "trainer.benchmark=false"], ["callbacks=lr_monitor", "logger=csv"],
])
def test_trainer_settings_compose_and_validate(overrides, monkeypatch):
    from sparse_coding.config import resources

    monkeypatch.setattr(resources, "has_accelerator", lambda name: True)  # as on a Mac (mps) or a TPU host
    if "trainer.devices=2" in overrides or "trainer=ddp_cpu" in overrides:
        if (os.cpu_count() or 1) < 2:
            pytest.skip("two processes need two cores")
    cfg = compose(TRAINER + overrides)
    for o in overrides:
        key, _, value = o.lstrip("+").partition("=")
        if key.startswith("trainer."):
            assert str(cfg.trainer[key.split(".", 1)[1]]).lower() == value.lower(), o


@pytest.mark.parametrize("override, expected", [
    *[(f"+trainer.{key}=1", f"trainer.{key} is set by the run") for key in RUN_OWNED],
    ("trainer.precision=16-mixed", "float32"),
    ("trainer.precision=bf16-true", "float32"),
    ("trainer.strategy=fsdp", "whole Phi"),
    ("trainer.strategy=deepspeed_stage_2", "whole Phi"),
    ("trainer.strategy=bogus", "choose auto, ddp, ddp_spawn"),
    ("trainer.accelerator=bogus", "choose one of"),
    ("trainer.devices=2", "add trainer.strategy=ddp"),
    ("trainer.devices=4096", "CPU cores"),
    ("trainer.limit_val_batches=0", "would measure on no batch"),
    ("trainer.gradient_clip_val=-1", "must be a number >= 0"),
    ("trainer.gradient_clip_algorithm=bogus", "choose norm or value"),
    ("trainer.max_epochs=-1", "no budget"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0 trains nothing"),
    ("trainer.max_steps=0", "trainer.max_steps=0 trains nothing"),  # with convergence.stop=false the trainer's budget is the protocol
    ("trainer.gradient_clip_vall=1", "did you mean trainer.gradient_clip_val?"),
    ("+trainer.gradient_clip_vall=1", "did you mean trainer.gradient_clip_val?"),
    ("callbacks.es._target_=pytorch_lightning.callbacks.EarlyStopping", "convergence"),
    ("callbacks.lr._target_=pytorch_lightning.callbacks.LearningRateMonitor", "logger=csv"),
])
def test_settings_that_would_change_the_measurement_are_refused_in_one_line(override, expected):
    assert expected in one_line_error(TRAINER + [override])


@pytest.mark.parametrize("accelerator", ["mps", "tpu"])
def test_an_accelerator_this_machine_lacks_is_one_line(accelerator, monkeypatch):
    from sparse_coding.config import resources

    monkeypatch.setattr(resources, "has_accelerator", lambda name: False)
    msg = one_line_error(TRAINER + [f"trainer.accelerator={accelerator}"])
    assert f"no {accelerator.upper()}" in msg and "trainer.accelerator=cpu" in msg


def test_layer_all_is_refused_before_any_work(monkeypatch):
    from sparse_coding.cache import build
    from sparse_coding.run import build_datamodule

    cfg = run_cfg(["model=minilm", "layer=all"])
    plan = validate(cfg)  # a valid cache build ...
    with pytest.raises(ConfigError, match="layer=all trains nothing: train one layer per run"):
        check_trainable(cfg)  # ... but not one training run
    # run() called without train.py's checks (experiments.runner, extras): refused before every layer is built
    monkeypatch.setattr(build, "ensure_cache", lambda *a, **k: pytest.fail("layer=all built the cache"))
    with pytest.raises(ConfigError, match="layer=all trains nothing"):
        build_datamodule(cfg, plan)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=minilm", "layer=all", "logger=none"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "layer=all trains nothing" in proc.stderr and "Traceback" not in proc.stderr
    assert BUILT_A_TRAINER not in proc.stdout + proc.stderr


def test_corpus_rules(tmp_path):
    with pytest.raises(ConfigError, match="corpus=text needs corpus.files"):
        validate(run_cfg(["model=minilm", "layer=1", "corpus=text"]))
    with pytest.raises(DataError, match="does not exist"):
        validate(run_cfg(["model=minilm", "layer=1", "corpus=text", f"corpus.files=[{tmp_path}/nope.txt]"]))
    with pytest.raises(ConfigError, match="context_len=1 must be an integer >= 2"):
        validate(run_cfg(["model=minilm", "layer=1", "corpus.context_len=1"]))
    with pytest.raises(ConfigError, match="max_tokens=0"):
        validate(run_cfg(["model=minilm", "layer=1", "corpus.max_tokens=0"]))
    with pytest.raises(ConfigError, match="exceeds model=minilm's 512 positions"):
        validate(run_cfg(["model=minilm", "layer=1", "corpus.context_len=600"]))
    with pytest.raises(ConfigError, match="unknown corpus"):
        validate(run_cfg(["model=minilm", "layer=1", "corpus.name=books"]))


def test_bad_model_path(tmp_path):
    with pytest.raises(DataError, match="has no config.json and weights"):
        validate(run_cfg(["model=gpt2", f"model.path={tmp_path}", "layer=0"]))


def test_fewer_than_two_held_out_samples_are_refused():
    """fvu needs two held-out samples (a cache's held-out split: tests/data/test_cache_datamodule.py)."""
    with pytest.raises(ConfigError, match="data.n_val=1"):
        validate(compose_config(TINY + ["data.n_val=1"]))


def test_bank_members_that_are_the_same_dictionary_are_refused():
    for lam in ("[0.1,0.1]", "[0.1,1e-1]", "[1,1.0]", "[auto,auto]"):
        with pytest.raises(ConfigError, match="twice"):
            validate(compose_config(TINY + [f"dictionary.lam={lam}"]))
    with pytest.raises(ConfigError, match="twice"):
        validate(compose_config(TINY + ["dictionary.mult=[2,2]"]))
