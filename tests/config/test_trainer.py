"""Issue 20 items 1-2: the Trainer and callbacks from config, and one-line answers to misspelled keys.

Every argument of the installed `pytorch_lightning.Trainer` is a `trainer.*` setting (with or without
`+`), checked against its signature; the ones the run sets itself, and those that would change what
is measured, are refused with one line. `callbacks.NAME` entries are built with hydra.utils.instantiate.
A misspelled key from the command line or from `measure` is one line naming the closest valid key.
"""

from __future__ import annotations

import inspect
import json
import os

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file

from conftest import run_train
from sparse_coding.api import compose, measure
from sparse_coding.errors import ConfigError
from sparse_coding.config.overrides import check_overrides
from sparse_coding.run import run
from sparse_coding.config.keys import RUN_OWNED, trainer_arguments
from sparse_coding.config.plan import resolve
from sparse_coding.config.trainer import GradientClipping, SpawnDDPStrategy, build_trainer

TINY = ["logger=none", "trainer.enable_progress_bar=false", "data=sparse_linear", "data.dim=16", "data.active=4",
        "data.n=1024", "data.n_val=512", "data.batch_size=256", "trainer.max_epochs=2", "convergence.stop=false",
        "dictionary.mult=2"]


def one_line_error(overrides) -> str:
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    assert "\n" not in str(e.value)
    return str(e.value)


# --------------------------------------------------------------------------------------------
# trainer.*: every Trainer argument


def test_trainer_arguments_are_the_installed_signature():
    """Read from Lightning's source without importing it; the same set the imported signature has."""
    expected = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    assert trainer_arguments() == expected


def test_every_trainer_argument_is_a_setting_with_or_without_plus():
    for arg in sorted(trainer_arguments()):
        plain, plus = check_overrides([f"trainer.{arg}=1"]), check_overrides([f"+trainer.{arg}=1"])
        assert plus == [f"+trainer.{arg}=1"]
        assert plain[0] in (f"trainer.{arg}=1", f"++trainer.{arg}=1")  # ++: added or changed, whichever applies


@pytest.mark.parametrize("overrides", [
    ["+trainer.gradient_clip_val=1.0"], ["trainer.gradient_clip_val=1.0", "trainer.gradient_clip_algorithm=value"],
    ["trainer.strategy=ddp_spawn", "trainer.devices=2", "trainer.accelerator=cpu"], ["trainer.fast_dev_run=true"],
    ["trainer.profiler=simple"], ["trainer.limit_val_batches=0.5"], ["trainer.accelerator=mps"],
    ["trainer=ddp_cpu"], ["trainer.strategy=ddp_fork", "trainer.devices=2", "trainer.accelerator=cpu"],
    ["trainer.min_epochs=1", "trainer.benchmark=false"], ["callbacks=lr_monitor", "logger=csv"],
])
def test_trainer_settings_compose_and_validate(overrides):
    if "trainer.devices=2" in overrides or "trainer=ddp_cpu" in overrides:
        if (os.cpu_count() or 1) < 2:
            pytest.skip("two processes need two cores")
    cfg = compose(TINY + overrides)
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
    ("trainer.max_epochs=-1", "no budget"),  # with convergence.stop=false the trainer's budget is the protocol
    ("trainer.gradient_clip_vall=1", "did you mean trainer.gradient_clip_val?"),
    ("+trainer.gradient_clip_vall=1", "did you mean trainer.gradient_clip_val?"),
    ("callbacks.es._target_=pytorch_lightning.callbacks.EarlyStopping", "convergence"),
    ("callbacks.lr._target_=pytorch_lightning.callbacks.LearningRateMonitor", "logger=csv"),
])
def test_settings_that_would_change_the_measurement_are_refused_in_one_line(override, expected):
    assert expected in one_line_error(TINY + [override])


def test_the_trainer_is_built_from_the_settings(tmp_path):
    cfg = compose(TINY + ["trainer.profiler=simple", "trainer.limit_val_batches=0.5", "trainer.gradient_clip_val=0.5",
                          "trainer.gradient_clip_algorithm=value", "trainer.min_epochs=1", "callbacks=lr_monitor",
                          "logger=csv", "++callbacks.summary._target_=pytorch_lightning.callbacks.ModelSummary",
                          "callbacks.summary.max_depth=2"])
    trainer = build_trainer(resolve(cfg), tmp_path, logger=False)
    assert type(trainer.profiler).__name__ == "SimpleProfiler"
    assert trainer.limit_val_batches == 0.5 and trainer.min_epochs == 1 and trainer.max_epochs == 2
    assert trainer.gradient_clip_val is None  # Lightning refuses it for manual optimization: our callback clips
    clip = [cb for cb in trainer.callbacks if isinstance(cb, GradientClipping)]
    assert [(c.value, c.algorithm) for c in clip] == [(0.5, "value")]
    names = [type(cb).__name__ for cb in trainer.callbacks]
    assert "LearningRateMonitor" in names and "AtomicCheckpoint" in names
    assert [cb._max_depth for cb in trainer.callbacks if type(cb).__name__ == "ModelSummary"] == [2]

    spawn = build_trainer(resolve(compose(TINY + ["trainer.strategy=ddp_spawn", "trainer.accelerator=cpu"])), tmp_path, False)
    assert isinstance(spawn.strategy, SpawnDDPStrategy) and spawn.strategy._start_method == "spawn"


def test_a_setting_lightning_refuses_is_one_line(tmp_path):
    cfg = compose(TINY + ["trainer.profiler=bogus"])  # a value only Lightning knows the choices of
    with pytest.raises(ConfigError, match="Lightning refused the trainer.* settings: .*profiler") as e:
        build_trainer(resolve(cfg), tmp_path, logger=False)
    assert "\n" not in str(e.value)
    bad_callback = compose(TINY + ["callbacks.x._target_=pytorch_lightning.callbacks.NoSuchCallback"])
    with pytest.raises(ConfigError, match="callbacks.x: cannot build") as e:
        build_trainer(resolve(bad_callback), tmp_path, logger=False)
    assert "\n" not in str(e.value)


class GradNorms(pl.Callback):
    """The gradient norm the optimizer steps with (runs after GradientClipping: later in the callback list)."""

    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def test_gradient_clipping_under_manual_optimization(tmp_path):
    """`+trainer.gradient_clip_val` runs to the end and every optimizer step uses the clipped gradient."""
    clip = 1e-3
    norms = GradNorms()
    result = run(compose(TINY + [f"+trainer.gradient_clip_val={clip}"]), tmp_path / "clipped", callbacks=[norms])
    assert (tmp_path / "clipped" / "metrics.json").is_file() and result["optimizer_steps"] == len(norms.norms) == 8
    assert max(norms.norms) <= clip * (1 + 1e-5)
    assert max(norms.norms) >= clip * (1 - 1e-5)  # the clip was binding: the raw gradient norm is larger


def test_fast_dev_run_runs_to_the_end(tmp_path):
    result = run(compose(TINY + ["trainer.fast_dev_run=true"]), tmp_path / "fast")
    assert result["optimizer_steps"] == 1 and (tmp_path / "fast" / "metrics.json").is_file()


# --------------------------------------------------------------------------------------------
# Misspelled keys: one line naming the closest valid key


@pytest.mark.parametrize("override, expected", [
    ("dictionary.mutl=4", "unknown setting dictionary.mutl: did you mean dictionary.mult?"),
    ("+dictionary.mutl=4", "unknown setting dictionary.mutl: did you mean dictionary.mult?"),
    ("++dictionary.mutl=4", "unknown setting dictionary.mutl: did you mean dictionary.mult?"),
    ("dictonary.mult=4", "did you mean dictionary.mult?"),
    ("data.lam=0.1", "did you mean dictionary.lam?"),
    ("convergence.tolerance=0.1", "did you mean convergence.tol?"),
    ("modle=minilm", "did you mean model?"),
    ("model=minlm", "did you mean model=minilm?"),
    ("trainer=ddp_cpuu", "did you mean trainer=ddp_cpu?"),
    ("experiment=layers_quick", "+experiment=layers_quick"),
    ("bogus=1", "the run config has no such key"),
    ("data.dim=abc", "data.dim=abc: Value 'abc'"),
    ("seed=1.5", "seed=1.5"),
    ("dictionary.mult.x=1", "dictionary.mult is a value, not a section"),
    ("layer=[1", "cannot read the override 'layer=[1'"),
])
def test_misspelled_keys_and_bad_values_are_one_line(override, expected):
    assert expected in one_line_error([override])


def test_synthetic_fields_are_refused_for_real_activations():
    assert "data.dim does not apply to data=cache" in one_line_error(["model=minilm", "layer=3", "data.dim=32"])


def test_measure_raises_one_line_config_errors():
    for bad in (["dictionary.mutl=4"], ["data.dim=abc"], [1, 2], "data.dim=3"):
        with pytest.raises(ConfigError) as e:
            measure(bad)
        assert "\n" not in str(e.value) and str(e.value).strip(), bad


def test_the_command_line_answers_a_misspelled_key_in_one_line(tmp_path):
    for args, expected in ((["dictionary.mutl=4"], "did you mean dictionary.mult?"),
                           (["+dictionary.mutl=4"], "did you mean dictionary.mult?"),
                           (["-m", "dictionary.lam=0.1,0.2", "dictionary.mutl=4"], "did you mean dictionary.mult?")):
        proc = run_train([*args, "logger=none", f"hydra.run.dir={tmp_path}"], timeout=120)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], (args, proc.stderr)


# --------------------------------------------------------------------------------------------
# ddp_spawn: the main process gets rank 0's run state back


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two processes need two cores")
def test_ddp_spawn_runs_to_the_end_and_matches_one_process(tmp_path):
    """docs/scaling.md's ddp_spawn (the DDP that works under `-m`): what the run reads after fit and validate
    (history, step and epoch counts, what stopped it, Phi on every rank) is rank 0's, not the main process's copy."""
    run(compose(TINY), tmp_path / "one")
    proc = run_train(TINY + ["trainer.strategy=ddp_spawn", "trainer.devices=2", "trainer.accelerator=cpu",
                             f"hydra.run.dir={tmp_path / 'spawn'}"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "spawn"))
    assert two["ddp"] == {"world_size": 2, "phi_max_rank_difference": 0.0}
    for key in ("optimizer_steps", "epochs_completed", "samples_seen", "stopped_by", "converged", "n_samples"):
        assert two[key] == one[key], key  # n_samples: each rank measured its own share, once
    assert len(two["history"]) == len(one["history"]) >= 1 and two["timing"]["fit_seconds"] > 0
    for key in ("normalized_loss", "avg_coef_norm", "normalized_loss_se", "l0", "lam"):
        assert two[key] == pytest.approx(one[key], rel=1e-3), key  # as tests/test_ddp.py: float32 summation order
    for a, b in zip(one["history"], two["history"]):  # every evaluation, the first one too (its sums start at 0)
        assert b["dictionaries"][0]["normalized_loss_se"] == pytest.approx(a["dictionaries"][0]["normalized_loss_se"],
                                                                          rel=1e-2)
    phi1, phi2 = (load_file(str(tmp_path / d / "dictionary.safetensors")) for d in ("one", "spawn"))
    assert all((phi2[k] - phi1[k]).abs().max() < 1e-3 for k in phi1)
    assert (tmp_path / "spawn" / "plots").is_dir()
