"""The experiment logger of a run: W&B (offline by default), CSV or none."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


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
