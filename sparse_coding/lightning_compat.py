"""Every Lightning internal this project relies on, in one place (pyproject.toml: pytorch-lightning>=2.6,<3).

Lightning's public API does not offer a few things the run needs: whether this step's statistics go to the
logger, the training position inside an epoch (for mid-epoch checkpoints and resumes), the checkpoint dict
without Lightning's writer (atomic writes), the multiprocessing launcher (spawned DDP that brings rank 0's run
state back). The call sites use the functions below instead of reaching into the Trainer, so a Lightning
upgrade that moves one of them is mended here. Where the project subclasses a Lightning class and
overrides or sets its private members (AtomicCheckpoint, PassProgressBar, SpawnDDPStrategy, _RunStateLauncher),
the members are listed in `PRIVATE_METHODS` and `PRIVATE_ATTRIBUTES`; `missing_members()` checks them all against the installed
Lightning (tests/test_lightning_compat.py), and importing this module fails with one line when one is gone.

Public API used instead of an internal: RICH_AVAILABLE (lightning_utilities' RequirementCache, the same test
Lightning's own `_RICH_AVAILABLE` makes).
"""

from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
from lightning_utilities.core.imports import RequirementCache
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

SUPPORTED = ">=2.6,<3"  # pyproject.toml's bound: the versions these members were checked against

# RichProgressBar needs rich>=10.2.2 (Lightning's own requirement string)
RICH_AVAILABLE = bool(RequirementCache("rich>=10.2.2"))

# Lightning's multiprocessing launcher (ddp_spawn / ddp_fork), subclassed by sparse_coding.config.trainer._RunStateLauncher
MultiProcessingLauncher = _MultiProcessingLauncher


def attached_trainer(module: pl.LightningModule) -> Optional[pl.Trainer]:
    """The Trainer a module is attached to, or None (`module.trainer` raises when there is none)."""
    return module._trainer


def should_update_logs(trainer: pl.Trainer) -> bool:
    """Whether this training step's logged values reach the logger (every trainer.log_every_n_steps)."""
    return bool(trainer._logger_connector.should_update_logs)


def is_last_batch(trainer: pl.Trainer) -> bool:
    """Whether the batch just trained was the last of its epoch (False when a budget ended the epoch early)."""
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def total_batch_idx(trainer: pl.Trainer) -> int:
    """The index of the current training batch counted over all epochs (0-based)."""
    return int(trainer.fit_loop.epoch_loop.total_batch_idx)


def dump_checkpoint(trainer: pl.Trainer, weights_only: Optional[bool] = False) -> dict:
    """The checkpoint dict Lightning would save now (every rank must call it: it may gather state)."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only)


def checkpoint_epochs_done(checkpoint: dict) -> int:
    """Completed training epochs recorded in a checkpoint's loop state (0 when absent)."""
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop", {})
    return int(fit_loop.get("epoch_progress", {}).get("current", {}).get("processed", 0))


# Private members of Lightning classes that the project's subclasses override or call (methods) and set (attributes).
PRIVATE_METHODS: dict[type, tuple[str, ...]] = {
    ModelCheckpoint: ("_save_checkpoint", "_should_save_on_train_epoch_end", "_monitor_candidates",  # AtomicCheckpoint
                      "_save_topk_checkpoint", "_save_last_checkpoint"),
    RichProgressBar: ("_get_train_description",),  # sparse_coding.progress.PassProgressBar
    DDPStrategy: ("_configure_launcher",),  # sparse_coding.config.trainer.SpawnDDPStrategy
    _MultiProcessingLauncher: ("_collect_rank_zero_results", "_wrapping_function"),  # sparse_coding.config.trainer._RunStateLauncher
}
PRIVATE_ATTRIBUTES: dict[type, tuple[str, ...]] = {
    ModelCheckpoint: ("_every_n_train_steps", "_last_global_step_saved", "_last_checkpoint_saved",
                      "_defer_save_until_validation"),
    DDPStrategy: ("_launcher", "_start_method"),
    _MultiProcessingLauncher: ("_strategy",),
}
# Members used on Trainer internals by the functions above: (object path from a Trainer, member)
TRAINER_MEMBERS = (("_logger_connector", "should_update_logs"), ("_checkpoint_connector", "dump_checkpoint"),
                   ("fit_loop.epoch_loop", "batch_progress"), ("fit_loop.epoch_loop", "total_batch_idx"))


def _instances() -> dict[type, Any]:
    """A cheap instance of each class (instance attributes are set in __init__, not on the class)."""
    strategy = DDPStrategy(start_method="spawn")
    return {ModelCheckpoint: ModelCheckpoint(), DDPStrategy: strategy,
            _MultiProcessingLauncher: _MultiProcessingLauncher(strategy, start_method="spawn")}


def missing_members(trainer: Optional[pl.Trainer] = None) -> list[str]:
    """The Lightning members this project relies on that the installed Lightning lacks ([]: all there).
    Attributes are looked up on a fresh instance; with `trainer`, the Trainer internals too."""
    missing = [f"{cls.__name__}.{name}" for cls, names in PRIVATE_METHODS.items() for name in names
               if not callable(getattr(cls, name, None))]
    instances = _instances()
    for cls, names in PRIVATE_ATTRIBUTES.items():
        missing += [f"{cls.__name__}.{name}" for name in names if not hasattr(instances[cls], name)]
    if trainer is not None:
        for path, name in TRAINER_MEMBERS:
            obj: Any = trainer
            try:
                for part in path.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                missing.append(f"Trainer.{path}")
                continue
            if not hasattr(obj, name):
                missing.append(f"Trainer.{path}.{name}")
    return missing


# On import, the methods the subclasses override must exist: one line instead of a silently skipped override.
_gone = [f"{cls.__name__}.{name}" for cls, names in PRIVATE_METHODS.items() for name in names
         if not callable(getattr(cls, name, None))]
if _gone:
    raise ImportError(f"pytorch-lightning {pl.__version__} lacks {', '.join(_gone)}, which sparse_coding relies on "
                      f"(supported: pytorch-lightning{SUPPORTED}; make setup installs the tested version)")
