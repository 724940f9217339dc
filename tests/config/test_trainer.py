"""The Trainer and callbacks built from config (sparse_coding.config.trainer): every setting reaches the Trainer,
one that Lightning refuses is one line, gradient clipping under manual optimization, fast_dev_run. (Which settings
are accepted: tests/config/test_checks.py; every Trainer argument is a setting: tests/config/test_overrides.py.)"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from sparse_coding.api import compose
from sparse_coding.config.plan import resolve
from sparse_coding.config.trainer import GradientClipping, SpawnDDPStrategy, build_trainer
from sparse_coding.errors import ConfigError
from sparse_coding.run import run
from tests.helpers import QUIET

TINY = [*QUIET, "data=sparse_linear", "data.dim=16", "data.active=4", "data.n=1024", "data.n_val=512",
        "data.batch_size=256", "trainer.max_epochs=2", "convergence.stop=false", "dictionary.mult=2"]


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
