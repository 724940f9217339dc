"""The run configuration's schema (Hydra structured configs): every setting, its type and its default.

These dataclasses are the only place a default is written. The YAML files of conf/ select a schema
(`defaults: [NAME_schema]`) and set only what their option changes; code that builds a run from a
config takes every setting from it (sparse_coding.config.plan), not from defaults of its own.
Cheap to import (no torch, Lightning or transformers): the checks run before any heavy import.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any, Dict, List, Optional, get_type_hints

SYNTHETIC_DATA = ("sparse_linear", "gaussian", "heavy_tailed", "rademacher", "sparse_nonlinear")
DATA_NAMES = SYNTHETIC_DATA + ("cache",)
ACTIVATIONS = ("hidden_states", "token_embeddings")
LOGGERS = ("wandb", "csv", "none")
OPTIMIZERS = ("adam", "sgd")
INITS = ("data", "random")
NORMALIZE = ("none", "token")  # data.normalize (sparse_coding.data.preprocess)


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
    drop_positions: int = 0  # leave out context positions 0..K-1 (attention sink / BOS; sparse_coding.data.preprocess)
    max_norm_ratio: float = 0.0  # > 1: leave out rows with norm > ratio x the layer's median row norm; 0: off
    normalize: str = "none"  # "token": every (centred) row scaled to norm sqrt(d) (sparse_coding.data.preprocess)


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
    signature by sparse_coding.config.keys; those the run sets itself are refused by sparse_coding.config.checks)."""

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
