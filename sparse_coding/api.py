"""`measure(overrides)`: the whole `train.py` run from Python (for notebooks).

    import sparse_coding
    result = sparse_coding.measure(["data=sparse_linear", "data.dim=64", "trainer.max_epochs=2", "logger=none"])
    result["normalized_loss"]

The same config, validation and outputs as `python train.py OVERRIDES`; the run directory is
`out_dir=DIR` when given, else `outputs/DATE/TIME-RUNID` under the current directory. A bad config
raises `ConfigError` (one line saying what to change) instead of exiting; a missing or damaged input raises
`DataError`, and a full disk, NaN in training or SIGTERM the other `errors.SparseCodingError` classes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

from sparse_coding.errors import ConfigError


def compose(overrides: Iterable[str] = ()):
    """The composed, validated run config for Hydra override strings."""
    return compose_and_plan(overrides)[0]


def compose_and_plan(overrides: Iterable[str] = ()):
    """(the composed, validated run config, its plan) for Hydra override strings."""
    from sparse_coding.config.checks import check_trainable, validate
    from sparse_coding.config.compose import compose_config
    from sparse_coding.config.overrides import check_overrides, one_line

    if isinstance(overrides, str) or not hasattr(overrides, "__iter__"):
        raise ConfigError(f"overrides must be a list of strings like ['model=minilm', 'layer=3'], not {overrides!r}")
    checked = check_overrides(list(overrides))  # a misspelled key or a wrong type: one line naming the fix
    try:
        cfg = compose_config(checked)
        plan = validate(cfg)
    except Exception as e:  # noqa: BLE001 - what check_overrides cannot see (an interpolation, a config file's own error)
        if not type(e).__module__.startswith(("hydra", "omegaconf")):
            raise
        raise ConfigError(f"cannot compose the config from {' '.join(checked) or '(no overrides)'}: {one_line(e)}") from None
    check_trainable(cfg)
    return cfg, plan


def default_out_dir() -> Path:
    from sparse_coding.paths import run_id

    return Path("outputs") / time.strftime("%Y-%m-%d") / f"{time.strftime('%H-%M-%S')}-{run_id()}"


def measure(overrides: Iterable[str] = ()) -> dict:
    """Train and evaluate like `python train.py OVERRIDES`; returns the metrics dict of metrics.json."""
    cfg, plan = compose_and_plan(overrides)
    from sparse_coding.lifecycle.rundir import start_run
    from sparse_coding.run import run

    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir()
    with start_run(out_dir, cfg.ckpt_path, cfg.overwrite):  # never replaces a finished run (see lifecycle.rundir)
        return run(cfg, out_dir, plan=plan)
