"""Checkpoints that survive kills: `AtomicCheckpoint`, the run's Lightning `ModelCheckpoint`.

Every checkpoint is written to a temporary file in its own directory, fsynced and renamed over the
target, so a kill or a full disk leaves the previous checkpoint intact and no temporary file elsewhere
(Lightning's own writer goes through a temporary file in `$TMPDIR` and a copy when that is another
filesystem). The every-N-steps checkpoint skips an epoch's last batch: the epoch-end checkpoint, taken
after the module's `on_train_epoch_end` (auto-lambda), follows at once and holds the updated state.
SIGTERM saves a resumable checkpoint before the run stops (sparse_coding.lifecycle.signals). Checkpoints
always go to the run directory's own `checkpoints/last.ckpt` (no `last-v1.ckpt` beside it), also after
the directory was moved or copied: the state a checkpoint holds names its files by the directory it was
written in, and is re-read relative to the current one. Reading one back is sparse_coding.lifecycle.resume.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Optional

import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from sparse_coding.atomic import atomic_write
from sparse_coding.errors import StorageError, TrainingError
from sparse_coding.lifecycle.signals import is_sigterm
from sparse_coding.lightning_compat import dump_checkpoint, is_last_batch, total_batch_idx


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, fsync, rename over it; never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(f"{path}: no space left on device while writing a checkpoint; the previous "
                               "checkpoint is intact: free space and resume with ckpt_path=last") from None
        raise


class AtomicCheckpoint(ModelCheckpoint):
    """ModelCheckpoint with atomic writes, the epoch-end fix and a checkpoint on SIGTERM (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("enable_version_counter", False)  # last.ckpt is overwritten (atomically), never last-v1.ckpt
        super().__init__(*args, **kwargs)
        self.sigterm_checkpoint: Optional[str] = None

    def load_state_dict(self, state_dict: dict) -> None:
        # The state names the checkpoint files by the folder they were written in. In a moved or copied run
        # directory Lightning would drop last_model_path (and then write last-v1.ckpt beside the last.ckpt that
        # `ckpt_path=last` resumes from) and keep paths into the old folder: read them as this folder's files.
        old, new = state_dict.get("dirpath"), self.dirpath
        if old and new and old != new:
            def here(p: Any) -> Any:
                return os.path.join(new, os.path.basename(p)) if isinstance(p, str) and p and \
                    os.path.dirname(p) == old else p

            state_dict = {**state_dict, "dirpath": new,
                          **{k: here(state_dict.get(k)) for k in ("best_model_path", "kth_best_model_path",
                                                                   "last_model_path") if k in state_dict},
                          "best_k_models": {here(k): v for k, v in (state_dict.get("best_k_models") or {}).items()}}
        super().load_state_dict(state_dict)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        checkpoint = dump_checkpoint(trainer, self.save_weights_only)
        if trainer.is_global_zero:
            atomic_save(checkpoint, Path(filepath))
        trainer.strategy.barrier("AtomicCheckpoint._save_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if is_last_batch(trainer):
            return  # the epoch-end checkpoint follows, after the epoch-end lambda update
        if self._validation_follows(trainer) and not self._should_save_on_train_epoch_end(trainer):
            # A held-out evaluation runs after this batch: save when it ends (ModelCheckpoint.on_validation_end),
            # so the checkpoint holds its history point and a kill during the evaluation loses nothing.
            every = self._every_n_train_steps
            if every >= 1 and trainer.global_step % every == 0:
                self._defer_save_until_validation = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @staticmethod
    def _validation_follows(trainer) -> bool:
        """Lightning's own test for a batch-count validation cadence (check_val_every_n_epoch=None)."""
        every = trainer.val_check_batch
        if trainer.check_val_every_n_epoch is not None or not isinstance(every, int) or every < 1:
            return False
        return (total_batch_idx(trainer) + 1) % every == 0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Lightning calls this after the module's own on_train_epoch_end (checkpoint callbacks last).
        if trainer.sanity_checking or bool(trainer.fast_dev_run):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Only SIGTERM: after any other error (NaN loss, bad data) the last good checkpoint must stay.
        if is_sigterm(exception) and not trainer.sanity_checking:
            candidates = self._monitor_candidates(trainer)
            if self._last_global_step_saved != trainer.global_step:
                self._save_last_checkpoint(trainer, candidates)
            self.sigterm_checkpoint = self.last_model_path or None

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step == 0:
            raise TrainingError("the run trained on zero batches (nothing to measure): check "
                                "trainer.limit_train_batches, trainer.max_steps and the data size")
        super().on_train_end(trainer, pl_module)
