"""A trained dictionary you can load and use: `SparseDictionary.load(run_dir)`.

A run writes `dictionary.safetensors`: one tensor Φ (d, m) per dictionary, named by its label
(`mult8_lamauto`), and in the file's metadata (key "sparse_coding", JSON) everything needed to
code new activations the way the run did: λ per dictionary, the solver settings (max_steps, tol,
the evaluation batch size) and the preprocessing (the centring mean when one was used, the
per-token normalisation). `dictionary.json` holds the same description plus the run's config.

`SparseDictionary` is a `torch.nn.Module`: Φ and the centring mean are buffers (`phi`, `mean`; `mean`
is None, and absent from `state_dict()`, when the run did not centre), so `.to(device)`, `.double()`,
`state_dict()` and `load_state_dict()` work as for any module; `forward(x)` is the reconstruction.

    from sparse_coding import SparseDictionary
    d = SparseDictionary.from_pretrained("outputs/demo")  # a run / saved / W&B artifact dir, or a hub id
    alpha = d.encode(x)                                 # raw activations (..., d) -> coefficients (..., m)
    codes = d.encode(x, sparse=True)                    # the same as a sparse COO tensor (..., m)
    x_hat = d.decode(alpha)                             # back in the raw activation space; = d(x)
    d.measure(x)                                        # the metrics.json numbers for these rows
    d.save_pretrained("my_dict")                        # the files a run writes; from_pretrained reads them

Every call computes in the input's dtype (float32 or float64; Φ is cast to it); half precision is
refused. A file is validated on load: a damaged or inconsistent one raises one DataError line.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.nn import functional as F

from sparse_coding.config.schema import SolverConfig
from sparse_coding.errors import ConfigError, DataError, SparseCodingError

FILE = "dictionary.safetensors"
SIDECAR = "dictionary.json"
META_KEY = "sparse_coding"
CHECKSUM = "content_sha256"  # in the description: sha256 over the rest of it and every tensor's name, dtype, shape, bytes


def content_sha256(meta: dict, tensors: dict) -> str:
    """The checksum a saved description carries: a changed byte of Φ or of the description is found on load."""
    import hashlib

    rest = json.loads(json.dumps({k: v for k, v in meta.items() if k != CHECKSUM}))  # as a reader sees it
    h = hashlib.sha256(json.dumps(rest, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_metadata(meta: dict, tensors: dict) -> dict:
    """The safetensors header metadata: one key (safetensors orders several keys differently run to run), the
    description with its checksum."""
    return {META_KEY: json.dumps({**meta, CHECKSUM: content_sha256(meta, tensors)})}
FORMAT = 1
NORMALIZE = ("none", "token")
UNIT_NORM_TOL = 1e-3  # |‖f_i‖ - 1| allowed for a loaded Φ's columns
MIN_TOL = 1e-6  # the smallest solver.tol a file may carry
# a Hugging Face repo id: "name" or "owner/name" (anything else that is not a local path is an error)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


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


def save_dictionaries(out_dir: Path, cfg: Any, module, attempt: Optional[Callable] = None, datamodule: Any = None) -> None:
    """Write dictionary.safetensors (Φ per label + metadata), then dictionary.json (the same + config).

    `attempt(name, write)` runs each write (write_outputs passes its own: atomic, independent).
    """
    from safetensors.torch import save

    from sparse_coding.atomic import atomic_write_bytes

    attempt = attempt or (lambda name, write: write())
    meta = describe(cfg, module, datamodule)
    tensors = {label: phi.detach().cpu().contiguous() for label, phi in zip(module.labels, module.phis)}
    blob = save(tensors, metadata=file_metadata(meta, tensors))
    full = {**meta, "config": OmegaConf.to_container(cfg, resolve=True)}
    attempt(FILE, lambda: atomic_write_bytes(Path(out_dir) / FILE, blob))
    attempt("dictionary.json", lambda: atomic_write_bytes(Path(out_dir) / "dictionary.json",
                                                          (json.dumps(full, indent=2) + "\n").encode()))


# ---- reading and validating a file ----------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _read(path: "str | Path") -> tuple[Path, Path, dict, dict]:
    """(the safetensors file, the file the metadata came from, the metadata, the tensors), or DataError."""
    from safetensors import safe_open

    from sparse_coding.atomic import not_a_regular_file

    path = Path(path).expanduser()
    try:
        file = path / FILE if path.is_dir() else path
    except (OSError, ValueError):
        file = path
    problem = not_a_regular_file(file)
    if problem is not None:
        raise DataError(f"{file}: {problem}; give a run directory, a save_pretrained or W&B artifact "
                        f"directory (holding {FILE}), or the file itself")
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # SafetensorError (truncated, random bytes), OSError, unsupported dtypes
        raise DataError(f"{file}: not a readable safetensors file ({_one_line(err)})") from None
    if META_KEY in header:
        try:
            meta = json.loads(header[META_KEY])
        except ValueError as err:
            raise DataError(f"{file}: its {META_KEY!r} metadata is not valid JSON ({_one_line(err)})") from None
        if isinstance(meta, dict) and CHECKSUM in meta:
            if meta.pop(CHECKSUM) != content_sha256(meta, tensors):
                raise DataError(f"{file}: its tensors or description do not match the checksum saved with them (the "
                                "file was altered or damaged): use an intact copy, or the run's checkpoint")
        return file, file, meta, tensors
    side = file.with_name(SIDECAR)  # a run written before the metadata existed
    if not_a_regular_file(side) is not None:
        raise DataError(f"{file}: no {META_KEY!r} metadata and no {SIDECAR} beside it: "
                        "not a sparse-coding dictionary")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"{side}: not readable JSON ({_one_line(err)})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{side}: holds {type(meta).__name__}, not the dictionaries' description (an object)")
    solver = meta.get("config")
    solver = solver.get("solver") if isinstance(solver, dict) else None
    solver = solver if isinstance(solver, dict) else {}
    meta.setdefault("solver", {"max_steps": solver.get("max_steps", SolverConfig.max_steps), "tol": solver.get("tol"),
                               "batch_size": solver.get("eval_batch_size", SolverConfig.eval_batch_size)})
    meta.setdefault("preprocessing", {"center_mean": None, "normalize": "none"})
    return file, side, meta, tensors


def _entries(file: Path, where: Path, meta: Any, tensors: dict) -> list[tuple[str, dict]]:
    """(label, constructor arguments) of every dictionary the metadata describes, checked against the
    tensors; DataError naming `where` (the metadata's file) for whatever is wrong."""

    def bad(what: str) -> DataError:
        return DataError(f"{where}: {what}")

    if not isinstance(meta, dict):
        raise bad(f"the metadata is {type(meta).__name__}, not an object")
    fmt = meta.get("format", FORMAT)
    if not _is_int(fmt) or fmt < 1:
        raise bad(f"format={fmt!r} must be an integer >= 1")
    if fmt > FORMAT:
        raise bad(f"format {fmt} is newer than this version reads ({FORMAT}): upgrade sparse-coding")
    entries, solver, prep = meta.get("dictionaries"), meta.get("solver"), meta.get("preprocessing")
    if not isinstance(entries, list) or not entries:
        raise bad("no 'dictionaries' list (one entry per tensor: label, lam, dict_mult)")
    if not isinstance(solver, dict):
        raise bad("no 'solver' object (max_steps, tol, batch_size)")
    if not isinstance(prep, dict):
        raise bad("no 'preprocessing' object (center_mean, normalize)")
    dim = meta.get("dim")
    if dim is not None and (not _is_int(dim) or dim < 1):
        raise bad(f"dim={dim!r} must be an integer >= 1")
    out: list[tuple[str, dict]] = []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise bad(f"dictionaries[{k}] is {type(entry).__name__}, not an object")
        name = entry.get("tensor")
        label = entry.get("label", name)
        if not isinstance(name, str) or not name:
            raise bad(f"dictionaries[{k}] has no tensor name ('tensor')")
        if not isinstance(label, str) or not label:
            raise bad(f"dictionaries[{k}] has no label")
        if any(label == seen for seen, _ in out):
            raise bad(f"the label {label!r} appears twice")
        if name not in tensors:
            raise DataError(f"{file}: no tensor {name!r} for dictionary {label!r} (it holds "
                            f"{', '.join(sorted(tensors)) or 'no tensors'})")
        phi = tensors[name]
        if dim is not None and phi.dim() == 2 and phi.shape[0] != dim:
            raise DataError(f"{file}: {label}: Φ has d={phi.shape[0]} rows but the metadata says dim={dim}")
        size = entry.get("dict_size")
        if size is not None and phi.dim() == 2 and size != phi.shape[1]:
            raise DataError(f"{file}: {label}: Φ has m={phi.shape[1]} columns but the metadata says "
                            f"dict_size={size!r}")
        column_major = entry.get("column_major", False)
        if not isinstance(column_major, bool):
            raise bad(f"{label}: column_major={column_major!r} must be true or false")
        if column_major and phi.dim() == 2:
            phi = phi.T.contiguous().T  # the run's memory layout (see _column_major)
        if "lam" not in entry:
            raise bad(f"{label}: no lam")
        mean = prep.get("center_mean")
        if mean is not None:
            odd = mean if not isinstance(mean, list) else next((v for v in mean if not _is_number(v)), None)
            if not isinstance(mean, list) or odd is not None:
                raise bad(f"preprocessing.center_mean must be a list of numbers or null; it holds "
                          f"{type(odd).__name__} {json.dumps(odd)[:40]}")
            mean = torch.tensor(mean, dtype=phi.dtype if phi.is_floating_point() else torch.float64)
        kwargs = dict(phi=phi, lam=entry["lam"], mean=mean, normalize=prep.get("normalize", "none"),
                      max_steps=solver.get("max_steps"), tol=solver.get("tol"),
                      batch_size=solver.get("batch_size", SolverConfig.eval_batch_size), label=label, dict_mult=entry.get("dict_mult"),
                      drop_positions=prep.get("drop_positions", 0), max_norm_ratio=prep.get("max_norm_ratio", 0.0),
                      median_row_norm=prep.get("median_row_norm"))
        out.append((label, kwargs))
    return out


# ---- the dictionary -------------------------------------------------------------------------------


class SparseDictionary(nn.Module):
    """One learned dictionary Φ (d, m) with its λ, solver settings and preprocessing.

    Buffers: `phi` (d, m), unit-norm columns, and `mean` (d,), the centring mean, or None when the run
    did not centre. Inputs may have any leading shape (..., d); every call computes in the input's
    dtype (float32 or float64, Φ cast to it; other inputs in Φ's dtype), half precision is refused.
    """

    def __init__(self, phi: Tensor, lam: float, *, mean: Optional[Tensor] = None, normalize: str = "none",
                 max_steps: int = SolverConfig.max_steps, tol: Optional[float] = None,
                 batch_size: int = SolverConfig.eval_batch_size,
                 label: str = "dictionary", dict_mult: Optional[float] = None, drop_positions: int = 0,
                 max_norm_ratio: float = 0.0, median_row_norm: Optional[float] = None) -> None:
        super().__init__()
        phi = torch.as_tensor(phi).detach()
        if phi.dim() != 2 or phi.shape[0] < 1 or phi.shape[1] < 1:
            raise ConfigError(f"Φ must be a (d, m) matrix with d, m >= 1, got shape {tuple(phi.shape)}")
        if not phi.is_floating_point():
            raise ConfigError(f"Φ must be a floating-point tensor, got {phi.dtype}")
        if not bool(torch.isfinite(phi).all()):
            raise ConfigError("Φ holds NaN or Inf")
        norms = phi.double().norm(dim=0)
        off = ((norms - 1).abs() > UNIT_NORM_TOL).nonzero().flatten()
        if off.numel():
            i = int(off[0])
            raise ConfigError(f"Φ's columns must have unit norm (within {UNIT_NORM_TOL:g}): {off.numel()} of "
                              f"{phi.shape[1]} do not, e.g. column {i} has norm {float(norms[i]):.6g}")
        d, m = phi.shape
        if mean is not None:
            try:
                mean = torch.as_tensor(mean).detach()
            except (TypeError, ValueError, RuntimeError) as err:
                raise ConfigError(f"center_mean must be {d} numbers ({_one_line(err)})") from None
            if mean.dtype == torch.bool or mean.is_complex() or tuple(mean.shape) != (d,):
                raise ConfigError(f"center_mean must be {d} real numbers (shape ({d},)), got shape "
                                  f"{tuple(mean.shape)} of {mean.dtype}")
            mean = mean.to(device=phi.device, dtype=phi.dtype)
            if not bool(torch.isfinite(mean).all()):
                raise ConfigError("center_mean holds NaN or Inf")
        if torch.is_tensor(lam) and lam.numel() == 1:
            lam = lam.item()
        if not _is_number(lam):
            raise ConfigError(f"lam must be a number > 0, got {lam!r}")
        lam = float(lam)
        if not math.isfinite(lam) or lam <= 0:
            raise ConfigError(f"lam must be a finite number > 0, got {lam}")
        if normalize not in NORMALIZE:
            raise ConfigError(f"normalize={normalize!r} must be one of {', '.join(NORMALIZE)}")
        if not _is_int(max_steps) or max_steps < 1:
            raise ConfigError(f"solver max_steps={max_steps!r} must be an integer >= 1")
        if tol is not None and not (_is_number(tol) and MIN_TOL <= tol < 1):
            raise ConfigError(f"solver tol={tol!r} must be a number in [{MIN_TOL:g}, 1) (or null: the default)")
        if not _is_int(batch_size) or batch_size < 1:
            raise ConfigError(f"solver batch_size={batch_size!r} must be an integer >= 1")
        if dict_mult is None:
            dict_mult = m // d if m % d == 0 else m / d
        elif not _is_number(dict_mult) or dict_mult <= 0 or abs(dict_mult * d - m) > 1e-9 * m:
            raise ConfigError(f"dict_mult={dict_mult!r} does not match Φ: m / d = {m} / {d}")
        if not isinstance(label, str) or not label:
            raise ConfigError(f"label must be a non-empty string, got {label!r}")
        if not _is_int(drop_positions) or drop_positions < 0:
            raise ConfigError(f"drop_positions={drop_positions!r} must be an integer >= 0")
        if not _is_number(max_norm_ratio) or not math.isfinite(max_norm_ratio) or max_norm_ratio < 0:
            raise ConfigError(f"max_norm_ratio={max_norm_ratio!r} must be a finite number >= 0")
        if median_row_norm is not None and not (_is_number(median_row_norm) and math.isfinite(median_row_norm)):
            raise ConfigError(f"median_row_norm={median_row_norm!r} must be a finite number or null")
        self.register_buffer("phi", phi)
        self.register_buffer("mean", mean)
        self.lam = lam
        self.normalize = normalize
        self.max_steps, self.batch_size = int(max_steps), int(batch_size)
        self.tol = None if tol is None else float(tol)
        self.label = label
        self.dict_mult = int(dict_mult) if float(dict_mult).is_integer() else float(dict_mult)
        self.drop_positions, self.max_norm_ratio = int(drop_positions), float(max_norm_ratio)
        self.median_row_norm = None if median_row_norm is None else float(median_row_norm)

    @property
    def dim(self) -> int:
        return self.phi.shape[0]

    @property
    def dict_size(self) -> int:
        return self.phi.shape[1]

    # ---- loading and saving ---------------------------------------------------------------------

    @classmethod
    def load_bank(cls, path: "str | Path") -> dict[str, "SparseDictionary"]:
        """Every dictionary of a run (a bank has several), by label. The files are validated: whatever is
        wrong with them raises one DataError line naming the file."""
        file, where, meta, tensors = _read(path)
        bank: dict[str, SparseDictionary] = {}
        try:
            for label, kwargs in _entries(file, where, meta, tensors):
                try:
                    bank[label] = cls(**kwargs)
                except ConfigError as err:  # the constructor's check, failed by the file's contents
                    raise DataError(f"{file}: {label}: {err}") from None
        except SparseCodingError:
            raise
        except Exception as err:  # a shape of metadata the checks above did not foresee: still one line
            raise DataError(f"{where}: malformed dictionary description ({_one_line(err)})") from None
        return bank

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

    @classmethod
    def from_pretrained(cls, name_or_path: "str | Path", label: Optional[str] = None, *,
                        revision: Optional[str] = None, subfolder: Optional[str] = None) -> "SparseDictionary":
        """A local directory (a run, a `save_pretrained` directory, a downloaded W&B `dictionary` artifact)
        or its dictionary.safetensors; else a Hugging Face hub repo id ("owner/name", `subfolder` inside it),
        fetched with huggingface_hub.snapshot_download (offline with HF_HUB_OFFLINE=1: the local cache only)."""
        path = Path(str(name_or_path)).expanduser()
        try:
            local = path.exists() or path.is_symlink()
        except (OSError, ValueError):
            local = False
        if local:
            return cls.load(path / subfolder if subfolder else path, label)
        name = str(name_or_path)
        if not _HUB_ID.fullmatch(name) or ".." in name or name.endswith(".git"):
            raise DataError(f"{name}: no such file or directory (and not a Hugging Face hub id 'owner/name')")
        snap = _snapshot(name, revision, subfolder)
        return cls.load(snap / subfolder if subfolder else snap, label)

    def _description(self) -> dict:
        """The metadata a run writes (describe()), for this one dictionary."""
        mean = self.mean
        return {
            "format": FORMAT,
            "dim": self.dim,
            "dictionaries": [{"tensor": self.label, "label": self.label, "dict_mult": self.dict_mult,
                              "dict_size": self.dict_size, "lam": self.lam,
                              "column_major": _column_major(self.phi)}],
            "solver": {"max_steps": self.max_steps, "tol": self.tol, "batch_size": self.batch_size},
            "preprocessing": {
                # Python floats hold float32 and float64 values exactly; JSON writes them back exactly
                "center_mean": None if mean is None else [float(v) for v in mean.detach().double().cpu()],
                "normalize": self.normalize,
                "drop_positions": self.drop_positions,
                "max_norm_ratio": self.max_norm_ratio,
                "median_row_norm": self.median_row_norm,
            },
            "layout": "phi is (d, m); columns are unit-norm features",
        }

    def save_pretrained(self, directory: "str | Path") -> Path:
        """Write dictionary.safetensors (Φ in its dtype, named by the label, with the metadata) and
        dictionary.json (the same description; no run config) into `directory`, as a run does:
        `from_pretrained(directory)` gives this dictionary back bit for bit."""
        from safetensors.torch import save

        from sparse_coding.atomic import atomic_write_bytes

        out = Path(directory).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        meta = self._description()
        tensors = {self.label: self.phi.detach().cpu().contiguous()}
        blob = save(tensors, metadata=file_metadata(meta, tensors))
        atomic_write_bytes(out / FILE, blob)
        atomic_write_bytes(out / SIDECAR, (json.dumps(meta, indent=2) + "\n").encode())
        return out

    # ---- use ------------------------------------------------------------------------------------

    def _dtype(self, t: Tensor) -> torch.dtype:
        """The dtype a call computes in: the input's (float32/float64), else Φ's (float32 for a half Φ)."""
        if t.is_floating_point():
            if t.dtype not in (torch.float32, torch.float64):
                raise ConfigError(f"half precision ({t.dtype}) is refused: the solver needs float32 or float64 "
                                  "(cast with .float())")
            return t.dtype
        if t.is_complex():
            raise ConfigError(f"complex input ({t.dtype}) is refused: activations are real")
        return self.phi.dtype if self.phi.dtype in (torch.float32, torch.float64) else torch.float32

    def _phi(self, dtype: torch.dtype) -> Tensor:
        return self.phi.to(dtype)  # no copy (and the same layout) when Φ already has that dtype

    def _rows(self, x: Tensor) -> tuple[Tensor, tuple]:
        """x (..., d) as (n, d) rows on Φ's device in the compute dtype, and the leading shape."""
        x = torch.as_tensor(x)
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ConfigError(f"x must be (..., {self.dim}); got {tuple(x.shape)}")
        dtype = self._dtype(x)
        return x.to(device=self.phi.device, dtype=dtype).reshape(-1, self.dim), tuple(x.shape[:-1])

    def _preprocess_rows(self, x: Tensor) -> Tensor:
        if self.mean is not None:
            x = x - self.mean.to(x.dtype)
        if self.normalize == "token":
            norms = x.norm(dim=1, keepdim=True)
            x = x * (self.dim ** 0.5 / torch.where(norms > 0, norms, torch.ones_like(norms)))
        return x

    def preprocess(self, x: Tensor) -> Tensor:
        """Raw activations (..., d) as the run trained on them: centred with its mean, normalised if it did."""
        rows, lead = self._rows(x)
        return self._preprocess_rows(rows).reshape(*lead, self.dim)

    def _solved(self, x: Tensor):
        """(rows, Φ, [(first row, SolveResult)]) of x (..., d): the solver call of the run's validation step
        (same settings, batch size and one Gram matrix for every batch), in the compute dtype."""
        from sparse_coding.solver import solve

        rows, lead = self._rows(x)
        rows = self._preprocess_rows(rows)
        phi = self._phi(rows.dtype)
        gram = phi.T @ phi
        tol = SolverConfig.tol if self.tol is None else self.tol
        results = [(start, solve(rows[start:start + self.batch_size], phi, self.lam, self.max_steps, gram=gram,
                                 tol=tol))
                   for start in range(0, rows.shape[0], self.batch_size)]
        return rows, lead, phi, results

    @torch.no_grad()
    def encode(self, x: Tensor, sparse: bool = False) -> Tensor:
        """Coefficients α (..., m) ≥ 0 of raw activations x (..., d), by the run's solver and preprocessing.

        sparse=True: a coalesced torch sparse COO tensor of the same shape (..., m), built from the
        solver's nonzeros without forming the dense α (`.to_dense()` equals `encode(x)`)."""
        rows, lead, _, results = self._solved(x)
        m = self.dict_size
        if not sparse:
            alphas = [r.alpha for _, r in results]
            alpha = torch.cat(alphas) if alphas else rows.new_zeros(0, m)
            return alpha.reshape(*lead, m)
        idx = torch.empty(0, dtype=torch.int64, device=rows.device)
        flat = torch.cat([idx] + [r.rows.to(idx.device) + start for start, r in results])
        cols = torch.cat([idx] + [r.indices.to(idx.device) for _, r in results])
        vals = torch.cat([rows.new_zeros(0)] + [r.values for _, r in results])
        order = torch.argsort(flat * m + cols)  # rows are in order; sort each row's atoms
        flat, cols, vals = flat[order], cols[order], vals[order]
        lead_idx = list(torch.unravel_index(flat, lead)) if lead and flat.numel() else [flat.new_zeros(0)] * len(lead)
        indices = torch.stack(lead_idx + [cols]) if lead else cols[None]
        return torch.sparse_coo_tensor(indices, vals, (*lead, m), is_coalesced=True, check_invariants=False)

    def decode(self, alpha: Tensor) -> Tensor:
        """Φα (..., d) in the raw activation space (the centring mean added back; a normalised run's rows
        stay normalised). `alpha` (..., m) may be dense or a torch sparse tensor (COO, or 2-D CSR)."""
        if isinstance(alpha, Tensor) and alpha.layout != torch.strided:
            x, lead = self._decode_sparse(alpha)
        else:
            alpha = torch.as_tensor(alpha)
            if alpha.dim() < 1 or alpha.shape[-1] != self.dict_size:
                raise ConfigError(f"alpha must be (..., {self.dict_size}); got {tuple(alpha.shape)}")
            dtype = self._dtype(alpha)
            lead = tuple(alpha.shape[:-1])
            x = alpha.to(device=self.phi.device, dtype=dtype).reshape(-1, self.dict_size) @ self._phi(dtype).T
        if self.mean is not None and self.normalize == "none":
            x = x + self.mean.to(x.dtype)
        return x.reshape(*lead, self.dim)

    def _decode_sparse(self, alpha: Tensor) -> tuple[Tensor, tuple]:
        if alpha.dim() < 1 or alpha.shape[-1] != self.dict_size:
            raise ConfigError(f"alpha must be (..., {self.dict_size}); got {tuple(alpha.shape)}")
        if alpha.layout != torch.sparse_coo:
            alpha = alpha.to_sparse_coo()
        alpha = alpha.to(self.phi.device).coalesce()  # sorted: the rows of a flattened (n, m) view in order
        dtype = self._dtype(alpha.values())
        lead = tuple(alpha.shape[:-1])
        n = math.prod(lead)
        idx = alpha.indices()
        flat = torch.zeros(idx.shape[1], dtype=torch.int64, device=idx.device)
        for k, size in enumerate(lead):
            flat = flat * size + idx[k]
        offsets = torch.zeros(n + 1, dtype=torch.int64, device=idx.device)
        torch.cumsum(torch.bincount(flat, minlength=n), 0, out=offsets[1:])
        phi = self._phi(dtype)
        if n == 0:
            return phi.new_zeros(0, self.dim), lead
        x = F.embedding_bag(idx[-1], phi.T, offsets[:-1], mode="sum",
                            per_sample_weights=alpha.values().to(dtype))
        return x, lead

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of x (..., d) in the raw space: decode(encode(x)), from the nonzeros only."""
        rows, lead, phi, results = self._solved(x)
        parts = [r.decode(phi) for _, r in results]
        x_hat = torch.cat(parts) if parts else rows.new_zeros(0, self.dim)
        if self.mean is not None and self.normalize == "none":
            x_hat = x_hat + self.mean.to(x_hat.dtype)
        return x_hat.reshape(*lead, self.dim)

    @torch.no_grad()
    def measure(self, x: Tensor, clusters: Optional[Tensor] = None) -> dict:
        """The metrics of metrics.json (normalized_loss, avg_coef_norm, l0, ...) on rows x (..., d): the
        held-out ones on the held-out rows, `in_sample` on the training rows. `clusters` (one id per row,
        shape (...)) groups rows that are not independent (e.g. the context each token came from): the
        standard errors are then cluster-robust, as a cache run's are; without it rows count as independent."""
        from sparse_coding.metrics import SparsityMetrics

        ids = None
        n = math.prod(torch.as_tensor(x).shape[:-1]) if torch.as_tensor(x).dim() >= 1 else 0
        if clusters is not None:
            clusters = torch.as_tensor(clusters).reshape(-1)
            if clusters.shape[0] != n:
                raise ConfigError(f"clusters must hold one id per row of x ({n}), got {clusters.shape[0]}")
            _, ids = torch.unique(clusters, return_inverse=True)
        rows, _, phi, results = self._solved(x)
        metric = SparsityMetrics(self.dim, self.dict_size, 0 if ids is None else int(ids.max()) + 1).to(phi.device)
        for start, result in results:
            batch = rows[start:start + result.n]
            group = None if ids is None else ids[start:start + result.n]
            metric.update(batch, result, result.decode(phi), group)
        metric.lam = self.lam
        values = {key: float(v) for key, v in metric.compute().items()}
        values.update(lam=self.lam, dict_mult=self.dict_mult, dict_size=self.dict_size, label=self.label)
        return values

    def extra_repr(self) -> str:
        return f"{self.label}: d={self.dim}, m={self.dict_size}, lam={self.lam:.4g}"


def _snapshot(hub_id: str, revision: Optional[str], subfolder: Optional[str]) -> Path:
    """A local snapshot of a hub repo's dictionary files, or a one-line ConfigError or DataError."""
    from sparse_coding.models import hub_offline

    local_copy = "or a local copy: from_pretrained(DIR) with a run, save_pretrained or W&B artifact directory"
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise ConfigError(f"{hub_id}: not a local directory; loading it from the Hugging Face hub needs "
                          f"huggingface_hub (pip install huggingface_hub) and the network, {local_copy}") from None
    offline = hub_offline() or bool(getattr(constants, "HF_HUB_OFFLINE", False))
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [prefix + name for name in (FILE, SIDECAR, "metrics.json")]
    try:
        return Path(snapshot_download(hub_id, revision=revision, allow_patterns=patterns, local_files_only=offline))
    except Exception as err:  # offline and not cached, no network, unknown or gated repo
        if offline:
            raise DataError(f"{hub_id}: not a local directory and not in the Hugging Face cache; fetching it "
                            f"needs the network (HF_HUB_OFFLINE is set) {local_copy}") from None
        raise DataError(f"{hub_id}: not a local directory, and the Hugging Face hub download failed "
                        f"({_one_line(err)}); it needs the network and an existing repo id, {local_copy}") from None
