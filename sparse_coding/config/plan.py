"""The run plan: a composed run config parsed once into the values the run is built from.

`RunPlan` holds what the config only implies: the bank of dictionaries (each `dictionary.mult` x
`dictionary.lam` pair parsed, with its label), the data (source, width d, the cache folder when one
is given, the layer; a model's path and shape, read once from its config.json), the `trainer.*`
arguments and the `callbacks.*` entries as plain values. `checks.validate` builds it while it checks
(each value parsed where it is checked) and returns it; `resolve` builds it without the checks (a
config validated earlier). The run (sparse_coding.run), the memory estimate and the data modules read
the plan and never parse a setting again. Cheap: no torch, no Lightning, no transformers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sparse_coding.config.schema import SYNTHETIC_DATA
from sparse_coding.errors import ConfigError, DataError


@dataclass(frozen=True)
class Member:
    """One dictionary of the bank: m = mult * d, its penalty (a float > 0, or "auto"), its name in every output."""

    mult: int
    lam: "float | str"
    label: str


@dataclass(frozen=True)
class ModelPlan:
    """The model whose activations are measured: its local folder and its shape (from config.json, read once)."""

    path: Path
    num_layers: int
    width: int


@dataclass(frozen=True)
class DataPlan:
    """Where the rows come from.

    source: "synthetic" (a generator), "cache" (the cache folder `path`, given with data.path) or "model"
    (the model's cache, found or built by cache.build.ensure_cache when the run starts: its folder depends on the
    weights' and the corpus's fingerprints, so it is not known here).
    """

    source: str
    width: int  # d
    path: Optional[str] = None
    layer: Any = None  # hidden_states[layer] of a model's cache (None: embeddings, synthetic or imported data)
    model: Optional[ModelPlan] = None


@dataclass(frozen=True)
class RunPlan:
    """A run config resolved once (see the module docstring)."""

    grid: tuple  # of Member, in the order the run trains them
    data: DataPlan
    trainer: dict  # trainer.*: every key (the schema's and any Trainer argument given) with a plain value
    callbacks: dict  # callbacks.NAME: {_target_: ..., ...} as plain dicts; null entries left out

    @property
    def pairs(self) -> list[tuple[int, "float | str"]]:
        """The bank as (mult, lam) pairs (the module's `grid`)."""
        return [(m.mult, m.lam) for m in self.grid]


# --------------------------------------------------------------------------------------------
# The dictionary bank


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


def dictionary_label(mult: int, lam: "float | str") -> str:
    """A bank member's name in metrics.json, the saved dictionary and the logs."""
    return f"mult{mult}_lam{lam}"


def dictionary_grid(d: Any) -> tuple:
    """Every (mult, lam) combination of `dictionary.*` the run trains, in a stable order, as Members."""
    mults = [parse_mult(v) for v in as_list(d.mult)]
    lams = [parse_lam(v) for v in as_list(d.lam)]
    if not mults or not lams:
        raise ConfigError("dictionary.mult and dictionary.lam must not be empty lists")
    return tuple(Member(m, lam, dictionary_label(m, lam)) for m in mults for lam in lams)


# --------------------------------------------------------------------------------------------
# The data


def cache_manifest(path: Any) -> dict:
    """The manifest of a given cache folder (cheap: stat calls and one small JSON file); ConfigError without a
    path, DataError when it is not a readable cache with a valid width."""
    hint = "give the folder of a cache built by `python -m sparse_coding.cache build|import`"
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"data=cache needs data.path=DIR ({hint})")
    try:
        folder = os.path.expanduser(path)
        if not os.path.exists(folder):
            raise DataError(f"data.path={path!r} does not exist: {hint}")
        if not os.path.isdir(folder):
            raise DataError(f"data.path={path!r} is a file, not a cache folder: {hint}")
        if not os.access(folder, os.R_OK | os.X_OK):
            raise DataError(f"data.path={path!r} is not readable by this user: fix its permissions or copy the cache")
        manifest = os.path.join(folder, "manifest.json")
        if not os.path.isfile(manifest):
            raise DataError(f"data.path={path!r} has no manifest.json: not a cache, or its build did not finish "
                            "(rerun the build command to resume it)")
        if not os.access(manifest, os.R_OK):
            raise DataError(f"{manifest} is not readable by this user: fix its permissions")
        with open(manifest, "rb") as f:
            m = json.loads(f.read())
    except (OSError, ValueError) as e:  # ValueError: NUL in the path, or a manifest that is not JSON
        if isinstance(e, DataError):
            raise
        raise DataError(f"data.path={path!r}: cannot read its manifest.json ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); rebuild the cache") from None
    width = m.get("d") if isinstance(m, dict) else None
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise DataError(f"data.path={path!r}: manifest.json has no valid width d; rebuild the cache")
    return m


def given_cache(cfg: Any) -> bool:
    """The run reads the cache folder data.path: data=cache without a model, or with one and data.path set."""
    return cfg.data.name == "cache" and (cfg.model is None or cfg.data.path is not None)


def resolve_model(cfg: Any) -> ModelPlan:
    """The model's local folder and shape (config.json read once). `model=hf model.path=DIR` without a
    model.name is named after its folder (caches and logs use the name): set in cfg here."""
    from sparse_coding import models  # light: reads config.json files, imports no transformers

    path = models.resolve_model_path(cfg.model)
    if models.is_hf(cfg.model) and not cfg.model.name:
        cfg.model.name = path.name
    num_layers, width = models.read_model_shape(path, cfg.model.name)
    return ModelPlan(path, num_layers, width)


def data_plan(cfg: Any, model: Optional[ModelPlan], manifest: Optional[dict]) -> DataPlan:
    """The data of a run; `model` and `manifest` (of a given cache) as resolve_model / cache_manifest return them."""
    if cfg.model is None and cfg.data.name in SYNTHETIC_DATA:
        return DataPlan("synthetic", int(cfg.data.dim))
    layer = None if cfg.model is not None and cfg.activation == "token_embeddings" else cfg.layer
    if given_cache(cfg):
        return DataPlan("cache", int(manifest["d"]), str(cfg.data.path), layer, model)
    return DataPlan("model", model.width, None, layer, model)


# --------------------------------------------------------------------------------------------
# trainer.* and callbacks.*


def plain(value: Any) -> Any:
    """A config value as plain Python (a DictConfig or ListConfig resolved into dicts and lists)."""
    if type(value).__name__ in ("DictConfig", "ListConfig"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def trainer_items(t: Any) -> dict:
    """`trainer.*` as a plain {key: value} (a DictConfig may hold Trainer arguments beyond the schema)."""
    if hasattr(t, "keys"):
        return {k: plain(t.get(k)) for k in t.keys()}
    from dataclasses import fields

    return {f.name: plain(getattr(t, f.name)) for f in fields(t)}


def callback_entries(cfg: Any) -> dict:
    """Every `callbacks.NAME` entry that is a mapping, as a plain dict (null entries left out)."""
    entries = cfg.get("callbacks") if hasattr(cfg, "get") else getattr(cfg, "callbacks", None)
    if not hasattr(entries, "items"):
        return {}
    return {name: plain(entry) for name, entry in entries.items() if hasattr(entry, "items")}


# --------------------------------------------------------------------------------------------


def resolve(cfg: Any, *, grid: Optional[tuple] = None, model: Optional[ModelPlan] = None,
            manifest: Optional[dict] = None) -> RunPlan:
    """The plan of a composed run config; the parts already parsed (by checks.validate) are passed in."""
    if grid is None:
        grid = dictionary_grid(cfg.dictionary)
    if model is None and cfg.model is not None:
        model = resolve_model(cfg)
    if manifest is None and given_cache(cfg):
        manifest = cache_manifest(cfg.data.path)
    return RunPlan(grid, data_plan(cfg, model, manifest), trainer_items(cfg.trainer), callback_entries(cfg))
