"""Whether a run can start at all: no unknown settings, a Trainer Lightning accepts, a bank whose
members differ, enough held-out data to measure, and enough memory for the sizes asked for.

Called from `config.validate`; like it, this module imports nothing heavy (no torch): every check
reads the config, /proc and a few small files, and raises `ConfigError` with one line.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Optional

from sparse_coding.errors import ConfigError

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
STRATEGIES = ("auto", "ddp")
PRECISIONS = ("32-true", "32")
MIN_VAL_ROWS = 2  # fvu divides by the held-out variance: one row has none


def check_run(cfg: Any, schema: type, dim: Optional[int]) -> None:
    """Every check of this module; `dim` is the data width when known (None: skip the memory estimate)."""
    check_known_keys(cfg, schema)
    check_trainer(cfg.trainer)
    check_bank(cfg.dictionary)
    if cfg.model is None and cfg.data.name != "cache" and cfg.data.n_val < MIN_VAL_ROWS:
        raise ConfigError(f"data.n_val={cfg.data.n_val} is too few held-out samples to measure (fvu needs their "
                          f"variance): use data.n_val >= {MIN_VAL_ROWS}")
    if dim is not None:
        check_memory(cfg, dim)


# --------------------------------------------------------------------------------------------
# Unknown keys


def check_known_keys(cfg: Any, schema: type, prefix: str = "") -> None:
    """Every key of a composed config is a field of its dataclass schema, recursively.

    Hydra's `+key=value` adds keys even to a typed (struct) config; without this check such a setting
    would be silently ignored (`+trainer.gradient_clip_val=1`).
    """
    if dataclasses.is_dataclass(cfg) or not hasattr(cfg, "keys"):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        if key not in fields:
            section = prefix.rstrip(".") or "the run config"
            raise ConfigError(f"unknown setting {prefix}{key}: {section} has no such key and it would be ignored; "
                              f"remove it (known: {', '.join(fields)})")
    hints = typing.get_type_hints(schema)
    for name in fields:
        sub = _dataclass_in(hints.get(name))
        value = cfg.get(name) if hasattr(cfg, "get") else None
        if sub is not None and value is not None:
            check_known_keys(value, sub, f"{prefix}{name}.")


def _dataclass_in(hint: Any) -> Optional[type]:
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):  # Optional[X]
        if dataclasses.is_dataclass(arg):
            return arg
    return None


# --------------------------------------------------------------------------------------------
# trainer.*


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def visible_gpus() -> int:
    """NVIDIA GPUs this process may use, without importing torch (0 when torch is a CPU build)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return 0
    version = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    try:
        match = re.search(r"^cuda\s*(?::[^=]*)?=\s*(.+)$", version.read_text(), re.M)
    except OSError:
        return 0
    if match is None or match.group(1).strip() in ("None", "''", '""'):
        return 0
    n = len(glob.glob("/dev/nvidia[0-9]*"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        n = min(n, len([v for v in visible.split(",") if v.strip() and v.strip() != "-1"]))
    return n


def check_trainer(t: Any) -> None:
    """The trainer.* settings Lightning would otherwise reject after seconds of start-up (or misuse)."""
    for key in ("deterministic", "enable_progress_bar"):
        if not isinstance(getattr(t, key), bool):
            raise ConfigError(f"trainer.{key}={getattr(t, key)!r} must be true or false")
    if not _int(t.log_every_n_steps) or t.log_every_n_steps < 1:
        raise ConfigError(f"trainer.log_every_n_steps={t.log_every_n_steps!r} must be an integer >= 1")
    limit = t.limit_train_batches
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
            raise ConfigError(f"trainer.limit_train_batches={limit!r} would train on no batch: use a fraction in "
                              "(0, 1], a number of batches >= 1, or leave it unset")
        if isinstance(limit, float) and limit > 1 and limit != int(limit):
            raise ConfigError(f"trainer.limit_train_batches={limit!r}: use a fraction in (0, 1] or a whole number of batches")
    precision = str(t.precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={t.precision!r} is not supported: the solver's stopping rule and the "
                          "metrics are float32 computations; use trainer.precision=32-true")
    if t.strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={t.strategy!r} is not supported: use auto (one process) or ddp")
    if not _int(t.num_nodes) or t.num_nodes < 1:
        raise ConfigError(f"trainer.num_nodes={t.num_nodes!r} must be an integer >= 1")
    if t.accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={t.accelerator!r}: choose one of {', '.join(ACCELERATORS)}")
    gpus = visible_gpus()
    on_gpu = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and gpus > 0)
    if t.accelerator in ("gpu", "cuda") and gpus == 0:
        raise ConfigError(f"trainer.accelerator={t.accelerator} but no usable GPU is visible (or torch is a CPU build): "
                          "use trainer.accelerator=cpu")
    devices = t.devices
    if type(devices).__name__ == "ListConfig" or isinstance(devices, (list, tuple)):
        devices = list(devices)
        if not on_gpu:
            raise ConfigError(f"trainer.devices={devices!r}: a list of device indices needs GPUs; on CPU give a "
                              "number of processes (e.g. trainer.devices=2 with trainer=ddp_cpu)")
        if not devices or not all(_int(i) and 0 <= i < gpus for i in devices) or len(set(devices)) != len(devices):
            raise ConfigError(f"trainer.devices={devices!r}: give distinct GPU indices in 0..{gpus - 1}")
        count = len(devices)
    elif devices == "auto":
        count = gpus if on_gpu else 1
    elif _int(devices) and (devices >= 1 or (devices == -1 and on_gpu)):
        count = gpus if devices == -1 else devices
        limit_n = gpus if on_gpu else (os.cpu_count() or 1)
        if count > limit_n:
            what = f"{gpus} GPU(s) are visible" if on_gpu else f"this machine has {limit_n} CPU cores"
            raise ConfigError(f"trainer.devices={devices} but {what}: use trainer.devices <= {limit_n}")
    else:
        raise ConfigError(f"trainer.devices={devices!r} must be an integer >= 1, 'auto' or (GPUs) a list of indices")
    if (count > 1 or t.num_nodes > 1) and t.strategy != "ddp":
        raise ConfigError(f"trainer.devices={t.devices!r} / trainer.num_nodes={t.num_nodes} run several processes: "
                          "add trainer.strategy=ddp (or trainer=ddp / trainer=ddp_cpu)")


# --------------------------------------------------------------------------------------------
# Banks


def check_bank(d: Any) -> None:
    """Two bank members that are the same dictionary would write one result over the other."""
    from sparse_coding.config import dictionary_grid

    seen: dict = {}
    for mult, lam in dictionary_grid(d):
        key = (mult, lam if lam == "auto" else float(lam))
        label = f"mult{mult}_lam{lam}"
        if key in seen or label in seen.values():
            raise ConfigError(f"dictionary.mult={_plain(d.mult)} x dictionary.lam={_plain(d.lam)} lists the dictionary "
                              f"(mult={mult}, lam={lam}) twice: remove the duplicate")
        seen[key] = label


def _plain(v: Any) -> Any:
    return list(v) if type(v).__name__ == "ListConfig" else v


# --------------------------------------------------------------------------------------------
# Memory


def memory_estimate(cfg: Any, dim: int) -> dict[str, int]:
    """Bytes a run holds at its peak, by part (a lower bound: what it cannot run without)."""
    from sparse_coding.config import dictionary_grid

    grid = dictionary_grid(cfg.dictionary)
    f32 = 4
    m_all = [mult * dim for mult, _ in grid]
    m_max = max(m_all)
    per_param = 4 if cfg.dictionary.optimizer == "adam" else 3  # Phi, its gradient, (Adam's two moments)
    batch = max(int(cfg.data.batch_size), 1)
    eval_batch = max(int(cfg.solver.eval_batch_size), 1)
    parts = {
        "dictionaries (Phi, gradient, optimizer state, feature counters)": sum(m * dim * f32 * per_param + m * 16 for m in m_all),
        "Gram matrix": m_max * m_max * f32,
        "training scores and coefficients": 3 * batch * m_max * f32,
        "evaluation scores and coefficients": 3 * eval_batch * m_max * f32,
    }
    if cfg.model is None and cfg.data.name != "cache":
        # a fixed sample holds n + n_val rows; fresh data the held-out set, as many in-sample rows and a batch
        rows = (2 * int(cfg.data.n_val) + batch) if cfg.data.get("fresh", False) else int(cfg.data.n) + int(cfg.data.n_val)
        width = 4 * dim if cfg.data.name in ("sparse_linear", "sparse_nonlinear") else dim
        parts["generated data"] = rows * dim * f32 + rows * width * 8
    else:
        parts["shuffle buffer"] = 2 * int(cfg.data.shuffle_buffer) * dim * f32
    return parts


def available_memory() -> Optional[int]:
    """Bytes this process may still allocate: MemAvailable, capped by a ulimit -v and a cgroup limit."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    except (ImportError, OSError, ValueError):
        pass
    for max_file, cur_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),):
        try:
            top = open(max_file).read().strip()
            if top != "max":
                limits.append(int(top) - int(open(cur_file).read().strip()))
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None


def check_memory(cfg: Any, dim: int) -> None:
    parts = memory_estimate(cfg, dim)
    if cfg.trainer.accelerator in ("gpu", "cuda") or (cfg.trainer.accelerator == "auto" and visible_gpus() > 0):
        parts = {k: v for k, v in parts.items() if k in ("generated data", "shuffle buffer")}  # the rest is on the GPU
    need = sum(parts.values())
    have = available_memory()
    if have is None or need <= have:
        return
    biggest = sorted(parts.items(), key=lambda kv: -kv[1])[:2]
    detail = ", ".join(f"{name} {_gib(b)}" for name, b in biggest)
    raise ConfigError(f"this run needs at least {_gib(need)} of memory ({detail}) but only {_gib(have)} is available: "
                      "lower dictionary.mult, data.batch_size, solver.eval_batch_size or data.n")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"
