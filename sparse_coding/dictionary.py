"""A trained dictionary you can load and use: `SparseDictionary.load(run_dir)`.

A run writes `dictionary.safetensors`: one tensor Φ (d, m) per dictionary, named by its label
(`mult8_lamauto`), and in the file's metadata (key "sparse_coding", JSON) everything needed to
code new activations the way the run did: λ per dictionary, the solver settings (max_steps, tol,
the evaluation batch size) and the preprocessing (the centring mean when one was used, the
per-token normalisation). `dictionary.json` holds the same description plus the run's config.

    from sparse_coding import SparseDictionary
    d = SparseDictionary.load("outputs/demo")           # a bank: load(run_dir, label=...) or load_bank
    alpha = d.encode(x)                                 # raw activations (n, d) -> coefficients (n, m)
    x_hat = d.decode(alpha)                             # back in the raw activation space
    d.measure(x)                                        # the metrics.json numbers for these rows
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor

from sparse_coding.errors import ConfigError

FILE = "dictionary.safetensors"
META_KEY = "sparse_coding"
FORMAT = 1


def _datamodule(module) -> Any:
    trainer = getattr(module, "_trainer", None)
    return getattr(trainer, "datamodule", None)


def _column_major(phi: Tensor) -> bool:
    # Φ initialised from data rows is stored transposed in memory. The decode kernel's float32 rounding
    # depends on that layout, so a loaded Φ takes it back: measure() then matches metrics.json exactly.
    return bool(phi.dim() == 2 and not phi.is_contiguous() and phi.T.is_contiguous())


def describe(cfg: Any, module, datamodule: Any = None) -> dict:
    """The dictionaries' description: labels, λ, sizes, solver settings and preprocessing."""
    dm = datamodule if datamodule is not None else _datamodule(module)
    mean = getattr(dm, "mean", None)
    synthetic = cfg.model is None and cfg.data.name != "cache"
    return {
        "format": FORMAT,
        "dim": int(module.hparams.dim),
        "dictionaries": [
            {"tensor": label, "label": label, "dict_mult": m, "dict_size": m * module.hparams.dim,
             "lam": module.lam(k), "column_major": _column_major(module.phis[k])}
            for k, (label, (m, _)) in enumerate(zip(module.labels, module.grid))
        ],
        "solver": {
            "max_steps": int(cfg.solver.max_steps),
            "tol": OmegaConf.select(cfg, "solver.tol", default=None),
            # validation batches: the synthetic loader uses solver.eval_batch_size, a cache data.batch_size
            "batch_size": int(cfg.solver.eval_batch_size if synthetic else cfg.data.batch_size),
        },
        "preprocessing": {
            "center_mean": None if mean is None else [float(v) for v in np.asarray(mean, dtype=np.float32)],
            "normalize": str(getattr(dm, "normalize", "none")),
            # rows the run left out (massive-activation remedies); encode/measure apply neither: select rows yourself
            "drop_positions": int(getattr(dm, "drop_positions", 0)),
            "max_norm_ratio": float(getattr(dm, "max_norm_ratio", 0.0)),
            "median_row_norm": getattr(dm, "median_norm", None),
        },
        "layout": "phi is (d, m); columns are unit-norm features",
    }


def save_dictionaries(out_dir: Path, cfg: Any, module, attempt: Optional[Callable] = None) -> None:
    """Write dictionary.safetensors (Φ per label + metadata), then dictionary.json (the same + config).

    `attempt(name, write)` runs each write (write_outputs passes its own: atomic, independent).
    """
    from safetensors.torch import save

    from sparse_coding.atomic import atomic_write_bytes

    attempt = attempt or (lambda name, write: write())
    meta = describe(cfg, module)
    tensors = {label: phi.detach().cpu().contiguous() for label, phi in zip(module.labels, module.phis)}
    blob = save(tensors, metadata={META_KEY: json.dumps(meta)})
    full = {**meta, "config": OmegaConf.to_container(cfg, resolve=True)}
    attempt(FILE, lambda: atomic_write_bytes(Path(out_dir) / FILE, blob))
    attempt("dictionary.json", lambda: atomic_write_bytes(Path(out_dir) / "dictionary.json",
                                                          (json.dumps(full, indent=2) + "\n").encode()))


def _read(path: "str | Path") -> tuple[dict, dict]:
    from safetensors import safe_open

    path = Path(path)
    file = path / FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{path}: no {FILE} (give a run directory or the file itself)")
    with safe_open(str(file), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if META_KEY in header:
        return json.loads(header[META_KEY]), tensors
    side = file.with_name("dictionary.json")  # a run written before the metadata existed
    if not side.is_file():
        raise ConfigError(f"{file}: no sparse_coding metadata and no dictionary.json beside it")
    meta = json.loads(side.read_text())
    solver = (meta.get("config") or {}).get("solver") or {}
    meta.setdefault("solver", {"max_steps": solver.get("max_steps", 256), "tol": solver.get("tol"),
                               "batch_size": solver.get("eval_batch_size", 4096)})
    meta.setdefault("preprocessing", {"center_mean": None, "normalize": "none"})
    return meta, tensors


class SparseDictionary:
    """One learned dictionary Φ (d, m) with its λ, solver settings and preprocessing."""

    def __init__(self, phi: Tensor, lam: float, *, mean: Optional[Tensor] = None, normalize: str = "none",
                 max_steps: int = 256, tol: Optional[float] = None, batch_size: int = 4096,
                 label: str = "dictionary", dict_mult: Optional[int] = None) -> None:
        self.phi = phi.float()
        self.lam = float(lam)
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        self.normalize = normalize
        self.max_steps, self.tol, self.batch_size = int(max_steps), tol, int(batch_size)
        self.label = label
        self.dict_mult = dict_mult if dict_mult is not None else self.dict_size // self.dim

    @property
    def dim(self) -> int:
        return self.phi.shape[0]

    @property
    def dict_size(self) -> int:
        return self.phi.shape[1]

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def load_bank(cls, path: "str | Path") -> dict[str, "SparseDictionary"]:
        """Every dictionary of a run (a bank has several), by label."""
        meta, tensors = _read(path)
        solver, prep = meta["solver"], meta["preprocessing"]
        mean = prep.get("center_mean")
        return {
            d["label"] if "label" in d else d["tensor"]: cls(
                tensors[d["tensor"]].T.contiguous().T if d.get("column_major") else tensors[d["tensor"]], d["lam"], mean=None if mean is None else torch.tensor(mean, dtype=torch.float32),
                normalize=prep.get("normalize", "none"), max_steps=solver["max_steps"], tol=solver.get("tol"),
                batch_size=solver.get("batch_size", 4096), label=d["tensor"], dict_mult=d.get("dict_mult"))
            for d in meta["dictionaries"]
        }

    @classmethod
    def load(cls, path: "str | Path", label: Optional[str] = None) -> "SparseDictionary":
        """The dictionary of a run directory (or its dictionary.safetensors); `label` picks one of a bank."""
        bank = cls.load_bank(path)
        if label is None:
            if len(bank) == 1:
                return next(iter(bank.values()))
            raise ConfigError(f"{path} holds a bank of {len(bank)} dictionaries: pick one with "
                              f"label=... ({', '.join(bank)}) or use SparseDictionary.load_bank")
        if label not in bank:
            raise ConfigError(f"{path}: no dictionary {label!r}; it holds {', '.join(bank)}")
        return bank[label]

    def to(self, device: "str | torch.device") -> "SparseDictionary":
        self.phi = self.phi.to(device)
        self.mean = None if self.mean is None else self.mean.to(device)
        return self

    # ---- use -------------------------------------------------------------------------------

    def preprocess(self, x: Tensor) -> Tensor:
        """Raw activations as the run trained on them: centred with its mean, normalised if it did."""
        x = torch.as_tensor(x).to(device=self.phi.device, dtype=torch.float32)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ConfigError(f"x must be (n, {self.dim}); got {tuple(x.shape)}")
        if self.mean is not None:
            x = x - self.mean
        if self.normalize == "token":
            norms = x.norm(dim=1, keepdim=True)
            x = x * (self.dim ** 0.5 / torch.where(norms > 0, norms, torch.ones_like(norms)))
        return x

    def _solve(self, x: Tensor, gram: Tensor):
        """The solver call of the run's validation step (same settings, one Gram matrix for every batch)."""
        from sparse_coding.solver import DEFAULT_TOL, solve

        return solve(x, self.phi, self.lam, self.max_steps, gram=gram,
                     tol=DEFAULT_TOL if self.tol is None else self.tol)

    def _batches(self, x: Tensor):
        x = self.preprocess(x)
        for start in range(0, x.shape[0], self.batch_size):
            yield x[start:start + self.batch_size]

    def encode(self, x: Tensor) -> Tensor:
        """Coefficients α (n, m) ≥ 0 of raw activations x (n, d), by the run's solver and preprocessing."""
        gram = self.phi.T @ self.phi
        alphas = [self._solve(b, gram).alpha for b in self._batches(x)]
        return torch.cat(alphas) if alphas else torch.zeros(0, self.dict_size)

    def decode(self, alpha: Tensor) -> Tensor:
        """Φα in the raw activation space (the centring mean added back; a normalised run's rows stay normalised)."""
        x = torch.as_tensor(alpha, dtype=torch.float32, device=self.phi.device) @ self.phi.T
        return x + self.mean if self.mean is not None and self.normalize == "none" else x

    @torch.no_grad()
    def measure(self, x: Tensor, clusters: Optional[Tensor] = None) -> dict:
        """The metrics of metrics.json (normalized_loss, avg_coef_norm, l0, ...) on rows x: the held-out
        ones on the held-out rows, `in_sample` on the training rows. `clusters` (n,) groups rows that are
        not independent (e.g. the context each token came from): the standard errors are then
        cluster-robust, as a cache run's are; without it rows count as independent."""
        from sparse_coding.metrics import SparsityMetrics

        ids = None
        if clusters is not None:
            clusters = torch.as_tensor(clusters).reshape(-1)
            if clusters.shape[0] != torch.as_tensor(x).shape[0]:
                raise ConfigError(f"clusters must hold one id per row of x ({torch.as_tensor(x).shape[0]}), "
                                  f"got {clusters.shape[0]}")
            _, ids = torch.unique(clusters, return_inverse=True)
        metric = SparsityMetrics(self.dim, self.dict_size, 0 if ids is None else int(ids.max()) + 1).to(self.phi.device)
        gram = self.phi.T @ self.phi
        for start, batch in zip(range(0, torch.as_tensor(x).shape[0], self.batch_size), self._batches(x)):
            result = self._solve(batch, gram)
            group = None if ids is None else ids[start:start + batch.shape[0]]
            metric.update(batch, result, result.decode(self.phi), group)
        metric.lam = self.lam
        values = {key: float(v) for key, v in metric.compute().items()}
        values.update(lam=self.lam, dict_mult=self.dict_mult, dict_size=self.dict_size, label=self.label)
        return values

    def __repr__(self) -> str:
        return f"SparseDictionary({self.label}: d={self.dim}, m={self.dict_size}, lam={self.lam:.4g})"
