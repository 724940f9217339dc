"""One measurement run: build data, learn the dictionaries, evaluate, write the outputs.

Outputs in the run directory: `metrics.json` (final held-out metrics per dictionary, lambda,
sizes and, for synthetic data, the ground truth), `dictionary.safetensors` + `dictionary.json`
(Phi and its config), `plots/`, Lightning checkpoints and the logger's files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from sparse_coding.config import SYNTHETIC_DATA, dictionary_grid
from sparse_coding.module import SparseCodingModule


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    if cfg.model is None and cfg.data.name in SYNTHETIC_DATA:
        from sparse_coding.datamodule import SyntheticDataModule

        return SyntheticDataModule.from_config(cfg)
    from sparse_coding.streaming import CacheDataModule

    if cfg.model is None or (cfg.data.name == "cache" and cfg.data.path is not None):
        path = Path(cfg.data.path)  # with a model: a given cache of that model (checked by validate)
    else:
        from sparse_coding.cache import ensure_cache

        path = ensure_cache(cfg)
    return CacheDataModule.from_config(cfg, path)


def build_logger(cfg: DictConfig, out_dir: Path):
    name = cfg.logger.name
    if name == "none":
        return False
    if name == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(out_dir), name="csv")
    from pytorch_lightning.loggers import WandbLogger

    os.environ.setdefault("WANDB_MODE", cfg.logger.mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    logger = WandbLogger(
        project=cfg.logger.project,
        save_dir=str(out_dir),
        offline=cfg.logger.mode == "offline",
        group=cfg.logger.group,
        name=cfg.logger.run_name,
        tags=list(cfg.logger.tags),
    )
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return logger


def build_trainer(cfg: DictConfig, out_dir: Path, logger, callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    t = cfg.trainer
    # last.ckpt at every epoch end and, with trainer.checkpoint_every_n_steps=N, every N optimizer steps
    # (mid-epoch: the data loaders store their position, so `ckpt_path=last` resumes at the next batch).
    # save_top_k=1 with no monitor keeps only the newest checkpoint; it is needed because Lightning
    # writes last.ckpt only when it saves some checkpoint (save_top_k=0 never writes one mid-run).
    checkpoint = ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), save_last=True, save_top_k=1,
                                 every_n_train_steps=t.checkpoint_every_n_steps or None)
    return pl.Trainer(
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        deterministic=t.deterministic,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.enable_progress_bar,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_train_batches=t.limit_train_batches,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the data modules split batches across ranks themselves
        default_root_dir=str(out_dir),
        logger=logger,
        callbacks=[checkpoint, *callbacks],
    )


def build_module(cfg: DictConfig, datamodule) -> SparseCodingModule:
    d = cfg.dictionary
    grid = dictionary_grid(d)
    init_rows = None
    if d.init == "data" and hasattr(datamodule, "init_rows"):
        init_rows = datamodule.init_rows(max(m for m, _ in grid) * datamodule.dim, cfg.seed)
    return SparseCodingModule(
        dim=datamodule.dim,
        grid=grid,
        lr=d.lr,
        optimizer=d.optimizer,
        inner_steps=d.inner_steps,
        lam_tol=d.lam_tol,
        lam_init_rounds=d.lam_init_rounds,
        max_steps=cfg.solver.max_steps,
        dead_window=d.dead_window,
        init=d.init,
        seed=cfg.seed,
        init_rows=init_rows,
    )


def run(cfg: DictConfig, out_dir: Path, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """Train and evaluate; returns the metrics dict that is written to metrics.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    logger = build_logger(cfg, out_dir)
    trainer = build_trainer(cfg, out_dir, logger, callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    result = collect_results(cfg, datamodule, module)
    if trainer.world_size > 1:
        result["ddp"] = {"world_size": trainer.world_size, "phi_max_rank_difference": phi_rank_difference(trainer, module)}
    if trainer.is_global_zero:
        write_outputs(out_dir, cfg, module, result)
        if cfg.logger.name == "wandb":
            logger.experiment.summary.update(flatten_for_summary(result))
        print_table(result)
    return result


def phi_rank_difference(trainer: pl.Trainer, module: SparseCodingModule) -> float:
    """Largest |Phi_rank - Phi_rank0| over every rank and dictionary (0.0: all ranks hold the same Phi)."""
    worst = 0.0
    for phi in module.phis:
        gathered = trainer.strategy.all_gather(phi.detach())  # (world, d, m)
        worst = max(worst, float((gathered - gathered[0]).abs().max()))
    return worst


def collect_results(cfg: DictConfig, datamodule, module: SparseCodingModule) -> dict:
    entries = module.final_metrics
    common = {"dim": datamodule.dim, "data": datamodule.describe(), "seed": cfg.seed}
    if datamodule.truth:
        common["truth"] = datamodule.truth
    if len(entries) == 1:
        return {**entries[0], **common}
    return {**common, "dictionaries": entries}


def flatten_for_summary(result: dict) -> dict:
    entries = result.get("dictionaries", [result])
    flat = {}
    for entry in entries:
        prefix = "final" if len(entries) == 1 else f"final/{entry['label']}"
        flat.update({f"{prefix}/{k}": v for k, v in entry.items() if isinstance(v, (int, float))})
    return flat


def write_outputs(out_dir: Path, cfg: DictConfig, module: SparseCodingModule, result: dict) -> None:
    from safetensors.torch import save_file

    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    tensors = {label: phi.detach().cpu().contiguous() for label, phi in zip(module.labels, module.phis)}
    save_file(tensors, str(out_dir / "dictionary.safetensors"))
    meta = {
        "dim": module.hparams.dim,
        "dictionaries": [
            {"tensor": label, "dict_mult": m, "dict_size": m * module.hparams.dim, "lam": module.lam(k)}
            for k, (label, (m, _)) in enumerate(zip(module.labels, module.grid))
        ],
        "layout": "phi is (d, m); columns are unit-norm features",
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    (out_dir / "dictionary.json").write_text(json.dumps(meta, indent=2) + "\n")
    from sparse_coding.plots import plot_run

    plot_run(out_dir, result)


def print_table(result: dict) -> None:
    """One column per dictionary, one row per metric."""
    from rich.console import Console
    from rich.table import Table

    entries = result.get("dictionaries", [result])
    table = Table(title=f"Held-out sparsity metrics (d={result['dim']})")
    table.add_column("metric")
    for e in entries:
        table.add_column(e["label"], justify="right")
    rows = ["normalized_loss", "avg_coef_norm", "l0", "loss", "fvu", "explained_variance", "lam", "dict_size",
            "dead_fraction", "capped_fraction", "mean_steps"]
    for row in rows:
        table.add_row(row, *[f"{e[row]:.4g}" if isinstance(e[row], float) else str(e[row]) for e in entries])
    console = Console()
    console.print(table)
    for e in entries:
        if e["capped_fraction"] > 0.01:
            console.print(
                f"warning: {e['capped_fraction']:.0%} of samples ({e['label']}) stopped at solver.max_steps; "
                "their coefficients are truncated — raise solver.max_steps for an uncapped measurement"
            )
    if "truth" in result:
        t = result["truth"]
        console.print(
            f"ground truth: a/2 = {t['ground_truth']:.4g}, true avg_coef_norm = {t['true_avg_coef_norm']:.4g}, "
            f"true l0 = {t['true_l0']:.4g}"
        )
