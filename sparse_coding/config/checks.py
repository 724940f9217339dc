"""Whether a composed run config can start: `validate` checks every value and returns the run's plan.

One line (`ConfigError`) says what to change, on the first problem: a value out of range, an unknown
setting (naming the closest valid key), a Trainer Lightning would refuse, a callback that steers the
measurement, a bank whose members are the same dictionary, too little held-out data, too little
memory. Each value is parsed once, here, into the plan (sparse_coding.config.plan). Nothing heavy is
imported (no torch, no Lightning): the checks read the config, a cache's manifest, a model's
config.json, /proc and the installed Trainer's signature.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Optional

from sparse_coding.config import resources
from sparse_coding.config.keys import RUN_OWNED, check_known_keys
from sparse_coding.config.plan import (ModelPlan, RunPlan, cache_manifest, dictionary_grid, given_cache, resolve,
                                       resolve_model)
from sparse_coding.config.schema import ACTIVATIONS, DATA_NAMES, INITS, LOGGERS, NORMALIZE, OPTIMIZERS, DataConfig
from sparse_coding.errors import ConfigError

SEED_MAX = 2**32 - 1  # numpy and Lightning seed range
SCALE_RANGE = (1e-6, 1e6)  # data.scale: float32 training is tested within this range
NOISE_MAX = 1e6  # data.noise (sigma): beyond it the rows' squared norms leave float32's range
MAX_MINUTES = 1e8  # convergence.max_minutes: 190 years
MIN_VAL_ROWS = 2  # fvu divides by the held-out variance: one row has none
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")  # Lightning's names
# DDP in every launcher Lightning has: `ddp` re-runs the command for each rank; `ddp_spawn`, `ddp_fork` and
# `ddp_notebook` start worker processes (sparse_coding.config.trainer brings rank 0's run state back from them).
DDP_STRATEGIES = tuple(f"{base}{suffix}" for base in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
                       for suffix in ("", "_find_unused_parameters_false", "_find_unused_parameters_true"))
STRATEGIES = ("auto", "single_device", *DDP_STRATEGIES)
SHARDING = ("fsdp", "deepspeed", "xla", "single_xla", "single_tpu")  # prefixes of strategies that shard or move Phi
PRECISIONS = ("32-true", "32")
NEEDS_LOGGER = ("LearningRateMonitor", "DeviceStatsMonitor", "ThroughputMonitor")  # callbacks that log


def validate(cfg: Any) -> RunPlan:
    """Check a composed RunConfig (a DictConfig or the dataclass); raise ConfigError on the first problem.

    Returns the run's plan: every value parsed here once, for the run to read (sparse_coding.run).
    """
    uses_model = cfg.model is not None
    manifest = validate_data(cfg.data, uses_model=uses_model)
    d = cfg.dictionary
    grid = dictionary_grid(d)
    _positive("dictionary.lr", d.lr)
    _positive("dictionary.lam_tol", d.lam_tol)
    _integer("dictionary.inner_steps", d.inner_steps, 1)
    _integer("dictionary.lam_init_rounds", d.lam_init_rounds, 0)
    _integer("dictionary.dead_window", d.dead_window, 1)
    if d.optimizer not in OPTIMIZERS:
        raise ConfigError(f"dictionary.optimizer={d.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if d.init not in INITS:
        raise ConfigError(f"dictionary.init={d.init!r}: choose one of {', '.join(INITS)}")
    _integer("solver.max_steps", cfg.solver.max_steps, 1)
    _integer("solver.eval_batch_size", cfg.solver.eval_batch_size, 1)
    if not _number(cfg.solver.tol) or not 1e-6 <= cfg.solver.tol < 1:
        raise ConfigError(f"solver.tol={cfg.solver.tol!r} must be a number in [1e-6, 1) (relative step tolerance)")
    validate_convergence(cfg.convergence)
    _integer("seed", cfg.seed, 0, SEED_MAX)
    t = cfg.trainer
    _integer("trainer.checkpoint_every_n_steps", t.checkpoint_every_n_steps, 0)
    _integer("trainer.max_epochs", t.max_epochs, -1)
    _integer("trainer.max_steps", t.max_steps, -1)
    for key, value in (("max_epochs", t.max_epochs), ("max_steps", t.max_steps)):
        if value == 0:
            raise ConfigError(f"trainer.{key}=0 trains nothing: give trainer.{key} >= 1, or -1 for no limit")
    c = cfg.convergence
    if t.max_epochs < 1 and t.max_steps < 1 and not (c.stop and (c.max_samples > 0 or c.max_minutes > 0)):
        raise ConfigError("the run has no budget: set trainer.max_epochs >= 1, trainer.max_steps >= 1, or "
                          "convergence.max_samples / convergence.max_minutes (with convergence.stop=true)")
    if cfg.logger.name not in LOGGERS:
        raise ConfigError(f"logger={cfg.logger.name!r}: choose one of {', '.join(LOGGERS)}")
    if cfg.logger.mode not in (None, "online", "offline", "disabled"):
        raise ConfigError(f"logger.mode={cfg.logger.mode!r}: choose online, offline or disabled "
                          "(or leave it unset: WANDB_MODE, else online under a wandb agent, else offline)")
    validate_logger_names(cfg.logger)
    if cfg.activation not in ACTIVATIONS:
        raise ConfigError(f"activation={cfg.activation!r}: choose one of {', '.join(ACTIVATIONS)}")
    model = None
    if uses_model:
        model = resolve_model(cfg)
        check_model(cfg, model)
        if given_cache(cfg):
            check_cache_width(cfg, manifest, model)
    elif cfg.layer is not None:
        raise ConfigError(f"layer={cfg.layer!r} needs a model: add model=NAME (e.g. model=minilm)")
    check_known_keys(cfg)
    plan = resolve(cfg, grid=grid, model=model, manifest=manifest)
    check_trainer(plan.trainer)
    check_callbacks(cfg)
    check_bank(cfg.dictionary, plan.grid)
    if cfg.model is None and cfg.data.name != "cache" and cfg.data.n_val < MIN_VAL_ROWS:
        raise ConfigError(f"data.n_val={cfg.data.n_val} is too few held-out samples to measure (fvu needs their "
                          f"variance): use data.n_val >= {MIN_VAL_ROWS}")
    resources.check_memory(cfg, plan)
    return plan


# --------------------------------------------------------------------------------------------
# Values


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if not _number(value):
        raise ConfigError(f"{name}={value!r} must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value!r} must be {bound}")


def _integer(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> None:
    """An int (not a bool, not a float) within [minimum, maximum]."""
    ok = _int(value) and value >= minimum
    if not ok or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ConfigError(f"{name}={value!r} must be an integer {bound}")


# --------------------------------------------------------------------------------------------
# data.*


def validate_synthetic_fields(cfg: DataConfig) -> None:
    if not isinstance(cfg.fresh, bool):
        raise ConfigError(f"data.fresh={cfg.fresh!r} must be true (fresh batches) or false (a fixed sample of data.n rows)")
    for key in ("dim", "n", "n_val"):
        _integer(f"data.{key}", getattr(cfg, key), 1)
    _positive("data.noise", cfg.noise, allow_zero=True)
    if cfg.noise > NOISE_MAX:
        raise ConfigError(f"data.noise={cfg.noise!r} must be at most {NOISE_MAX:g} (the noise's standard deviation "
                          "relative to the signal; larger values overflow float32 training)")
    _positive("data.preact_std", cfg.preact_std, allow_zero=True)
    _positive("data.scale", cfg.scale)
    if not SCALE_RANGE[0] <= cfg.scale <= SCALE_RANGE[1]:
        raise ConfigError(f"data.scale={cfg.scale!r} must be between {SCALE_RANGE[0]:g} and {SCALE_RANGE[1]:g} "
                          "(float32 training; S1 and L_norm do not depend on the scale)")


def validate_data(cfg: DataConfig, *, uses_model: bool) -> Optional[dict]:
    """The data.* checks; the manifest of the cache folder the run reads (data.path), when it reads one."""
    if not uses_model and cfg.name not in DATA_NAMES:
        raise ConfigError(f"unknown data set data={cfg.name!r}: choose one of {', '.join(DATA_NAMES)}")
    for key in ("batch_size", "shuffle_buffer"):
        _integer(f"data.{key}", getattr(cfg, key), 1)
    _integer("data.num_workers", cfg.num_workers, 0)
    _integer("data.seed", cfg.seed, 0, SEED_MAX)
    if hasattr(cfg, "dim"):  # the synthetic fields (absent from a composed cache config)
        validate_synthetic_fields(cfg)
    if not _number(cfg.val_fraction) or not 0 < cfg.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.val_fraction!r} must be between 0 and 1")
    if cfg.name in ("sparse_linear", "sparse_nonlinear") and not uses_model and hasattr(cfg, "active"):
        _positive("data.active", cfg.active)
        if cfg.active > 4 * cfg.dim:
            raise ConfigError(
                f"data.active={cfg.active} exceeds the {4 * cfg.dim} ground-truth features (4 * data.dim)"
            )
    manifest = None
    if cfg.name == "cache" and (not uses_model or cfg.path is not None):
        manifest = cache_manifest(cfg.path)
    _integer("data.drop_positions", cfg.drop_positions, 0)
    ratio = cfg.max_norm_ratio
    if not _number(ratio) or not (ratio == 0 or ratio > 1):
        raise ConfigError(f"data.max_norm_ratio={ratio!r} must be 0 (off) or a number above 1 (a multiple of the "
                          "median row norm; 10 drops attention-sink rows)")
    if cfg.normalize not in NORMALIZE:
        raise ConfigError(f"data.normalize={cfg.normalize!r}: choose one of {', '.join(NORMALIZE)}")
    if (cfg.drop_positions or ratio or cfg.normalize != "none") and not uses_model and cfg.name != "cache":
        raise ConfigError(f"data.drop_positions / data.max_norm_ratio / data.normalize apply to real activations, "
                          f"not data={cfg.name}: add model=NAME or use data=cache")
    return manifest


# --------------------------------------------------------------------------------------------
# model.*, corpus.*, layer


def check_model(cfg: Any, model: ModelPlan) -> None:
    """Model, layer and corpus checks, on the model's shape as the plan read it (no torch, no transformers).
    Also the cache build's (cache.build.ensure_cache), for a config it builds without `validate`."""
    from sparse_coding import models
    from sparse_coding.corpus import validate_corpus

    if not isinstance(cfg.model.dtype, str) or cfg.model.dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"model.dtype={cfg.model.dtype!r}: choose float32, float16 or bfloat16")
    models.check_device(getattr(cfg.model, "device", "auto"))
    if not isinstance(cfg.cache_dtype, str) or cfg.cache_dtype not in ("float32", "float16"):
        raise ConfigError(f"cache_dtype={cfg.cache_dtype!r}: choose float32 or float16")
    if cfg.activation == "token_embeddings":
        return  # the embedding matrix needs neither a layer nor a corpus
    models.parse_layers(cfg.layer, model.num_layers, cfg.model.name)
    validate_corpus(cfg.corpus)
    max_pos = models.max_positions(model.path)
    if max_pos is not None and cfg.corpus.context_len > max_pos:
        raise ConfigError(
            f"corpus.context_len={cfg.corpus.context_len} exceeds model={cfg.model.name}'s {max_pos} positions"
        )


def check_trainable(cfg: Any) -> None:
    """Refuse, before any work, what validates for a cache build but cannot be one training run."""
    if cfg.model is not None and cfg.activation == "hidden_states" and isinstance(cfg.layer, str) \
            and cfg.layer.strip().lower() == "all":
        raise ConfigError("layer=all trains nothing: train one layer per run (layer=K), or every layer with "
                          "python train.py -m 'layer=range(0,N+1)' or sweeps/layers.yaml; layer=all is for "
                          "python -m sparse_coding.cache build (one forward pass stores every layer)")


def check_cache_width(cfg: Any, manifest: dict, model: ModelPlan) -> None:
    """`model=NAME data=cache data.path=DIR`: the cache must come from that model (name and width d)."""
    if manifest["d"] != model.width:
        raise ConfigError(f"data.path={cfg.data.path!r} holds activations of width d={manifest['d']}, but model="
                          f"{cfg.model.name} has d={model.width}: use a cache built from this model")
    cached = (manifest.get("model") or {}).get("name") if isinstance(manifest.get("model"), dict) else None
    if cached is not None and cached != cfg.model.name:
        raise ConfigError(f"data.path={cfg.data.path!r} is a cache of model={cached}, not model={cfg.model.name}")


# --------------------------------------------------------------------------------------------
# convergence.*, logger.*


def validate_convergence(c: Any) -> None:
    if not isinstance(c.stop, bool):
        raise ConfigError(f"convergence.stop={c.stop!r} must be true or false")
    _integer("convergence.eval_every", c.eval_every, 0)
    _integer("convergence.window", c.window, 2)
    _integer("convergence.max_samples", c.max_samples, 0)
    if not _number(c.tol) or not 0 < c.tol < 1:
        raise ConfigError(f"convergence.tol={c.tol!r} must be a number in (0, 1) (relative change)")
    if not _number(c.gap_tol) or not 0 < c.gap_tol < 1:
        raise ConfigError(f"convergence.gap_tol={c.gap_tol!r} must be a number in (0, 1) (relative held-out vs in-sample gap)")
    if not _number(c.max_minutes) or c.max_minutes < 0:
        raise ConfigError(f"convergence.max_minutes={c.max_minutes!r} must be a number >= 0 (0: no time budget)")
    if c.max_minutes > MAX_MINUTES:  # Lightning's Timer holds it as a timedelta: 1e300 minutes overflow it
        raise ConfigError(f"convergence.max_minutes={c.max_minutes!r} is beyond any run (at most {MAX_MINUTES:g} minutes); "
                          "use 0 for no time budget")


def validate_logger_names(lg: Any) -> None:
    """The names W&B itself checks when the run starts (a traceback from inside wandb.init otherwise): the
    project (1-128 characters, none of / \\ # ? % :) and every tag (1-64 characters). Checked for every logger,
    so a config moves between loggers unchanged."""
    project = getattr(lg, "project", None)
    if project is not None:
        bad = sorted({ch for ch in str(project) if ch in "/\\#?%:"})
        if not str(project) or len(str(project)) > 128 or bad:
            why = f"it contains {' '.join(bad)}" if bad else "it must be 1 to 128 characters"
            raise ConfigError(f"logger.project={project!r} is not a W&B project name: {why} (no / \\ # ? % : "
                              "and at most 128 characters)")
    for i, tag in enumerate(getattr(lg, "tags", None) or []):
        if not isinstance(tag, str) or not 1 <= len(tag) <= 64:
            raise ConfigError(f"logger.tags: tag {i} ({tag!r}) must be a text of 1 to 64 characters (W&B's limit)")


# --------------------------------------------------------------------------------------------
# trainer.*


def check_trainer(items: dict) -> None:
    """The trainer.* settings (plain, as in the plan) Lightning would otherwise reject after seconds of
    start-up (or misuse).

    Any Trainer argument may be set; the ones the run sets itself are refused with where they live,
    and the ones that would change what is measured are checked: no half precision, no strategy
    that shards Phi, several processes only under DDP, devices the machine has.
    """
    for key, where in RUN_OWNED.items():
        if items.get(key) is not None:
            raise ConfigError(f"trainer.{key} is set by the run, not in trainer.*: {where}")
    for key in ("deterministic", "enable_progress_bar"):
        if not isinstance(items[key], bool):
            raise ConfigError(f"trainer.{key}={items[key]!r} must be true or false")
    log_every = items["log_every_n_steps"]
    if not _int(log_every) or log_every < 1:
        raise ConfigError(f"trainer.log_every_n_steps={log_every!r} must be an integer >= 1")
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
    if str(items["precision"]) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={items['precision']!r} is not supported: the solver's stopping rule and "
                          "the metrics are float32 computations; use trainer.precision=32-true")
    strategy = str(items["strategy"]).lower()
    if strategy.startswith(SHARDING):
        raise ConfigError(f"trainer.strategy={items['strategy']} is not supported: every rank must hold the whole Phi "
                          "and step it itself (manual optimization); use trainer.strategy=ddp")
    if strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={items['strategy']!r}: choose auto, ddp, ddp_spawn, ddp_fork or ddp_notebook "
                          "(each also with _find_unused_parameters_true|false)")
    nodes = items["num_nodes"]
    if not _int(nodes) or nodes < 1:
        raise ConfigError(f"trainer.num_nodes={nodes!r} must be an integer >= 1")
    accelerator = str(items["accelerator"]).lower()
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={items['accelerator']!r}: choose one of {', '.join(ACCELERATORS)}")
    gpus = resources.visible_gpus()
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus > 0)
    if accelerator in ("gpu", "cuda") and gpus == 0:
        raise ConfigError(f"trainer.accelerator={items['accelerator']} but no usable GPU is visible (or torch is a CPU "
                          "build): use trainer.accelerator=cpu")
    if accelerator in ("mps", "tpu") and not resources.has_accelerator(accelerator):
        raise ConfigError(f"trainer.accelerator={items['accelerator']} but this machine has no {accelerator.upper()} "
                          "(or torch is not built for it): use trainer.accelerator=cpu or auto")
    devices = items["devices"]
    if isinstance(devices, (list, tuple)):
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
        limit_n = gpus if on_gpu else resources.cpu_count()
        if count > limit_n and accelerator not in ("mps", "tpu"):  # those: Lightning counts them
            what = f"{gpus} GPU(s) are visible" if on_gpu else f"this machine has {limit_n} CPU cores"
            raise ConfigError(f"trainer.devices={devices} but {what}: use trainer.devices <= {limit_n}")
    else:
        raise ConfigError(f"trainer.devices={devices!r} must be an integer >= 1, 'auto' or (GPUs) a list of indices")
    if (count > 1 or nodes > 1) and strategy not in DDP_STRATEGIES:
        raise ConfigError(f"trainer.devices={items['devices']!r} / trainer.num_nodes={nodes} run several processes: "
                          "add trainer.strategy=ddp or ddp_spawn (or trainer=ddp / trainer=ddp_cpu)")
    if nodes > 1 and not resources.multi_node_launcher():
        raise ConfigError(f"trainer.num_nodes={nodes} needs a launcher that starts this command on every node "
                          "(SLURM's srun, torchrun, MPI, or MASTER_ADDR, MASTER_PORT and NODE_RANK set on each node); "
                          "none is set here, so the run would wait for the other nodes forever: launch it that way, "
                          "or use trainer.num_nodes=1")


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


def check_bank(d: Any, grid: tuple) -> None:
    """Two bank members that are the same dictionary would write one result over the other."""
    seen: dict = {}
    for member in grid:
        key = (member.mult, member.lam)
        if key in seen or member.label in seen.values():
            raise ConfigError(f"dictionary.mult={_plain(d.mult)} x dictionary.lam={_plain(d.lam)} lists the dictionary "
                              f"(mult={member.mult}, lam={member.lam}) twice: remove the duplicate")
        seen[key] = member.label


def _plain(v: Any) -> Any:
    return list(v) if type(v).__name__ == "ListConfig" else v
