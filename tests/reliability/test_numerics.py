"""Issue 6, numerics: Phi never becomes NaN; a non-finite loss stops the run with its step and batch,
and the last good checkpoint stays intact.

The fault is injected through a real Lightning callback that poisons one batch in place (NaN, or
values so large that the squared error overflows float32) at epoch 1, batch 1; the checkpoint
written after the step before must be byte-identical afterwards and hold that step's finite Phi.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import pytorch_lightning as pl
import torch

from sparse_coding.config.checks import validate
from sparse_coding.config.compose import compose_config
from sparse_coding.module import NonFiniteError
from sparse_coding.run import run

BASE = ["logger=none", "trainer.enable_progress_bar=false", "data=sparse_linear", "data.dim=8", "data.active=2",
        "data.n=512", "data.n_val=128", "data.batch_size=128", "dictionary.mult=2"]


class Poison(pl.Callback):
    """Poison batch `batch` of epoch `epoch` in place (NaN, or huge finite values); just before, record the
    checkpoint's sha256 and the Phi it should hold."""

    def __init__(self, kind: str, epoch: int = 1, batch: int = 1):
        self.kind, self.epoch, self.batch = kind, epoch, batch

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            self.ckpt_path = trainer.checkpoint_callback.last_model_path
            self.ckpt_sha_before = hashlib.sha256(open(self.ckpt_path, "rb").read()).hexdigest()
            self.phis_before = [p.detach().clone() for p in module.phis]
            self.step_before = trainer.global_step
            if self.kind == "nan":
                batch[3, 1] = math.nan
            else:
                batch.mul_(1e25)  # finite, but ||x - Phi alpha||^2 overflows float32


@pytest.mark.parametrize("kind,what", [("nan", "non-finite input batch"), ("huge", "non-finite loss")])
def test_nonfinite_loss_stops_with_step_and_batch_and_keeps_the_last_checkpoint(tmp_path, kind, what):
    # a checkpoint after every optimizer step: the last good one is the step right before the bad batch
    cfg = compose_config(BASE + ["trainer.max_epochs=3", "trainer.checkpoint_every_n_steps=1"])
    validate(cfg)
    poison = Poison(kind)
    with pytest.raises(NonFiniteError) as info:
        run(cfg, tmp_path, callbacks=[poison])
    message = str(info.value)
    assert what in message and "\n" not in message
    steps_per_epoch = 512 // 128
    assert poison.step_before == steps_per_epoch + 1
    assert f"global step {steps_per_epoch + 1} (epoch 1, batch 1)" in message
    # the last checkpoint is untouched and holds the (finite) Phi from before the bad batch
    ckpt = poison.ckpt_path
    assert ckpt and hashlib.sha256(open(ckpt, "rb").read()).hexdigest() == poison.ckpt_sha_before
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == steps_per_epoch + 1
    for k, phi in enumerate(poison.phis_before):
        saved = state["state_dict"][f"phis.{k}"]
        assert torch.isfinite(saved).all() and torch.equal(saved, phi)
    assert not (tmp_path / "dictionary.safetensors").exists()  # no outputs from a failed run


@pytest.mark.parametrize("scale", ["1e-6", "1e6"])
@pytest.mark.parametrize("data", ["heavy_tailed", "sparse_linear"])
def test_phi_stays_finite_and_unit_norm_at_the_ends_of_the_scale_range(tmp_path, scale, data):
    cfg = compose_config(BASE + [f"data={data}", f"data.scale={scale}", "trainer.max_epochs=2"])
    validate(cfg)
    result = run(cfg, tmp_path)
    from safetensors.torch import load_file

    for phi in load_file(str(tmp_path / "dictionary.safetensors")).values():
        assert torch.isfinite(phi).all() and (phi.norm(dim=0) - 1).abs().max() < 1e-4
    assert math.isfinite(result["normalized_loss"]) and math.isfinite(result["lam"])
