"""The run's Lightning Trainer, from conf/trainer and conf/callbacks (the lightning-hydra-template way).

- `build_trainer`: every `trainer.*` setting of the run's plan is passed to `pytorch_lightning.Trainer`
  (sparse_coding.config.checks checked the keys against the installed Trainer's signature and refused the
  ones the run sets itself); the run
  adds what it owns: the evaluation cadence and budget (`convergence.*`), the logger, the run directory,
  its checkpoint and progress bar, and every `callbacks.NAME` built with `hydra.utils.instantiate`. A
  setting Lightning refuses stops with one line (`ConfigError`).
- `GradientClipping`: `trainer.gradient_clip_val` / `gradient_clip_algorithm`. The module steps its own
  optimizer (manual optimization), for which Lightning refuses these arguments; this callback clips in
  `on_before_optimizer_step`, which Lightning calls inside `opt.step()`: after the gradient is final
  (DDP-averaged, its part parallel to Phi removed) and before the update.
- `SpawnDDPStrategy`: `ddp_spawn`, `ddp_fork`, `ddp_notebook`. Lightning's multiprocessing launcher runs
  `fit`/`validate` in worker processes and hands the main process back only the weights and
  `callback_metrics`; the run reads more there afterwards (the module's history and final metrics, the
  callbacks' state, the step counters, Phi on every rank). This launcher brings those back from rank 0.
  `PerRankLoaders`: loaders for `trainer.validate` built in each rank's process, not in the main one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from sparse_coding.config.keys import RUN_OWNED, RUN_TRAINER_KEYS
from sparse_coding.config.overrides import one_line
from sparse_coding.config.plan import RunPlan
from sparse_coding.errors import ConfigError
from sparse_coding.lifecycle.checkpoint import AtomicCheckpoint
from sparse_coding.lightning_compat import RICH_AVAILABLE
from sparse_coding.lightning_compat import MultiProcessingLauncher as _MultiProcessingLauncher
from sparse_coding.progress import PassProgressBar


def build_trainer(plan: RunPlan, out_dir: Path, logger, callbacks: Sequence[pl.Callback] = (),
                  schedule: dict | None = None) -> pl.Trainer:
    """The Lightning Trainer of a run's plan; `schedule` (sparse_coding.convergence.trainer_schedule) sets the
    held-out evaluation cadence and the budget."""
    t = plan.trainer
    schedule = schedule or {"max_steps": t["max_steps"], "val_check_interval": None, "check_val_every_n_epoch": 1,
                            "max_time": None}  # once per epoch
    args, implied = trainer_arguments(t)
    # last.ckpt at every epoch end and, with trainer.checkpoint_every_n_steps=N, every N optimizer steps
    # (mid-epoch: the data loaders store their position, so `ckpt_path=last` resumes at the next batch).
    # save_top_k=1 with no monitor keeps only the newest checkpoint; it is needed because Lightning
    # writes last.ckpt only when it saves some checkpoint (save_top_k=0 never writes one mid-run).
    checkpoint = [] if args.get("enable_checkpointing") is False else [
        AtomicCheckpoint(dirpath=str(out_dir / "checkpoints"), save_last=True, save_top_k=1,
                         every_n_train_steps=t["checkpoint_every_n_steps"] or None)]
    bar = [PassProgressBar()] if t["enable_progress_bar"] and RICH_AVAILABLE else []
    args.update(
        max_steps=schedule["max_steps"],
        max_time=schedule["max_time"],
        val_check_interval=schedule["val_check_interval"],
        check_val_every_n_epoch=schedule["check_val_every_n_epoch"],
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the data modules split batches across ranks themselves
        default_root_dir=str(out_dir),
        logger=logger,
        callbacks=[*checkpoint, *bar, *implied, *callbacks, *config_callbacks(plan.callbacks)],
    )
    try:
        return pl.Trainer(**args)
    except (MisconfigurationException, ValueError) as e:
        raise ConfigError(f"Lightning refused the trainer.* settings: {one_line(e)}") from None


def trainer_arguments(items: dict) -> tuple[dict, list]:
    """The plan's `trainer.*` (plain values) as Trainer keyword arguments, and the callbacks they stand for
    (gradient clipping).

    A value with a `_target_` (a profiler or plugin object) is instantiated; a spawning DDP strategy
    name becomes a SpawnDDPStrategy.
    """
    from hydra.utils import instantiate

    args = {}
    for key, value in items.items():
        if key in RUN_TRAINER_KEYS or key in RUN_OWNED or key == "max_steps":  # max_steps: the schedule's
            continue
        args[key] = instantiate(value, _convert_="all") if _has_target(value) else value
    clip, algorithm = args.pop("gradient_clip_val", None), args.pop("gradient_clip_algorithm", None)
    implied = [GradientClipping(clip, algorithm or "norm")] if clip else []
    strategy = args.get("strategy")
    if isinstance(strategy, str) and strategy.lower().startswith(("ddp_spawn", "ddp_fork", "ddp_notebook")):
        args["strategy"] = SpawnDDPStrategy.from_name(strategy.lower())
    return args, implied


def _has_target(value: Any) -> bool:
    if isinstance(value, dict):
        return "_target_" in value or any(_has_target(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_target(v) for v in value)
    return False


def config_callbacks(entries: dict) -> list[pl.Callback]:
    """Every `callbacks.NAME` entry of the plan, built with hydra.utils.instantiate."""
    from hydra.utils import instantiate

    built = []
    for name, entry in entries.items():
        try:
            callback = instantiate(entry)
        except Exception as e:  # noqa: BLE001 - Hydra wraps whatever the class raised
            raise ConfigError(f"callbacks.{name}: cannot build {entry['_target_']}: {one_line(e)}") from None
        if not isinstance(callback, pl.Callback):
            raise ConfigError(f"callbacks.{name}: {entry['_target_']} is not a Lightning callback (pytorch_lightning.Callback)")
        built.append(callback)
    return built


class GradientClipping(pl.Callback):
    """Clips the gradient before every optimizer step of a manually optimized module."""

    def __init__(self, value: float, algorithm: str = "norm") -> None:
        self.value, self.algorithm = float(value), str(algorithm).lower()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        pl_module.clip_gradients(optimizer, gradient_clip_val=self.value, gradient_clip_algorithm=self.algorithm)


# --------------------------------------------------------------------------------------------
# ddp_spawn / ddp_fork / ddp_notebook


class PerRankLoaders(pl.LightningDataModule):
    """Validation loaders built by each rank in its own process: `trainer.validate(module,
    dataloaders=PerRankLoaders(datamodule, "val_dataloader", "in_sample_dataloader"))`.

    Loaders built by the caller take the caller's rank; under ddp_spawn / ddp_fork the caller is the main
    process, which has none, so every worker would measure rank 0's share (or, for a cache, all rows).
    """

    def __init__(self, datamodule: pl.LightningDataModule, *hooks: str) -> None:
        super().__init__()
        self.datamodule, self.hooks = datamodule, hooks

    def val_dataloader(self) -> list:
        self.datamodule.trainer = self.trainer  # this process's trainer: its rank and world size
        return [getattr(self.datamodule, hook)() for hook in self.hooks]



class SpawnDDPStrategy(DDPStrategy):
    """DDP in worker processes whose main process ends each `fit`/`validate` with rank 0's run state.

    `all_gather` in the main process (outside any process group) answers for a parameter with what the
    ranks held at the end of the last launch: gathered there, before the workers exited.
    """

    @classmethod
    def from_name(cls, name: str) -> "SpawnDDPStrategy":
        """The strategy Lightning's registry gives `name` (ddp_spawn, ddp_fork_find_unused_parameters_true, …)."""
        start = "spawn" if name.startswith("ddp_spawn") else "fork"  # ddp_notebook is ddp_fork
        kwargs = {}
        if name.endswith("_find_unused_parameters_true"):
            kwargs["find_unused_parameters"] = True
        elif name.endswith("_find_unused_parameters_false"):
            kwargs["find_unused_parameters"] = False
        return cls(start_method=start, **kwargs)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gathered_at_end: list[torch.Tensor] = []

    def _configure_launcher(self) -> None:
        self._launcher = _RunStateLauncher(self, start_method=self._start_method)

    def all_gather(self, tensor: torch.Tensor, group: Any = None, sync_grads: bool = False) -> torch.Tensor:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return super().all_gather(tensor, group=group, sync_grads=sync_grads)
        for gathered in self.gathered_at_end:
            if gathered.shape[1:] == tensor.shape and torch.equal(gathered[0], tensor.detach().cpu()):
                return gathered.to(tensor.device)
        raise RuntimeError("all_gather in the main process of a spawned DDP run: only the module's parameters at the "
                           "end of the last fit/validate are known here")


class _RunStateLauncher(_MultiProcessingLauncher):
    """Lightning's multiprocessing launcher, also returning rank 0's module attributes, callback state,
    fit-loop progress and every rank's parameters."""

    def launch(self, function: Any, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        self._strategy.gathered_at_end = []  # not pickled into the workers
        return super().launch(function, *args, trainer=trainer, **kwargs)

    def _wrapping_function(self, process_idx: int, trainer: Any, *args: Any, **kwargs: Any) -> None:
        # mp.spawn puts every tensor it passes in shared memory; Lightning copies the modules' parameters and
        # buffers, but not other tensor attributes such as torchmetrics states: without this, both ranks (and
        # the main process) would add into one held-out sum, and the main process's stale sums would start
        # the next launch's
        if self._start_method == "spawn" and trainer is not None and trainer.lightning_module is not None:
            _unshare_tensor_attributes(trainer.lightning_module)
        super()._wrapping_function(process_idx, trainer, *args, **kwargs)
        # Both ranks leave the process group together, before the worker exits: left to interpreter shutdown,
        # gloo's threads were once torn down mid-exit under load ("terminate called without an active exception").
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def _collect_rank_zero_results(self, trainer: pl.Trainer, results: Any) -> Any:
        # on every rank (a collective), before rank 0 packs its results
        self._gathered = [self._strategy.all_gather(p.detach()).cpu() for p in trainer.lightning_module.parameters()]
        return super()._collect_rank_zero_results(trainer, results)

    def get_extra_results(self, trainer: pl.Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        state = {
            "module": _plain_attributes(trainer.lightning_module, public_only=True),
            "callbacks": [(type(cb).__name__, _plain_attributes(cb)) for cb in trainer.callbacks],
            "fit_loop": trainer.fit_loop.state_dict(),
            "gathered": self._gathered,
        }
        # a file, as Lightning passes the weights: the result queue is a pipe the main process reads only once
        # every worker has exited, so a result larger than the pipe's buffer would never be sent
        folder = tempfile.mkdtemp()
        torch.save(state, os.path.join(folder, "run_state.pt"))
        extra["run_state_folder"] = folder
        return extra

    def update_main_process_results(self, trainer: pl.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        folder = extra["run_state_folder"]
        state = torch.load(os.path.join(folder, "run_state.pt"), weights_only=True)  # our own worker's file: plain data only
        shutil.rmtree(folder, ignore_errors=True)
        module = trainer.lightning_module
        module.trainer = trainer  # attached, as after an in-process fit (its global_step is the trainer's)
        for key, value in state["module"].items():
            setattr(module, key, value)
        for callback, (name, attributes) in zip(trainer.callbacks, state["callbacks"]):
            if type(callback).__name__ == name:
                callback.__dict__.update(attributes)
        trainer.fit_loop.load_state_dict(state["fit_loop"])
        self._strategy.gathered_at_end = state["gathered"]


@torch.no_grad()
def _unshare_tensor_attributes(module: torch.nn.Module) -> None:
    """A private copy of every tensor attribute (and list of tensors) of `module` and its submodules that is
    neither a parameter nor a buffer (those Lightning copies itself)."""
    for sub in module.modules():
        for key, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                sub.__dict__[key] = value.clone()
            elif isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
                sub.__dict__[key] = [v.clone() for v in value]


def _plain_attributes(obj: Any, public_only: bool = False) -> dict[str, Any]:
    """The attributes of `obj` that are data (numbers, strings, tensors, arrays and containers of them)."""
    return {k: v for k, v in vars(obj).items() if not (public_only and k.startswith("_")) and _plain(v)}


def _plain(v: Any, depth: int = 0) -> bool:
    if v is None or isinstance(v, (bool, int, float, str, bytes, torch.Tensor, np.ndarray, np.generic)):
        return not isinstance(v, torch.nn.Parameter)
    if depth > 8:
        return False
    if isinstance(v, (list, tuple)):
        return all(_plain(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(_plain(k, depth + 1) and _plain(x, depth + 1) for k, x in v.items())
    return False
