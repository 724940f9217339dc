"""Typed run configuration (Hydra structured configs) and its validation.

This module must stay cheap to import: it is on the path that rejects a bad config before any
heavy import (torch, Lightning, transformers). Validation returns nothing and raises
`ConfigError` with one line that says what to change.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any, Dict, List, Optional, get_type_hints

from sparse_coding.errors import ConfigError

SYNTHETIC_DATA = ("sparse_linear", "gaussian", "heavy_tailed", "rademacher", "sparse_nonlinear")
DATA_NAMES = SYNTHETIC_DATA + ("cache",)
ACTIVATIONS = ("hidden_states", "token_embeddings")
LOGGERS = ("wandb", "csv", "none")
OPTIMIZERS = ("adam", "sgd")
INITS = ("data", "random")
NORMALIZE = ("none", "token")  # data.normalize (sparse_coding.preprocess)


@dataclass
class DataConfig:
    """Where activations come from: a synthetic generator (docs/method.md §7) or a cache on disk."""

    name: str = "sparse_linear"
    dim: int = 256
    fresh: bool = True  # synthetic: draw every training batch anew (population value); false: a fixed sample of n rows
    n: int = 16384  # training samples (synthetic; with fresh=true the rows of one epoch)
    n_val: int = 4096  # held-out samples drawn from the same generator (synthetic)
    active: float = 10.0  # a: mean number of active ground-truth features (sparse data)
    noise: float = 0.1  # sigma: noise variance per coordinate is active * sigma^2 / dim
    preact_std: float = 1.0  # sparse_nonlinear: std of the MLP's pre-activations (0: 1/sqrt(fan_in) weights, the old control)
    seed: int = 0
    scale: float = 1.0  # multiplies the data; S1 and L_norm must not depend on it
    path: Optional[str] = None  # cache directory when name == "cache"
    val_fraction: float = 0.1  # held-out share of cached rows
    batch_size: int = 1024
    shuffle_buffer: int = 65536  # rows held by the streaming shuffle buffer (cache)
    skip_nonfinite: bool = False  # drop NaN/Inf rows from a cache instead of failing
    num_workers: int = 0
    center: bool = True  # subtract the stored cache mean from real activations (docs/method.md §7.6)
    drop_positions: int = 0  # leave out context positions 0..K-1 (attention sink / BOS; sparse_coding.preprocess)
    max_norm_ratio: float = 0.0  # > 1: leave out rows with norm > ratio x the layer's median row norm; 0: off
    normalize: str = "none"  # "token": every (centred) row scaled to norm sqrt(d) (sparse_coding.preprocess)


@dataclass
class DictionaryConfig:
    """The learned dictionary Phi and the sparsity penalty lambda (docs/method.md §1, §3, §4).

    `mult` and `lam` may be lists: the run then trains one dictionary per combination on the
    same batches (a bank).
    """

    mult: Any = 8  # dictionary size m = mult * d; int or list of ints
    lam: Any = "auto"  # float > 0, "auto", or a list of those
    lam_tol: float = 0.02  # auto-lambda stops moving once |dlam|/lam < lam_tol
    lam_init_rounds: int = 3  # fixed-point rounds on the first batch to get the initial guess
    optimizer: str = "adam"
    lr: float = 1e-2
    inner_steps: int = 1  # gradient steps on Phi per solved batch
    init: str = "data"  # "data": random data points; "random": random unit vectors
    dead_window: int = 16384  # a feature unused for this many training samples counts as dead


@dataclass
class SolverConfig:
    """The batched greedy coefficient solver (docs/method.md §2)."""

    max_steps: int = 256
    tol: float = 1e-2  # a step of size a is taken only while a > tol * lam/2 (docs/method.md §2.2; docs/performance.md)
    eval_batch_size: int = 4096


@dataclass
class ConvergenceConfig:
    """Train until the held-out measurement stops moving (docs/method.md §6), within a budget.

    Every `eval_every` training samples the held-out metrics are computed; the run has converged
    when normalized_loss and avg_coef_norm of every dictionary each moved by less than `tol`
    (relative) between the means of the last `window` evaluations and the `window` before them, and
    every auto-lambda has settled. With
    `stop: false` the run trains for its trainer budget (the paper's fixed protocol) and still
    reports whether it converged.
    """

    stop: bool = True
    eval_every: int = 0  # training samples between held-out evaluations; 0: auto (a multiple of the held-out size)
    tol: float = 0.01
    window: int = 3
    max_samples: int = 4_000_000  # budget in training samples (all ranks); 0: none
    max_minutes: float = 120.0  # budget in wall-clock minutes of fitting; 0: none
    # sample sufficiency: held-out normalized_loss within gap_tol (relative) of the in-sample one
    gap_tol: float = 0.02


@dataclass
class TrainerConfig:
    """Forwarded to `pytorch_lightning.Trainer`, with any other Trainer argument given on top
    (`trainer.gradient_clip_val=1.0`, `trainer.profiler=simple`: checked against the installed Trainer's
    signature by sparse_coding.run_checks; those the run sets itself are refused there)."""

    max_epochs: int = -1  # -1: no epoch limit (the convergence budget ends the run); 10: the paper's protocol
    max_steps: int = -1
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    deterministic: bool = True
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    limit_train_batches: Optional[float] = None
    checkpoint_every_n_steps: int = 0  # also write last.ckpt every N optimizer steps (mid-epoch resume); 0: epoch ends only


@dataclass
class LoggerConfig:
    """Experiment logging: W&B offline by default (syncable later with `wandb sync`)."""

    name: str = "wandb"
    project: str = "sparse-coding"
    # online | offline | disabled; unset: WANDB_MODE, else online under a wandb agent, else offline (loggers.py)
    mode: Optional[str] = None
    entity: Optional[str] = None  # W&B team or user (unset: the login's default entity)
    group: Optional[str] = None
    job_type: Optional[str] = None  # W&B job type, e.g. train, sweep (unset: none)
    run_name: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    """A Hugging Face model whose activations are measured (docs/method.md §7.4)."""

    name: Optional[str] = "???"  # a named config (registry), or with source=hf any hub id
    path: Optional[str] = None  # a local directory holding the weights; overrides the registry
    source: str = "registry"  # "hf" (conf/model/hf.yaml): any transformers model by hub id or folder
    dtype: str = "float32"  # the forward pass's compute dtype (part of a cache's identity)
    # where the forward pass runs: auto (CUDA when available, else CPU), cpu or cuda; not part of a cache's identity
    device: str = "auto"


@dataclass
class CorpusConfig:
    """The text the model reads to produce activations."""

    name: str = "wiki"
    files: List[str] = field(default_factory=list)  # for name == "text": local .txt/.jsonl
    # for name == "hf" (conf/corpus/hf.yaml): a hub data set, or local files (corpus.path), streamed by `datasets`
    dataset: Optional[str] = None  # hub id, e.g. roneneldan/TinyStories
    config: Optional[str] = None  # the data set's configuration (subset), if it has several
    split: str = "train"
    revision: Optional[str] = None  # a hub branch, tag or commit (pin a commit to make the cache key exact)
    text_field: str = "text"  # the column that holds the documents
    path: Any = None  # local parquet/arrow/jsonl/csv files: a file, a directory, a glob, or a list of them
    context_len: int = 128
    max_tokens: int = 200_000
    keep_special_tokens: bool = False
    batch_size: int = 16


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)  # or CacheDataConfig (composed runs: conf/data/)
    dictionary: DictionaryConfig = field(default_factory=DictionaryConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    model: Optional[ModelConfig] = None
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    layer: Any = None  # int K (hidden_states[K]) or "all"
    activation: str = "hidden_states"
    cache_dir: str = "data/cache"
    cache_dtype: str = "float32"
    seed: int = 0
    out_dir: Optional[str] = None  # defaults to Hydra's run directory
    ckpt_path: Optional[str] = None  # "last" or a checkpoint file to resume from
    callbacks: Dict[str, Any] = field(default_factory=dict)  # NAME: {_target_: a Lightning callback, ...} (conf/callbacks/)
    overwrite: bool = False  # a fresh run in a finished run's directory: its files are moved to replaced-<time>/


# The composed config carries only the data fields that apply: conf/data/cache.yaml (and every model
# config, which selects it) uses this schema, without the synthetic generator's fields.
SYNTHETIC_FIELDS = ("dim", "fresh", "n", "n_val", "active", "noise", "preact_std", "scale")
CacheDataConfig = make_dataclass(
    "CacheDataConfig",
    [(f.name, get_type_hints(DataConfig)[f.name], field(default=f.default))
     for f in fields(DataConfig) if f.name not in SYNTHETIC_FIELDS],
)


@dataclass
class RunSchema(RunConfig):
    """RunConfig as Hydra composes it: `data` comes whole from its group (data_schema or cache_data_schema)."""

    data: Any = MISSING


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore so yaml files can extend them."""
    from hydra.core.config_store import ConfigStore

    from omegaconf import OmegaConf

    from sparse_coding.paths import run_id

    OmegaConf.register_new_resolver("run_id", run_id, replace=True)  # names the default run directory
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunSchema)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="data", name="cache_data_schema", node=CacheDataConfig)
    cs.store(group="dictionary", name="dictionary_schema", node=DictionaryConfig)
    cs.store(group="solver", name="solver_schema", node=SolverConfig)
    cs.store(group="convergence", name="convergence_schema", node=ConvergenceConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="corpus", name="corpus_schema", node=CorpusConfig)


# --------------------------------------------------------------------------------------------
# Validation


def as_list(value: Any) -> list:
    """A scalar or a list/ListConfig as a plain list."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return list(value)
    return [value]


def parse_lam(value: Any) -> "float | str":
    """One lambda value: a finite float > 0 or the string 'auto'."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool):
        raise ConfigError(f"dictionary.lam={value!r} is not valid: use a number > 0 or 'auto'")
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"dictionary.lam={value!r} is not valid: use a number > 0 or 'auto'") from None
    if not math.isfinite(lam) or lam <= 0:
        raise ConfigError(f"dictionary.lam={value!r} must be a finite number > 0 (or 'auto')")
    return lam


def parse_mult(value: Any) -> int:
    """One dictionary multiple: an integer >= 1."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value != int(value)):
        raise ConfigError(f"dictionary.mult={value!r} must be an integer >= 1 (m = mult * d)")
    if value < 1:
        raise ConfigError(f"dictionary.mult={value!r} must be >= 1 (m = mult * d)")
    return int(value)


def dictionary_grid(cfg: DictionaryConfig) -> list[tuple[int, "float | str"]]:
    """Every (mult, lam) combination the run trains, in a stable order."""
    mults = [parse_mult(v) for v in as_list(cfg.mult)]
    lams = [parse_lam(v) for v in as_list(cfg.lam)]
    if not mults or not lams:
        raise ConfigError("dictionary.mult and dictionary.lam must not be empty lists")
    return [(m, lam) for m in mults for lam in lams]


def _positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value!r} must be {bound}")


def _integer(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> None:
    """An int (not a bool, not a float) within [minimum, maximum]."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if not ok or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ConfigError(f"{name}={value!r} must be an integer {bound}")


SEED_MAX = 2**32 - 1  # numpy and Lightning seed range
SCALE_RANGE = (1e-6, 1e6)  # data.scale: float32 training is tested within this range
NOISE_MAX = 1e6  # data.noise (sigma): beyond it the rows' squared norms leave float32's range
MAX_MINUTES = 1e8  # convergence.max_minutes: 190 years


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_cache_path(path: Any) -> dict:
    """A readable cache folder with a manifest (cheap: stat calls and one small JSON file); its manifest."""
    hint = "give the folder of a cache built by `python -m sparse_coding.cache build|import`"
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"data=cache needs data.path=DIR ({hint})")
    try:
        folder = os.path.expanduser(path)
        if not os.path.exists(folder):
            raise ConfigError(f"data.path={path!r} does not exist: {hint}")
        if not os.path.isdir(folder):
            raise ConfigError(f"data.path={path!r} is a file, not a cache folder: {hint}")
        if not os.access(folder, os.R_OK | os.X_OK):
            raise ConfigError(f"data.path={path!r} is not readable by this user: fix its permissions or copy the cache")
        manifest = os.path.join(folder, "manifest.json")
        if not os.path.isfile(manifest):
            raise ConfigError(f"data.path={path!r} has no manifest.json: not a cache, or its build did not finish "
                              "(rerun the build command to resume it)")
        if not os.access(manifest, os.R_OK):
            raise ConfigError(f"{manifest} is not readable by this user: fix its permissions")
        with open(manifest, "rb") as f:
            m = json.loads(f.read())
    except (OSError, ValueError) as e:  # ValueError: NUL in the path, or a manifest that is not JSON
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"data.path={path!r}: cannot read its manifest.json ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); rebuild the cache") from None
    width = m.get("d") if isinstance(m, dict) else None
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ConfigError(f"data.path={path!r}: manifest.json has no valid width d; rebuild the cache")
    return m


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


def validate_data(cfg: DataConfig, *, uses_model: bool) -> None:
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
    if cfg.name == "cache" and (not uses_model or cfg.path is not None):
        validate_cache_path(cfg.path)
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


def validate(cfg: Any) -> None:
    """Check a composed RunConfig (a DictConfig or the dataclass); raise ConfigError on the first problem."""
    uses_model = cfg.model is not None
    validate_data(cfg.data, uses_model=uses_model)
    d = cfg.dictionary
    dictionary_grid(d)
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
    if uses_model:
        validate_model(cfg)
        if cfg.data.name == "cache" and cfg.data.path is not None:
            validate_cache_width(cfg)
    elif cfg.layer is not None:
        raise ConfigError(f"layer={cfg.layer!r} needs a model: add model=NAME (e.g. model=minilm)")
    from sparse_coding import run_checks  # trainer.*, unknown keys, banks, held-out size, memory

    run_checks.check_run(cfg, RunConfig, data_width(cfg))


def data_width(cfg: Any) -> Optional[int]:
    """The width d of the data a run trains on, when it can be known cheaply (None: not without loading a model)."""
    if cfg.data.name == "cache" and cfg.data.path is not None:
        return int(validate_cache_path(cfg.data.path)["d"])
    if cfg.model is None:
        return int(cfg.data.dim)
    from sparse_coding import models

    try:
        return int(models.read_model_shape(models.resolve_model_path(cfg.model), cfg.model.name)[1])
    except ConfigError:
        return None


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


def validate_cache_width(cfg: Any) -> None:
    """`model=NAME data=cache data.path=DIR`: the cache must come from that model (name and width d)."""
    from sparse_coding import models

    m = validate_cache_path(cfg.data.path)
    _, width = models.read_model_shape(models.resolve_model_path(cfg.model), cfg.model.name)
    if m["d"] != width:
        raise ConfigError(f"data.path={cfg.data.path!r} holds activations of width d={m['d']}, but model="
                          f"{cfg.model.name} has d={width}: use a cache built from this model")
    cached = (m.get("model") or {}).get("name") if isinstance(m.get("model"), dict) else None
    if cached is not None and cached != cfg.model.name:
        raise ConfigError(f"data.path={cfg.data.path!r} is a cache of model={cached}, not model={cfg.model.name}")


def validate_model(cfg: Any) -> None:
    """Model, layer and corpus checks; filled in by the real-model code (sparse_coding.models)."""
    from sparse_coding import models  # light module: reads config.json files, imports no transformers

    models.validate_model_config(cfg)
