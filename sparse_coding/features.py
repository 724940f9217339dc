"""What the features are: `sparse-coding-features RUN_DIR` (= `python -m sparse_coding.features RUN_DIR`).

For a finished run, code rows of the data the run trained on with the run's own dictionaries (λ, solver
settings and preprocessing, as `SparseDictionary` loads them) and record, for every feature (atom), its
activation density and its top-k activating rows (docs/method.md §9). `sparse_coding.feature_report` writes
them into RUN_DIR/features/: features.json, features.html, density_histogram.png and an offline W&B table.

- A cache run: the rows of the run's cached layer, split into training and held-out blocks as the run split
  them (`--split train`, the default, or `heldout`), without the rows the run left out (NaN/Inf,
  `data.drop_positions`, `data.max_norm_ratio`). A row's context is the window of tokens around it inside its
  own context (the cache's tokens.npy), decoded with the model's tokenizer.
- Synthetic data: the rows are regenerated from the run's config. There are no tokens; instead, for the
  sparse-linear generator, every true feature's largest cosine to a learned atom says whether it was
  recovered (> 0.9). The controls have no true features.

The data are read a block at a time (memory-mapped shards), solved a batch at a time (the run's evaluation
batch size, one `solver.solve` per batch and dictionary) and reduced into per-feature counts and a running
top-k (one torch.topk over [current top-k ; this batch] per batch): memory is one batch × m, whatever the
data's size. Every dictionary of a bank shares the pass (`--dictionary LABEL` picks one).
Lightning is not imported here; only the W&B table imports sparse_coding.loggers, which imports it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sparse_coding.errors import ConfigError, DataError, SparseCodingError

RECOVERED_COSINE = 0.9  # a true feature counts as recovered when some atom's cosine to it exceeds this (§9)
DEFAULT_TOP_K = 10
DEFAULT_WINDOW = 8  # tokens shown on each side of the activating one


# ---- the run ----------------------------------------------------------------------------------------


@dataclass
class Run:
    """A finished run: its directory, metrics.json, config and dictionaries (label -> SparseDictionary)."""

    path: Path
    metrics: dict
    cfg: DictConfig
    bank: dict

    @property
    def synthetic(self) -> bool:  # the rule of dictionary.describe
        return self.cfg.model is None and self.cfg.data.name != "cache"


def _in_use(run_dir: Path) -> bool:
    """Whether a training run holds the directory's lock (lifecycle.rundir.own_run_dir) right now."""
    try:
        with open(run_dir / ".run.lock", "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    except OSError:
        return False
    return False


def load_run(run_dir: "str | Path") -> Run:
    """The finished run in `run_dir`, or one DataError line saying what is wrong and what to do."""
    from sparse_coding.dictionary import FILE, SparseDictionary

    path = Path(run_dir).expanduser()
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise DataError(f"{path} {what}: give the directory of a finished training run (it holds metrics.json "
                        f"and {FILE})")
    if _in_use(path):
        raise DataError(f"{path}: a training run is still running in it (it holds {path / '.run.lock'}): "
                        "run this when it has finished")
    missing = [name for name in ("metrics.json", FILE) if not (path / name).is_file()]
    if missing:
        if (path / "checkpoints").is_dir() or (path / ".hydra").is_dir():
            raise DataError(f"{path}: an unfinished run (no {' or '.join(missing)}): finish it with the same "
                            f"overrides plus hydra.run.dir={path} ckpt_path=last, then run this again")
        raise DataError(f"{path}: not a run directory (no {', '.join(missing)}): give the directory a training "
                        "run wrote (hydra.run.dir or out_dir)")
    try:
        metrics = json.loads((path / "metrics.json").read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path / 'metrics.json'}: not readable JSON ({type(err).__name__}): the run's outputs "
                        "are damaged; rerun it") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("data"), dict):
        raise DataError(f"{path / 'metrics.json'}: holds no data description: not a metrics.json this package wrote")
    bank = SparseDictionary.load_bank(path)
    return Run(path, metrics, _run_config(path), bank)


def _run_config(path: Path) -> DictConfig:
    """The run's composed config: .hydra/config.yaml (train.py), else the copy in dictionary.json (measure())."""
    hydra_file = path / ".hydra" / "config.yaml"
    try:
        if hydra_file.is_file():
            return OmegaConf.load(hydra_file)
        full = json.loads((path / "dictionary.json").read_text())
        if isinstance(full, dict) and isinstance(full.get("config"), dict):
            return OmegaConf.create(full["config"])
    except Exception as err:  # noqa: BLE001 - OSError, JSON, YAML or OmegaConf errors: one line either way
        raise DataError(f"{path}: the run's config cannot be read ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:120] if str(err) else ''})") from None
    raise DataError(f"{path}: no .hydra/config.yaml and no config in dictionary.json: cannot tell what data "
                    "the run trained on")


def pick_dictionaries(run: Run, label: Optional[str]) -> dict:
    if label is None:
        return dict(run.bank)
    if label not in run.bank:
        raise ConfigError(f"{run.path}: no dictionary {label!r}; it holds {', '.join(run.bank)}")
    return {label: run.bank[label]}


# ---- rows: a cache's layer --------------------------------------------------------------------------


def _candidates(path: Path, run_dir: Path) -> list[Path]:
    """A run records its cache path as given (often relative to where it was started): try it as it is, then
    below each folder above the run directory."""
    if path.is_absolute():
        return [path]
    return [path] + [parent / path for parent in run_dir.resolve().parents]


@dataclass
class CacheRows:
    """One split of a cached layer, read in blocks; see the module docstring."""

    path: Path
    manifest: dict
    layer: str
    blocks: list
    drop_positions: int = 0
    max_norm_ratio: float = 0.0
    median_norm: Optional[float] = None
    _open: Optional[tuple] = field(default=None, repr=False)

    @classmethod
    def of_run(cls, run: Run, split: str, cache: Optional[str] = None) -> "CacheRows":
        from sparse_coding.cache.store import cache_blocks, read_manifest, select_layer, split_blocks, verify

        data = run.metrics["data"]
        given = cache or data.get("cache_path") or OmegaConf.select(run.cfg, "data.path")
        if not given:
            raise DataError(f"{run.path}/metrics.json names no cache (data.cache_path): give its folder with "
                            "--cache DIR")
        candidates = _candidates(Path(str(given)).expanduser(), run.path)
        found = next((p for p in candidates if (p / "manifest.json").is_file()), None)
        if found is None:
            named = "--cache" if cache else "metrics.json data.cache_path"
            raise DataError(f"{given}: the cache this run trained on is not there ({named}): rebuild it with "
                            "`python -m sparse_coding.cache build` and the run's model, layer and corpus overrides, "
                            "or give its folder with --cache DIR")
        m = read_manifest(found)
        layer = select_layer(m, data.get("layer"), found)
        first = next(iter(run.bank.values()))
        if int(m["d"]) != first.dim:
            raise DataError(f"{found}: the cache holds d={m['d']}, the run's dictionaries d={first.dim}: not this "
                            "run's cache")
        fingerprint = (m.get("model") or {}).get("fingerprint")
        other_model = bool(data.get("model_fingerprint")) and fingerprint != data["model_fingerprint"]
        other_rows = data.get("rows") is not None and int(m["n_rows"]) != int(data["rows"])
        if other_model or other_rows:
            raise DataError(f"{found}: another cache than the run trained on (model fingerprint or row count differ "
                            "from metrics.json): give the run's own cache with --cache DIR")
        verify(found, [layer])  # every shard, the mean and tokens.npy against the manifest's sha256
        shard_rows = [int(e["rows"]) for e in m["shards"][layer]]
        val_fraction = float(OmegaConf.select(run.cfg, "data.val_fraction", default=0.1))
        # the data module's split (data.cache_datamodule uses the same cache.store functions)
        train, held_out = split_blocks(cache_blocks(shard_rows), val_fraction)
        ratio = first.max_norm_ratio
        if ratio > 0 and first.median_row_norm is None:
            raise DataError(f"{run.path}: the run left out rows by data.max_norm_ratio but its dictionary records no "
                            "median row norm: rerun it with this version")
        return cls(found, m, layer, train if split == "train" else held_out, first.drop_positions, ratio,
                   first.median_row_norm)

    @property
    def shard_rows(self) -> list[int]:
        return [int(e["rows"]) for e in self.manifest["shards"][self.layer]]

    def _map(self, s: int) -> np.ndarray:
        """Shard s memory-mapped; one map open at a time (as data.row_stream.RowStream does)."""
        from sparse_coding.cache.store import cache_file, open_shard

        if self._open is None or self._open[0] != s:
            self._open = None
            name = self.manifest["shards"][self.layer][s]["file"]
            file = cache_file(self.path, f"layers/{self.layer}/{name}")
            self._open = (s, open_shard(file, self.shard_rows[s], int(self.manifest["d"]), self.manifest["dtype"]))
        return self._open[1]

    def chunks(self, max_rows: Optional[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(raw rows as float32, their global row indices) block by block, the left-out rows removed. With
        `max_rows`, evenly spaced blocks of the split, enough to hold it (all of them when it is larger)."""
        from sparse_coding.data import preprocess

        blocks = self.blocks
        if max_rows is not None and blocks:
            want = -(-max_rows // max(hi - lo for _, lo, hi in blocks))
            while want < len(blocks):
                picks = np.unique(np.linspace(0, len(blocks) - 1, want).round().astype(int))
                if sum(blocks[i][2] - blocks[i][1] for i in picks) >= max_rows:
                    blocks = [blocks[i] for i in picks]
                    break
                want += 1  # shorter blocks (a shard's last one) among the picks
        offsets = np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)
        for s, lo, hi in blocks:
            raw = self._map(s)[lo:hi]
            rows = np.arange(lo, hi, dtype=np.int64) + offsets[s]
            x = np.array(raw, dtype=np.float32)
            keep = np.isfinite(x).all(axis=1)
            if self.drop_positions > 0:
                keep &= preprocess.context_positions(self.manifest, rows) >= self.drop_positions
            if self.max_norm_ratio > 0:
                norms = np.linalg.norm(np.asarray(raw, dtype=np.float64), axis=1)
                keep &= ~(norms > self.max_norm_ratio * self.median_norm)
            yield (x, rows) if keep.all() else (x[keep], rows[keep])

    def total_rows(self) -> int:
        """Rows of the split before any is left out (an upper bound for the progress bar)."""
        return sum(hi - lo for _, lo, hi in self.blocks)

    # contexts

    @property
    def rows_per_context(self) -> int:
        """Rows of one context (a hidden-state cache stores contexts back to back); 1: rows stand alone."""
        keep = (self.manifest.get("corpus") or {}).get("keep_positions") or []
        return len(keep) if self.manifest.get("kind") == "hidden_states" and keep else 1

    def tokens(self) -> Optional[np.ndarray]:
        """The token id of every row (tokens.npy, memory-mapped), or None for a cache without tokens."""
        from sparse_coding.cache.store import cache_file

        if not self.manifest.get("tokens"):
            return None
        file = cache_file(self.path, self.manifest["tokens"]["file"])
        ids = np.load(file, mmap_mode="r", allow_pickle=False)
        if ids.shape != (int(self.manifest["n_rows"]),):
            raise DataError(f"{file}: holds {ids.shape} token ids, the cache {self.manifest['n_rows']} rows: rebuild it")
        return ids


# ---- rows: synthetic data ---------------------------------------------------------------------------


def synthetic_rows(cfg: DictConfig, split: str, max_rows: Optional[int]) -> torch.Tensor:
    """The run's synthetic rows, regenerated from its config (docs/method.md §7.1-7.3): a fixed sample's first
    data.n rows (train) or last data.n_val rows (heldout); fresh data: the first data.n rows of epoch 0, as
    training drew them, or the held-out draw. At most `max_rows` (the first ones: rows are independent)."""
    from sparse_coding.data.synthetic import SyntheticSource, generate, stream_seed

    d = cfg.data
    scale, preact = float(d.get("scale", 1.0)), d.get("preact_std", 0.0)
    n, n_val = int(d.n), int(d.n_val)
    limit = (n if split == "train" else n_val) if max_rows is None else min(max_rows, n if split == "train" else n_val)
    if not d.get("fresh", False):
        x = generate(d.name, d.dim, n + n_val, d.seed, active=d.active, noise=d.noise, preact_std=preact).x * scale
        return (x[:n] if split == "train" else x[n:])[:limit]
    source = SyntheticSource(d.name, d.dim, d.seed, active=d.active, noise=d.noise, preact_std=preact)
    if split == "heldout":
        return source.draw(n_val, stream_seed(d.seed, 2)).x[:limit] * scale
    batch, parts, got = int(d.batch_size), [], 0
    for j in range(-(-limit // batch)):
        rows = min(batch, n - j * batch)
        parts.append(source.draw(rows, stream_seed(d.seed, 1, 0, j)).x * scale)
        got += rows
    return torch.cat(parts)[:limit] if parts else torch.zeros(0, int(d.dim))


def true_features(cfg: DictConfig) -> tuple[Optional[torch.Tensor], str]:
    """(the generator's true features F (d, 4d), or None, and a line saying what the data have)."""
    from sparse_coding.data.synthetic import SyntheticSource

    d = cfg.data
    if d.name != "sparse_linear":
        what = ("its sparse coefficients pass through a random GELU MLP, so it has no linear features to compare"
                if d.name == "sparse_nonlinear" else "a dense control")
        return None, f"data={d.name} has no true features ({what}): nothing to recover"
    # F is the generator's first draw from data.seed, for the fixed sample and fresh batches alike (§7.1)
    source = SyntheticSource(d.name, d.dim, d.seed, active=d.active, noise=d.noise)
    return source.features, f"data=sparse_linear: {source.features.shape[1]} true features (d={d.dim}, seed {d.seed})"


def recovery(features: torch.Tensor, phi: torch.Tensor, threshold: float = RECOVERED_COSINE) -> dict:
    """For every true feature (unit columns of `features`) the largest cosine to an atom (unit columns of
    `phi`); recovered when it exceeds `threshold` (docs/method.md §9)."""
    cos = features.double().T @ phi.double()  # (t, m): both have unit columns
    best, atom = cos.max(dim=1)
    b = best.numpy()
    qs = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
    counts, edges = np.histogram(np.clip(b, 0.0, 1.0), bins=10, range=(0.0, 1.0))
    rec = b > threshold
    return {
        "threshold": threshold,
        "true_features": int(len(b)),
        "recovered": int(rec.sum()),
        "recovered_fraction": float(rec.mean()) if len(b) else 0.0,
        "distinct_atoms": int(len(np.unique(atom.numpy()[rec]))),
        "max_cosine_quantiles": {f"q{int(q * 100)}": float(np.quantile(b, q)) for q in qs} if len(b) else {},
        "max_cosine_histogram": {"edges": [round(float(e), 2) for e in edges], "counts": counts.tolist(),
                                 "note": "max cosines clipped to [0, 1]"},
        "max_cosine": [round(float(v), 6) for v in b],
        "best_atom": atom.tolist(),
        "atom_max_cosine": cos.max(dim=0).values.tolist(),  # per learned atom: its closest true feature
        "atom_best_feature": cos.max(dim=0).indices.tolist(),
    }


# ---- the scan: density and a running top-k per feature ---------------------------------------------


def rebatch(chunks: Iterable[tuple[np.ndarray, np.ndarray]], size: int,
            limit: Optional[int] = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows, ids) chunks re-cut into batches of exactly `size` rows (the last may be shorter), `limit` rows
    at most: the batches SparseDictionary.encode cuts the same rows into, so the codes are the same."""
    xs: list = []
    ids: list = []
    have = sent = 0
    for x, r in chunks:
        if limit is not None:
            room = limit - sent - have
            if room <= 0:
                break
            x, r = x[:room], r[:room]
        xs.append(x)
        ids.append(r)
        have += len(x)
        while have >= size:
            X = xs[0] if len(xs) == 1 else np.concatenate(xs)
            R = ids[0] if len(ids) == 1 else np.concatenate(ids)
            yield X[:size], R[:size]
            xs, ids = [X[size:]], [R[size:]]
            have -= size
            sent += size
    if have:
        yield np.concatenate(xs), np.concatenate(ids)


class FeatureStats:
    """Per feature of one dictionary: rows coded, rows where it is active, the sum of its coefficients, and
    its k largest coefficients with their row ids (values ≤ 0 are empty slots)."""

    def __init__(self, m: int, k: int, dtype: torch.dtype = torch.float32) -> None:
        self.m, self.k, self.rows = m, k, 0
        self.counts = torch.zeros(m, dtype=torch.int64)
        self.sums = torch.zeros(m, dtype=torch.float64)
        self.values = torch.zeros(m, k, dtype=dtype)
        self.row_ids = torch.full((m, k), -1, dtype=torch.int64)

    def update(self, result, ids: torch.Tensor) -> None:
        """Add one solved batch (a SolveResult of n rows; `ids` (n,) their row ids): counts from the
        nonzeros; the top-k of the features active in the batch merged with one torch.topk."""
        n = result.n
        self.rows += n
        if result.indices.numel() == 0:
            return
        self.counts += torch.bincount(result.indices, minlength=self.m)
        self.sums.index_add_(0, result.indices, result.values.double())
        active = torch.unique(result.indices)  # sorted
        block = result.values.new_zeros(len(active), n)  # (features active here, rows): their coefficients
        block[torch.searchsorted(active, result.indices), result.rows] = result.values
        vals, idx = torch.topk(torch.cat([self.values[active].to(block.dtype), block], dim=1), self.k, dim=1)
        old = self.row_ids[active].gather(1, idx.clamp(max=self.k - 1))
        new = ids[(idx - self.k).clamp(min=0)]
        self.values[active] = vals.to(self.values.dtype)
        self.row_ids[active] = torch.where(idx < self.k, old, new)

    @property
    def density(self) -> torch.Tensor:
        return self.counts.double() / max(self.rows, 1)


def scan(batches: Iterable[tuple[np.ndarray, np.ndarray]], bank: dict, k: int, progress=None) -> dict:
    """{label: FeatureStats} over every batch, each dictionary coding a batch as its own `encode` does
    (its preprocessing, λ, solver settings and one Gram matrix for all batches)."""
    from sparse_coding.solver import DEFAULT_TOL, solve

    stats, prepared = {}, {}
    for label, d in bank.items():
        phi = d.phi.to(torch.float32) if d.phi.dtype not in (torch.float32, torch.float64) else d.phi
        prepared[label] = (phi, phi.T @ phi, DEFAULT_TOL if d.tol is None else d.tol)
        stats[label] = FeatureStats(d.dict_size, k, phi.dtype)
    for x, ids in batches:
        x_t, ids_t = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(ids))
        for label, d in bank.items():
            phi, gram, tol = prepared[label]
            rows = d.preprocess(x_t.to(phi.dtype))
            stats[label].update(solve(rows, phi, d.lam, d.max_steps, gram=gram, tol=tol), ids_t)
        if progress is not None:
            progress.update(len(x))
    return stats


# ---- contexts: the tokens around a row ----------------------------------------------------------------


def windows(rows: np.ndarray, tokens: np.ndarray, rows_per_context: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids (len(rows), 2·width+1), valid mask): the tokens of the `width` rows on each side of each row
    inside its own context (column `width` is the row's own token)."""
    n = len(tokens)
    start = (rows // rows_per_context) * rows_per_context
    end = np.minimum(start + rows_per_context, n)
    idx = rows[:, None] + np.arange(-width, width + 1)[None, :]
    valid = (idx >= start[:, None]) & (idx < end[:, None])
    return np.asarray(tokens[np.clip(idx, 0, n - 1).reshape(-1)]).reshape(idx.shape), valid


def load_tokenizer(run: Run, manifest: dict) -> tuple[Any, Optional[str]]:
    """(the model's tokenizer from its local files, None) or (None, why it is not available)."""
    from sparse_coding import models

    model_cfg = run.cfg.model
    if model_cfg is None:
        name = (manifest.get("model") or {}).get("name")
        if not name:
            return None, "the cache records no model"
        model_cfg = OmegaConf.create({"name": name, "path": None, "source": "registry", "dtype": "float32"})
    try:
        path = models.prepare_model_dir(model_cfg)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True), None
    except SparseCodingError as err:
        return None, str(err)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds for a folder without a tokenizer
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


def _decode(tokenizer: Any, seqs: list[list[int]]) -> list[str]:
    if tokenizer is None:
        return [" ".join(f"<{t}>" for t in s) for s in seqs]
    return tokenizer.batch_decode(seqs, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def context_texts(rows: np.ndarray, tokens: np.ndarray, rows_per_context: int, width: int,
                  tokenizer: Any) -> dict[int, dict]:
    """{row: {token_id, left, token, right}} for the distinct rows given. The window is decoded whole and cut
    where its prefixes end, so the tokenizer's own spacing is kept (WordPiece pieces, byte-level spaces)."""
    rows = np.unique(rows)
    ids, valid = windows(rows, tokens, rows_per_context, width)
    lefts = [ids[j, :width][valid[j, :width]].tolist() for j in range(len(rows))]
    rights = [ids[j, width + 1:][valid[j, width + 1:]].tolist() for j in range(len(rows))]
    own = ids[:, width].tolist()
    left_s = _decode(tokenizer, lefts)
    upto_s = _decode(tokenizer, [a + [t] for a, t in zip(lefts, own)])
    full_s = _decode(tokenizer, [a + [t] + b for a, t, b in zip(lefts, own, rights)])
    alone = _decode(tokenizer, [[t] for t in own])
    right_alone = _decode(tokenizer, rights)
    out = {}
    for j, r in enumerate(rows.tolist()):
        left, upto, full = left_s[j], upto_s[j], full_s[j]
        if upto.startswith(left) and full.startswith(upto) and len(upto) > len(left):
            token, right = upto[len(left):], full[len(upto):]
        else:  # a tokenizer whose decoding of a prefix is not a prefix (rare): the pieces decoded alone
            token, right = alone[j], right_alone[j]
        stripped = token.lstrip()
        if stripped and stripped != token:  # the space before a word goes outside the mark
            left, token = left + token[: len(token) - len(stripped)], stripped
        out[r] = {"token_id": int(own[j]), "left": left, "token": token, "right": right}
    return out


def marked(entry: dict) -> str:
    """A context as one line of text, the activating token in «»."""
    text = f"{entry['left']}«{entry['token']}»{entry['right']}"
    return text.replace("\r\n", "↵").replace("\n", "↵").replace("\r", "↵")


# ---- putting it together ----------------------------------------------------------------------------


def analyse(run: Run, *, dictionary: Optional[str] = None, top_k: int = DEFAULT_TOP_K, max_rows: Optional[int] = None,
            split: str = "train", window: int = DEFAULT_WINDOW, cache: Optional[str] = None) -> dict:
    """The features of a run's dictionaries: the dict written to features.json."""
    if split not in ("train", "heldout"):
        raise ConfigError(f"--split={split!r}: choose train or heldout")
    if top_k < 1 or window < 0 or (max_rows is not None and max_rows < 1):
        raise ConfigError("--top-k and --max-rows must be at least 1 and --window at least 0")
    bank = pick_dictionaries(run, dictionary)
    first = next(iter(bank.values()))
    rows_source: Any = None
    if run.synthetic:
        if cache:
            raise ConfigError(f"{run.path}: a run on synthetic data (data={run.cfg.data.name}) has no cache: drop --cache")
        x = synthetic_rows(run.cfg, split, max_rows)
        total = available = len(x)
        chunks: Iterable = ((x[i:i + first.batch_size].numpy(), np.arange(i, min(i + first.batch_size, len(x))))
                            for i in range(0, len(x), first.batch_size))
        source = {"source": "synthetic", "data": run.cfg.data.name}
    else:
        rows_source = CacheRows.of_run(run, split, cache)
        available = total = rows_source.total_rows()
        if max_rows is not None:
            total = min(total, max_rows)
        chunks = rows_source.chunks(max_rows)
        source = {"source": "cache", "cache_path": str(rows_source.path), "layer": rows_source.layer,
                  "kind": rows_source.manifest.get("kind")}
    progress = _progress(total)
    try:
        stats = scan(rebatch(chunks, first.batch_size, max_rows), bank, top_k, progress)
    finally:
        if progress is not None:
            progress.close()
    used = next(iter(stats.values())).rows
    if used == 0:
        raise DataError(f"{run.path}: no rows to code in the {split} split (every row left out?)")
    report = {"run_dir": str(run.path), "split": split, "rows_used": used, "rows_in_split": available,
              "all_rows": max_rows is None or used >= available, "top_k": top_k, "window": window, **source,
              "density_definition": "fraction of the coded rows whose coefficient is > 0 (docs/method.md §9)"}
    texts: dict = {}
    if rows_source is not None:
        tokens = rows_source.tokens()
        report["rows_per_context"] = rows_source.rows_per_context
        if tokens is None:
            report["contexts"] = "this cache holds no tokens (an imported array): contexts are row indices"
        else:
            tokenizer, why = load_tokenizer(run, rows_source.manifest)
            report["tokenizer"] = None if tokenizer is None else getattr(tokenizer, "name_or_path", "loaded")
            if why:
                report["contexts"] = f"token ids shown as <id>: the model's tokenizer is not available ({why})"
            picked = np.concatenate([s.row_ids[s.values > 0].numpy() for s in stats.values()])
            texts = context_texts(picked, tokens, rows_source.rows_per_context, window, tokenizer)
    truth, truth_line = (true_features(run.cfg) if run.synthetic else (None, None))
    if truth_line:
        report["truth"] = truth_line
    report["dictionaries"] = [
        _dictionary_report(label, bank[label], stats[label], texts, truth) for label in bank
    ]
    return report


def _progress(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - a dependency
        return None
    return tqdm(total=total, unit="row", unit_scale=True, desc="coding rows", file=sys.stderr, disable=None,
                dynamic_ncols=True, mininterval=1.0)


def _dictionary_report(label: str, d, stats: FeatureStats, texts: dict, truth: Optional[torch.Tensor]) -> dict:
    density = stats.density.numpy()
    counts = stats.counts.numpy()
    mean_active = (stats.sums / stats.counts.clamp(min=1)).numpy()
    values, row_ids = stats.values.numpy(), stats.row_ids.numpy()
    live = density[density > 0]
    out = {"label": label, "lam": d.lam, "dim": d.dim, "dict_size": d.dict_size, "rows": stats.rows,
           "dead": int((counts == 0).sum()), "dead_fraction": float((counts == 0).mean()),
           "density_quantiles": ({f"q{q}": float(np.quantile(live, q / 100)) for q in (0, 10, 50, 90, 100)}
                                 if len(live) else {})}
    rec = None
    if truth is not None:
        rec = recovery(truth, d.phi.detach().cpu())
        out["recovery"] = {k: v for k, v in rec.items() if not k.startswith("atom_")}
    features = []
    for i in range(d.dict_size):
        top = []
        for v, r in zip(values[i], row_ids[i]):
            if v <= 0:
                break  # sorted: the rest are empty slots
            entry = {"row": int(r), "value": float(v)}
            if int(r) in texts:
                entry.update(texts[int(r)])
                entry["text"] = marked(entry)
            top.append(entry)
        f = {"index": i, "density": float(density[i]), "active_rows": int(counts[i]),
             "mean_when_active": float(mean_active[i]) if counts[i] else 0.0, "top": top}
        if rec is not None:
            f["closest_true_feature"] = int(rec["atom_best_feature"][i])
            f["closest_true_cosine"] = float(rec["atom_max_cosine"][i])
        features.append(f)
    out["features"] = features
    return out


def summary_lines(report: dict) -> list[str]:
    """What to print: the rows used, and per dictionary its dead features, densities and recovery."""
    where = (f"{report['cache_path']} layer {report['layer']}" if report["source"] == "cache"
             else f"data={report['data']} regenerated from the run's config")
    of = "all of them" if report["all_rows"] else f"of {report['rows_in_split']:,}; --max-rows"
    lines = [f"coded {report['rows_used']:,} {report['split']} rows ({of}) of {where}"]
    if report.get("contexts"):
        lines.append(f"note: {report['contexts']}")
    if report.get("truth"):
        lines.append(report["truth"])
    for e in report["dictionaries"]:
        q = e["density_quantiles"]
        dens = f"density median {q['q50']:.3g} (10 %: {q['q10']:.3g}, 90 %: {q['q90']:.3g})" if q else "no live feature"
        lines.append(f"{e['label']} (m={e['dict_size']}, λ={e['lam']:.4g}): {e['dead']} dead features "
                     f"({e['dead_fraction']:.1%}) on these rows; {dens}")
        rec = e.get("recovery")
        if rec:
            qs = rec["max_cosine_quantiles"]
            lines.append(f"{e['label']}: recovered {rec['recovered']} of {rec['true_features']} true features "
                         f"({rec['recovered_fraction']:.1%}; max cosine to an atom > {rec['threshold']}); max cosine "
                         f"min {qs['q0']:.3f}, 10 % {qs['q10']:.3f}, median {qs['q50']:.3f}, max {qs['q100']:.3f}")
    return lines


# ---- command line -----------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sparse-coding-features",
        description="What the features of a finished run are: every feature's activation density and its top-k "
                    "activating contexts (synthetic data: how many true features were recovered), written to "
                    "RUN_DIR/features/ (features.json, features.html, density_histogram.png, a W&B table).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's directory (metrics.json, dictionary.safetensors)")
    p.add_argument("--dictionary", metavar="LABEL", default=None,
                   help="one dictionary of a bank (default: every dictionary, in one pass over the rows)")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help=f"contexts per feature (default {DEFAULT_TOP_K})")
    p.add_argument("--max-rows", type=int, default=None,
                   help="code at most this many rows, from evenly spaced blocks (default: every row of the split)")
    p.add_argument("--split", choices=("train", "heldout"), default="train",
                   help="the rows the run trained on (default) or its held-out rows")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                   help=f"tokens shown on each side of the activating one (default {DEFAULT_WINDOW})")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="the run's cache folder, when it moved (default: metrics.json data.cache_path)")
    p.add_argument("--no-wandb", action="store_true", help="do not log the W&B table")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    """`sparse-coding-features RUN_DIR [options]`: a bad input is one line on stderr, exit 2."""
    args = parse_args(argv)
    try:
        run = load_run(args.run_dir)
        report = analyse(run, dictionary=args.dictionary, top_k=args.top_k, max_rows=args.max_rows,
                         split=args.split, window=args.window, cache=args.cache)
        from sparse_coding.feature_report import log_wandb, write_report

        written = write_report(run.path / "features", report)
        for line in summary_lines(report):
            print(line)
        print(f"wrote {', '.join(str(p) for p in written)}")
        if not args.no_wandb:
            where = log_wandb(run, run.path / "features", report)
            print(f"W&B: {where}")
    except SparseCodingError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
