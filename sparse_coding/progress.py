"""The training progress bar: Lightning's rich bar, without "Epoch k/-2" when the run has no epoch limit.

Runs that train until converged set `trainer.max_epochs=-1`; Lightning's bar then prints the limit
as -2. Such a run shows "pass k" (passes over the training data) instead.
"""

from __future__ import annotations

from pytorch_lightning.callbacks import RichProgressBar


class PassProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            return super()._get_train_description(current_epoch)
        text = f"pass {current_epoch}"
        return f"{text:{len(self.validation_description)}}" if len(self.validation_description) > len(text) else text
