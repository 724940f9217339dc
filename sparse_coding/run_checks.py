"""Whether a run can start at all: no unknown settings (one line naming the closest valid key), a Trainer
Lightning accepts, callbacks that can be built, a bank whose members differ, enough held-out data to
measure, and enough memory for the sizes asked for.

Called from `config.validate`; like it, this module imports nothing heavy (no torch, no Lightning): every check reads the config,
/proc and a few small files (the installed Trainer's signature is read from its source with `ast`,
only when `trainer.*` holds a key beyond the schema), and raises `ConfigError` with one line.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import glob
import importlib.util
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Optional

from sparse_coding.errors import ConfigError

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")  # Lightning's names; an unavailable one: Lightning says so
# DDP in every launcher Lightning has: `ddp` re-runs the command for each rank; `ddp_spawn`, `ddp_fork` and
# `ddp_notebook` start worker processes (sparse_coding.trainer brings rank 0's run state back from them).
DDP_STRATEGIES = tuple(f"{base}{suffix}" for base in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
                       for suffix in ("", "_find_unused_parameters_false", "_find_unused_parameters_true"))
STRATEGIES = ("auto", "single_device", *DDP_STRATEGIES)
SHARDING = ("fsdp", "deepspeed", "xla", "single_xla", "single_tpu")  # prefixes of strategies that shard or move Phi
PRECISIONS = ("32-true", "32")
MIN_VAL_ROWS = 2  # fvu divides by the held-out variance: one row has none
# Trainer arguments the run sets itself, and where the setting lives instead
RUN_OWNED = {
    "logger": "choose it with logger=wandb|csv|none",
    "callbacks": "add a callback under callbacks.NAME (conf/callbacks/)",
    "default_root_dir": "the run directory is out_dir (or hydra.run.dir)",
    "val_check_interval": "the held-out evaluation cadence is convergence.eval_every (training samples)",
    "check_val_every_n_epoch": "the held-out evaluation cadence is convergence.eval_every (training samples)",
    "max_time": "the time budget is convergence.max_minutes",
    "num_sanity_val_steps": "every held-out evaluation is a measurement, so the run does no sanity check",
    "use_distributed_sampler": "the data modules split every global batch across ranks themselves",
    "accumulate_grad_batches": "the module steps its optimizer itself (manual optimization): raise data.batch_size",
}
RUN_TRAINER_KEYS = ("checkpoint_every_n_steps",)  # trainer.* settings of the run that are not Trainer arguments
NEEDS_LOGGER = ("LearningRateMonitor", "DeviceStatsMonitor", "ThroughputMonitor")  # callbacks that log


def check_run(cfg: Any, schema: type, dim: Optional[int]) -> None:
    """Every check of this module; `dim` is the data width when known (None: skip the memory estimate)."""
    check_known_keys(cfg, schema)
    check_trainer(cfg.trainer)
    check_callbacks(cfg)
    check_bank(cfg.dictionary)
    if cfg.model is None and cfg.data.name != "cache" and cfg.data.n_val < MIN_VAL_ROWS:
        raise ConfigError(f"data.n_val={cfg.data.n_val} is too few held-out samples to measure (fvu needs their "
                          f"variance): use data.n_val >= {MIN_VAL_ROWS}")
    if dim is not None:
        check_memory(cfg, dim)


# --------------------------------------------------------------------------------------------
# Unknown keys


@functools.lru_cache(maxsize=None)
def trainer_arguments() -> frozenset:
    """The keyword arguments of the installed `pytorch_lightning.Trainer`.

    Read from its source with `ast` (~15 ms; importing Lightning costs seconds), falling back to the
    imported signature when the source cannot be read.
    """
    try:
        package = importlib.util.find_spec("pytorch_lightning")
        source = Path(list(package.submodule_search_locations)[0]) / "trainer" / "trainer.py"
        tree = ast.parse(source.read_text())
        init = next(f for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "Trainer"
                    for f in c.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
        return frozenset(a.arg for a in init.args.args[1:] + init.args.kwonlyargs)
    except (AttributeError, OSError, StopIteration, SyntaxError, TypeError, ValueError):
        import inspect

        import pytorch_lightning

        return frozenset(p for p in inspect.signature(pytorch_lightning.Trainer.__init__).parameters if p != "self")


def config_groups() -> list[str]:
    """The config groups of conf/ (data, model, trainer, callbacks, experiment, …)."""
    from sparse_coding.paths import config_dir

    root = config_dir()
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def run_schema() -> type:
    from sparse_coding.config import RunConfig  # config imports this module

    return RunConfig


def _sections(schema: type, prefix: str = "") -> dict[str, type]:
    """Every section of the run config ('' the top, 'data', …) and its dataclass."""
    out = {prefix.rstrip("."): schema}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        sub = dataclass_in(hints.get(f.name))
        if sub is not None:
            out.update(_sections(sub, f"{prefix}{f.name}."))
    return out


def _section_keys(section: str) -> Optional[list[str]]:
    """The keys a section has (None: not a section); under `trainer` also every Trainer argument."""
    schema = _sections(run_schema()).get(section)
    if schema is None:
        return None
    keys = [f.name for f in dataclasses.fields(schema)]
    if section == "trainer":
        keys += sorted(trainer_arguments() - set(keys))
    return keys


def closest_key(key: str) -> Optional[str]:
    """The valid key a misspelled one most likely meant: its section's name corrected (`dictonary.mult`), the
    same name in another section (`data.lam` -> `dictionary.lam`), a close name in its section
    (`dictionary.mutl` -> `dictionary.mult`), else the closest dotted key of the whole config."""
    sections = _sections(run_schema())
    section, _, leaf = key.rpartition(".")
    if section not in sections:
        fixed = difflib.get_close_matches(section, [s for s in sections if s], n=1, cutoff=0.6)
        if not fixed:
            return None
        if leaf in (_section_keys(fixed[0]) or []):
            return f"{fixed[0]}.{leaf}"
        section = fixed[0]
    everywhere = [f"{s}.{k}" if s else k for s in sections for k in _section_keys(s) or []]
    same = [k for k in everywhere if k.rpartition(".")[2] == leaf and k != key]
    if same:
        return same[0]
    within = (_section_keys(section) or []) + (config_groups() if section == "" else [])
    match = difflib.get_close_matches(leaf, within, n=1, cutoff=0.6)
    if match:
        return f"{section}.{match[0]}" if section else match[0]
    match = difflib.get_close_matches(key, everywhere, n=1, cutoff=0.75)
    return match[0] if match else None


def unknown_key_message(key: str) -> str:
    """One line for a setting the run config does not have, naming the closest valid one."""
    guess = closest_key(key)
    if guess:
        return f"unknown setting {key}: did you mean {guess}?"
    section = key.rpartition(".")[0]
    known = _section_keys(section)
    if known is None:
        return f"unknown setting {key}: the run config has no such key (`python train.py --cfg job` lists them)"
    if section == "trainer":
        listed = f"{', '.join(f.name for f in dataclasses.fields(_sections(run_schema())['trainer']))} and every " \
                 "argument of pytorch_lightning.Trainer"
    else:
        listed = ", ".join(known)
    return f"unknown setting {key}: {section or 'the run config'} has no such key (it has: {listed})"


def check_known_keys(cfg: Any, schema: type, prefix: str = "") -> None:
    """Every key of a composed config is a field of its dataclass schema, recursively (under `trainer`
    also any argument of the installed Trainer; check_trainer checks their use).

    Hydra's `+key=value` adds keys even to a typed (struct) config; without this check such a setting
    would be silently ignored (`+dictionary.mutl=4`).
    """
    if dataclasses.is_dataclass(cfg) or not hasattr(cfg, "keys"):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        if key not in fields and not (prefix == "trainer." and key in trainer_arguments()):
            raise ConfigError(unknown_key_message(f"{prefix}{key}"))
    hints = typing.get_type_hints(schema)
    for name in fields:
        sub = dataclass_in(hints.get(name))
        value = cfg.get(name) if hasattr(cfg, "get") else None
        if sub is not None and value is not None:
            check_known_keys(value, sub, f"{prefix}{name}.")


def dataclass_in(hint: Any) -> Optional[type]:
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


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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


def trainer_items(t: Any) -> dict:
    """`trainer.*` as a plain {key: value} (a DictConfig may hold Trainer arguments beyond the schema)."""
    if dataclasses.is_dataclass(t):
        return {f.name: getattr(t, f.name) for f in dataclasses.fields(t)}
    return {k: t.get(k) for k in t.keys()}


def check_trainer(t: Any) -> None:
    """The trainer.* settings Lightning would otherwise reject after seconds of start-up (or misuse).

    Any Trainer argument may be set; the ones the run sets itself are refused with where they live,
    and the ones that would change what is measured are checked: no half precision, no strategy
    that shards Phi, several processes only under DDP, devices the machine has.
    """
    items = trainer_items(t)
    for key, where in RUN_OWNED.items():
        if items.get(key) is not None:
            raise ConfigError(f"trainer.{key} is set by the run, not in trainer.*: {where}")
    for key in ("deterministic", "enable_progress_bar"):
        if not isinstance(getattr(t, key), bool):
            raise ConfigError(f"trainer.{key}={getattr(t, key)!r} must be true or false")
    if not _int(t.log_every_n_steps) or t.log_every_n_steps < 1:
        raise ConfigError(f"trainer.log_every_n_steps={t.log_every_n_steps!r} must be an integer >= 1")
    for key in ("limit_train_batches", "limit_val_batches"):
        limit = items.get(key)
        if limit is None:
            continue
        if not _number(limit) or limit <= 0:
            what = "train" if key == "limit_train_batches" else "measure"
            raise ConfigError(f"trainer.{key}={limit!r} would {what} on no batch: use a fraction in (0, 1], a number "
                              "of batches >= 1, or leave it unset")
        if isinstance(limit, float) and limit > 1 and limit != int(limit):
            raise ConfigError(f"trainer.{key}={limit!r}: use a fraction in (0, 1] or a whole number of batches")
    clip, algorithm = items.get("gradient_clip_val"), items.get("gradient_clip_algorithm")
    if clip is not None and (not _number(clip) or clip < 0):
        raise ConfigError(f"trainer.gradient_clip_val={clip!r} must be a number >= 0 (0 or unset: no clipping)")
    if algorithm is not None and str(algorithm).lower() not in ("norm", "value"):
        raise ConfigError(f"trainer.gradient_clip_algorithm={algorithm!r}: choose norm or value")
    precision = str(t.precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={t.precision!r} is not supported: the solver's stopping rule and the "
                          "metrics are float32 computations; use trainer.precision=32-true")
    strategy = str(t.strategy).lower()
    if strategy.startswith(SHARDING):
        raise ConfigError(f"trainer.strategy={t.strategy} is not supported: every rank must hold the whole Phi and step "
                          "it itself (manual optimization); use trainer.strategy=ddp")
    if strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={t.strategy!r}: choose auto, ddp, ddp_spawn, ddp_fork or ddp_notebook "
                          "(each also with _find_unused_parameters_true|false)")
    if not _int(t.num_nodes) or t.num_nodes < 1:
        raise ConfigError(f"trainer.num_nodes={t.num_nodes!r} must be an integer >= 1")
    accelerator = str(t.accelerator).lower()
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={t.accelerator!r}: choose one of {', '.join(ACCELERATORS)}")
    gpus = visible_gpus()
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus > 0)
    if accelerator in ("gpu", "cuda") and gpus == 0:
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
        if count > limit_n and accelerator not in ("mps", "tpu"):  # those: Lightning counts them
            what = f"{gpus} GPU(s) are visible" if on_gpu else f"this machine has {limit_n} CPU cores"
            raise ConfigError(f"trainer.devices={devices} but {what}: use trainer.devices <= {limit_n}")
    else:
        raise ConfigError(f"trainer.devices={devices!r} must be an integer >= 1, 'auto' or (GPUs) a list of indices")
    if (count > 1 or t.num_nodes > 1) and strategy not in DDP_STRATEGIES:
        raise ConfigError(f"trainer.devices={t.devices!r} / trainer.num_nodes={t.num_nodes} run several processes: "
                          "add trainer.strategy=ddp or ddp_spawn (or trainer=ddp / trainer=ddp_cpu)")
    if t.num_nodes > 1 and not multi_node_launcher():
        raise ConfigError(f"trainer.num_nodes={t.num_nodes} needs a launcher that starts this command on every node "
                          "(SLURM's srun, torchrun, MPI, or MASTER_ADDR, MASTER_PORT and NODE_RANK set on each node); "
                          "none is set here, so the run would wait for the other nodes forever: launch it that way, "
                          "or use trainer.num_nodes=1")


# Environment variables by which Lightning's cluster environments recognise a multi-node launch
MULTI_NODE_ENV = (("MASTER_ADDR", "NODE_RANK"), ("SLURM_NTASKS",), ("TORCHELASTIC_RUN_ID",), ("GROUP_RANK",),
                  ("OMPI_COMM_WORLD_SIZE",), ("PMI_SIZE",), ("LSB_JOBID",))


def multi_node_launcher(environ: Optional[dict] = None) -> bool:
    """Whether this process was started by something that runs the command on several nodes."""
    env = os.environ if environ is None else environ
    return any(all(env.get(k) for k in keys) for keys in MULTI_NODE_ENV)


# --------------------------------------------------------------------------------------------
# callbacks.*


def check_callbacks(cfg: Any) -> None:
    """Each `callbacks.NAME` is a `_target_` entry (or null: left out) that does not steer the measurement."""
    entries = cfg.get("callbacks") if hasattr(cfg, "get") else getattr(cfg, "callbacks", None)
    if entries is None:
        return
    if not hasattr(entries, "items"):
        raise ConfigError(f"callbacks={entries!r} must be a mapping NAME: {{_target_: CLASS, ...}} (conf/callbacks/)")
    named = [n for n, e in entries.items() if hasattr(e, "get") and isinstance(e.get("_target_"), str)]
    for name, entry in entries.items():
        if entry is None:
            continue  # callbacks.NAME=null leaves an entry out
        target = entry.get("_target_") if hasattr(entry, "get") else None
        if not isinstance(target, str) or not target.strip():
            match = difflib.get_close_matches(str(name), [n for n in named if n != name], n=1, cutoff=0.6)
            hint = f"did you mean callbacks.{match[0]}?" if match else \
                f"give its class: callbacks.{name}._target_=pytorch_lightning.callbacks.LearningRateMonitor"
            raise ConfigError(f"callbacks.{name} has no _target_ (the callback class to build): {hint}")
        cls = target.rsplit(".", 1)[-1]
        if cls == "EarlyStopping":
            raise ConfigError(f"callbacks.{name}: EarlyStopping would end the run by its own rule; the run stops when its "
                              "measurement has converged (convergence.tol, convergence.window, convergence.stop)")
        if cls in NEEDS_LOGGER and cfg.logger.name == "none":
            raise ConfigError(f"callbacks.{name} ({cls}) logs through the run's logger: use logger=csv or logger=wandb, "
                              f"or callbacks.{name}=null")


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
        rows = (2 * int(cfg.data.n_val) + batch) if getattr(cfg.data, "fresh", False) else int(cfg.data.n) + int(cfg.data.n_val)
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
