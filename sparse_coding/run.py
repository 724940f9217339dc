"""One measurement run: build data, learn the dictionaries, evaluate, write the outputs.

Outputs in the run directory: `metrics.json` (final held-out metrics per dictionary, lambda,
sizes and, for synthetic data, the ground truth), `dictionary.safetensors` + `dictionary.json`
(Phi and its config), `plots/`, Lightning checkpoints and the logger's files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from sparse_coding.config.checks import check_trainable
from sparse_coding.config.plan import RunPlan, resolve
from sparse_coding.config.trainer import PerRankLoaders, build_trainer  # the Trainer from conf/trainer and conf/callbacks
from sparse_coding.convergence import (ConvergenceMonitor, check_train_batches, eval_every_samples,
                                      insufficient_sample_advice, resolution_note, sample_sufficiency,
                                      trainer_schedule, unconverged_advice)
from sparse_coding.lifecycle.resume import resume_checkpoint
from sparse_coding.lifecycle.rundir import own_run_dir
from sparse_coding.loggers import build_logger, finish_logger, log_run_files
from sparse_coding.module import SparseCodingModule
from sparse_coding.outputs import collect_results, print_table, write_outputs


def build_datamodule(cfg: DictConfig, plan: RunPlan) -> pl.LightningDataModule:
    if plan.data.source == "synthetic":
        from sparse_coding.data.synthetic_datamodule import SyntheticDataModule

        return SyntheticDataModule.from_config(cfg)
    from sparse_coding.data.cache_datamodule import CacheDataModule

    if plan.data.source == "cache":
        path = Path(plan.data.path)  # with a model: a given cache of that model (checked by validate)
    else:
        from sparse_coding.cache.build import ensure_cache

        check_trainable(cfg)  # layer=all validates (a cache build) but is no run: refused before every layer is built
        path = ensure_cache(cfg, model=plan.data.model)
    return CacheDataModule.from_config(cfg, plan.data, path)


def build_module(cfg: DictConfig, plan: RunPlan, datamodule) -> SparseCodingModule:
    d = cfg.dictionary
    init_rows = None
    if d.init == "data" and hasattr(datamodule, "init_rows"):
        init_rows = datamodule.init_rows(max(m.mult for m in plan.grid) * datamodule.dim, cfg.seed)
    return SparseCodingModule(
        dim=datamodule.dim,
        grid=plan.pairs,
        lr=d.lr,
        optimizer=d.optimizer,
        inner_steps=d.inner_steps,
        lam_tol=d.lam_tol,
        lam_init_rounds=d.lam_init_rounds,
        lam_round_every=lambda_round_batches(cfg, datamodule),
        max_steps=cfg.solver.max_steps,
        tol=cfg.solver.tol,
        dead_window=d.dead_window,
        init=d.init,
        seed=cfg.seed,
        init_rows=init_rows,
        epoch_batches=datamodule.batches_per_epoch(),
        eval_groups=datamodule.eval_groups,
        in_sample_groups=datamodule.in_sample_groups if hasattr(datamodule, "in_sample_groups") else datamodule.eval_groups,
    )


def lambda_round_batches(cfg: DictConfig, datamodule) -> int:
    """Auto-lambda rounds: every held-out evaluation interval when training to convergence, else per epoch (0)."""
    if not cfg.convergence.stop:
        return 0
    batch = int(cfg.data.batch_size)
    return eval_every_samples(cfg, datamodule.val_rows, batch) // batch


def run(cfg: DictConfig, out_dir: Path, callbacks: Sequence[pl.Callback] = (), *, plan: RunPlan | None = None) -> dict:
    """Train and evaluate; returns the metrics dict that is written to metrics.json.

    `plan`: what `config.checks.validate(cfg)` returned (without it the config is resolved here, unchecked).
    The run owns `out_dir` while it runs (a lock: a second run on it stops with one line).
    """
    with own_run_dir(out_dir):
        return _run(cfg, plan or resolve(cfg), out_dir, callbacks)


def _run(cfg: DictConfig, plan: RunPlan, out_dir: Path, callbacks: Sequence[pl.Callback] = ()) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg, plan)
    module = build_module(cfg, plan, datamodule)
    # before the logger and the Trainer: a refused resume (other settings or data, a finished run) writes nothing
    ckpt_path = resume_checkpoint(cfg.ckpt_path, out_dir, module, cfg.trainer, datamodule)
    check_train_batches(cfg, datamodule.batches_per_epoch())
    logger = build_logger(cfg, out_dir)
    c = cfg.convergence
    schedule = trainer_schedule(cfg, datamodule.val_rows, int(cfg.data.batch_size), datamodule.epoch_batch_sizes())
    monitor = ConvergenceMonitor(c.window, c.tol, c.stop, c.max_samples, c.max_minutes,
                                 train_rows=getattr(datamodule, "train_rows", None),
                                 is_cache=plan.data.source != "synthetic",
                                 fixed_rows=cfg.get("activation") == "token_embeddings",
                                 max_steps_from=schedule.pop("max_steps_from"))
    failed = True
    try:
        trainer = build_trainer(plan, out_dir, logger, [monitor, *callbacks], schedule)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        # the final measurement: held-out rows and, beside them, as many training rows (in-sample)
        trainer.validate(module, dataloaders=PerRankLoaders(datamodule, "val_dataloader", "in_sample_dataloader"),
                         verbose=False)  # built by each rank (ddp_spawn: not in the main process)
        result = collect_results(cfg, datamodule, module)
        result.update(monitor.report(module))
        result.update(sample_sufficiency(result, c.gap_tol))
        if trainer.world_size > 1:
            result["ddp"] = {"world_size": trainer.world_size,
                             "phi_max_rank_difference": phi_rank_difference(trainer, module)}
        if trainer.is_global_zero:
            write_outputs(out_dir, cfg, module, result, datamodule)  # the final validate() detached it from the trainer
            if cfg.logger.name == "wandb":
                log_run_files(logger, out_dir, result)
            print_table(result)
            for advice in (unconverged_advice(result), insufficient_sample_advice(result, cfg, datamodule),
                           resolution_note(result, c.tol)):
                if advice:
                    print(advice)
        failed = False
    finally:
        finish_logger(logger, failed)  # each run (multirun job, agent run) gets its own W&B run
    return result


def phi_rank_difference(trainer: pl.Trainer, module: SparseCodingModule) -> float:
    """Largest |Phi_rank - Phi_rank0| over every rank and dictionary (0.0: all ranks hold the same Phi)."""
    worst = 0.0
    for phi in module.phis:
        gathered = trainer.strategy.all_gather(phi.detach())  # (world, d, m)
        worst = max(worst, float((gathered - gathered[0]).abs().max()))
    return worst


