"""The experiment logger of a run: W&B, CSV or none; one W&B run per training run.

W&B mode, first match wins: `logger.mode` when you set it; else the environment's `WANDB_MODE`;
else `online` inside a `wandb agent` (it sets `WANDB_SWEEP_ID`); else `offline`. So the sweep
files reach the server under a real agent, and a plain run never needs a login.

The W&B run config holds the Hydra config only, nested and as flat dotted keys (`data.dim`, ...).
Lightning also hands every logger the module's constructor arguments (`save_hyperparameters` ->
`logger.log_hyperparams`: `dim`, `grid`, `lr`, `max_steps`, `tol`, ...); `RunWandbLogger` drops those,
since each repeats a Hydra key under another name (`max_steps` would read as `trainer.max_steps`, it is
`solver.max_steps`). `logger.entity`, `logger.group`, `logger.job_type`, `logger.tags`, `logger.run_name`
go to `wandb.init`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from sparse_coding.errors import ConfigError
from sparse_coding.paths import run_id

_claimed_ids: set[str] = set()


def wandb_mode(configured: Optional[str], environ: Mapping[str, str] = os.environ) -> str:
    """The W&B mode of a run (see the module docstring for the rule)."""
    if configured:
        return configured
    env = environ.get("WANDB_MODE")
    if env:
        return "offline" if env == "dryrun" else env
    if environ.get("WANDB_SWEEP_ID"):
        return "online"
    return "offline"


def flat_config(cfg: Any, prefix: str = "") -> dict:
    """A nested config as dotted keys {"data.dim": 256, ...} (lists stay values)."""
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        else:
            out[name] = value
    return out


def _wandb_id() -> Optional[str]:
    """The process run id for the process's first W&B run (it names the run directory); later runs
    (Hydra multirun jobs) get fresh ids from wandb. An agent's WANDB_RUN_ID is read by wandb itself."""
    if os.environ.get("WANDB_RUN_ID"):
        return None
    rid = run_id()
    if rid in _claimed_ids:
        return None
    _claimed_ids.add(rid)
    return rid


class RunWandbLogger(WandbLogger):
    """A WandbLogger that ignores Lightning's `log_hyperparams` (the module's constructor arguments);
    the run logs its Hydra config with `log_config`."""

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:  # noqa: ARG002 - Lightning's call
        return None

    def log_config(self, config: dict) -> None:
        """The run's Hydra config, nested and as flat dotted keys."""
        # The flat keys survive a sweep: its parameters (`model`, `data`, `data.dim`) are locked config
        # keys, and wandb drops an update to a locked key, nested section included.
        super().log_hyperparams({**config, **flat_config(config)})


def check_online_login(wandb: Any) -> None:
    """W&B online needs credentials. Without them wandb.init raises deep inside the run, or at a terminal waits
    for a key to be typed: one line (exit 2) instead, before anything is logged."""
    try:
        found = wandb.login(prompt=False, verify=False)  # WANDB_API_KEY, a settings file or .netrc; no network
    except TypeError:  # a wandb without `prompt`: wandb.init reports a missing key itself
        return
    except Exception as e:  # noqa: BLE001 - a damaged .netrc or settings file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ConfigError(f"W&B is online but cannot read its credentials ({first}): fix them with `wandb login`, "
                          "or use logger.mode=offline") from None
    if not found:
        raise ConfigError("W&B is online (logger.mode, WANDB_MODE or a wandb agent) but has no API key here: run "
                          "`wandb login` (or set WANDB_API_KEY), or use logger.mode=offline and upload later with "
                          "`wandb sync RUN/wandb/offline-run-*`")


def build_logger(cfg: DictConfig, out_dir: Path):
    name = cfg.logger.name
    if name == "none":
        return False
    if name == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(out_dir), name="csv")
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    if wandb.run is not None:  # a run left open by an earlier job of this process: never log into it
        wandb.finish()
    log = cfg.logger
    # `mode` goes to wandb.init; WandbLogger(offline=True) would overwrite WANDB_MODE for the whole process.
    # Unset entity/group/job_type are left to wandb (its environment variables: WANDB_ENTITY, WANDB_RUN_GROUP, ...).
    extra = {key: log.get(key) for key in ("entity", "group", "job_type") if log.get(key) is not None}
    if wandb_mode(log.mode) == "online":
        check_online_login(wandb)
    logger = RunWandbLogger(
        project=log.project,
        save_dir=str(out_dir),
        id=_wandb_id(),
        name=log.run_name,
        tags=list(log.tags or []),
        mode=wandb_mode(log.mode),
        **extra,
    )
    logger.log_config(OmegaConf.to_container(cfg, resolve=True))
    return logger


def flatten_for_summary(result: dict) -> dict:
    """A run's result as W&B summary keys: `final/KEY` (`final/LABEL/KEY` for each dictionary of a bank), the
    numbers of each dictionary and of its in-sample measurement (`.../in_sample/KEY`)."""
    entries = result.get("dictionaries", [result])
    flat = {}
    for entry in entries:
        prefix = "final" if len(entries) == 1 else f"final/{entry['label']}"
        flat.update({f"{prefix}/{k}": v for k, v in entry.items() if isinstance(v, (int, float))})
        flat.update({f"{prefix}/in_sample/{k}": v for k, v in entry.get("in_sample", {}).items()})
    return flat


def log_run_files(logger, out_dir: Path, result: dict) -> None:
    """Summary metrics, the plots as images and the dictionary as an artifact, on the run's W&B run."""
    import wandb

    run = logger.experiment
    run.summary.update(flatten_for_summary(result))
    plots = sorted((out_dir / "plots").glob("*.png"))
    if plots:
        run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in plots})
    files = [out_dir / f for f in ("dictionary.safetensors", "dictionary.json", "metrics.json")]
    if all(f.is_file() for f in files):
        artifact = wandb.Artifact(f"dictionary-{run.id}", type="dictionary",
                                  metadata={k: v for k, v in flatten_for_summary(result).items()})
        for f in files:
            artifact.add_file(str(f))
        run.log_artifact(artifact)


def finish_logger(logger, failed: bool) -> None:
    """Close the run's W&B run (also after a failure), so the next run of this process starts its own."""
    if isinstance(logger, WandbLogger):
        import wandb

        if wandb.run is not None:  # None on DDP ranks > 0, which never start one
            wandb.finish(exit_code=1 if failed else 0)
