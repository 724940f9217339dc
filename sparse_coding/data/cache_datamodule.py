"""Rows of an activation cache for training and measurement: memory-mapped, shuffled, split, DDP-aware.

`CacheDataModule` reads one layer of a cache built by `python -m sparse_coding.cache` (the rows of a
split are read by `sparse_coding.data.row_stream.RowStream`):

- rows are cut into blocks (at most 1024 rows, never across shards); an evenly spaced, fixed
  set of blocks (`val_fraction` of them) is the validation split, the rest is training, so the
  two never share a row;
- training order: the training blocks are permuted with (seed, epoch), read by memory map one
  block at a time and passed through a seeded shuffle buffer of `shuffle_buffer` rows; memory
  stays bounded by the buffer whatever the cache size. Validation is read in order;
- under DDP the (permuted) row stream is cut into `world_size` contiguous parts of equal size
  (±1 row), one per rank: disjoint, together complete, and every rank yields the same number of
  batches (a rank never waits on another). DataLoader workers split a rank's part the same way.
  `batch_size` is the global batch, as for synthetic data: each rank's batches hold ⌈B / W⌉ rows;
- rows are centred with the cache's stored mean when `center` is true; `drop_positions`,
  `max_norm_ratio` and `normalize` apply the massive-activation remedies of `sparse_coding.data.preprocess`
  (dropped rows are skipped like NaN rows, the mean is then taken over the kept rows; normalisation
  follows centring);
- the training loader follows the run's own data position (sparse_coding.data.loader: the k-th batch
  trained is batch k mod B of epoch k div B, k restored with the checkpoint), regenerating that
  epoch's seeded stream and dropping the batches already trained on, so a resumed run
  (`ckpt_path=last`, from any checkpoint) sees exactly the batches an uninterrupted run sees;
- `init_rows(k, seed)`: k seeded, centred training rows, the same on every rank (Phi's data init);
- evaluation batches are (rows, cluster ids): the held-out blocks and, for the final in-sample
  measurement, as many evenly spaced training blocks (`in_sample_dataloader`); a row's cluster is
  the context it came from (hidden-state caches record rows per context), so standard errors are
  cluster-robust (sparse_coding.metrics); caches without contexts have independent rows (id -1);
- every shard of the layer is checked against the manifest's sha256 each time a cache is opened
  (`cache.store.ensure_verified`: nothing about a file is trusted); a bad shard, a manifest that
  does not match, a cache of another model or width than the run's, or NaN/Inf rows stop with one
  line naming the file (NaN/Inf rows are skipped and counted instead with `skip_nonfinite=True`).

The settings come checked (sparse_coding.config.checks owns every check of `data.*`); `from_config`
takes the run's plan: the layer, the model's width and the cache folder.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from sparse_coding.cache.store import (cache_blocks, cache_file, ensure_verified, model_dtype_of, open_shard,
                                       read_manifest, read_mean, select_layer, shard_paths, split_blocks)
from sparse_coding.config.schema import DataConfig
from sparse_coding.data import preprocess
from sparse_coding.data.loader import Passes, ResumableLoader, trained_batches
from sparse_coding.data.row_stream import RowStream
from sparse_coding.errors import ConfigError, DataError

MIN_VAL_ROWS = 2  # fvu divides by the held-out variance: a single row has none


class CacheDataModule(pl.LightningDataModule):
    """Rows of one cached layer as (B × d) float32 batches; `.dim`, `.truth` (None), `.describe()`."""

    def __init__(self, path: Any, layer: Any = None, batch_size: int = DataConfig.batch_size,
                 val_fraction: float = DataConfig.val_fraction, shuffle_buffer: int = DataConfig.shuffle_buffer,
                 seed: int = DataConfig.seed, center: bool = DataConfig.center,
                 skip_nonfinite: bool = DataConfig.skip_nonfinite, num_workers: int = DataConfig.num_workers, *,
                 rank: Optional[int] = None, world_size: Optional[int] = None, expected_dim: Optional[int] = None,
                 expected_model: Optional[tuple[str, str]] = None, verify: bool = True,
                 drop_positions: int = DataConfig.drop_positions, normalize: str = DataConfig.normalize,
                 max_norm_ratio: float = DataConfig.max_norm_ratio):
        """`expected_model`: (model.name, model.dtype) of the run, `expected_dim` the model's width; a cache of
        another model, compute dtype or width is refused."""
        super().__init__()
        self.path = Path(path)
        m = read_manifest(self.path)
        self.manifest = m
        if expected_model is not None:
            check_model(m, self.path, *expected_model)
        self.layer = select_layer(m, layer, self.path)
        self.dim = int(m["d"])
        if expected_dim is not None and int(expected_dim) != self.dim:
            raise ConfigError(f"{self.path}/manifest.json: the cache holds width d={self.dim}, the model has "
                              f"d={expected_dim}: this cache was not made by this model")
        self.batch_size, self.val_fraction, self.shuffle_buffer = int(batch_size), float(val_fraction), int(shuffle_buffer)
        self.seed, self.center, self.skip_nonfinite, self.num_workers = int(seed), bool(center), bool(skip_nonfinite), int(num_workers)
        self._rank, self._world = rank, world_size
        self.truth = None
        self._epoch: Optional[int] = None
        self._passes = 0
        entries = m["shards"][self.layer]
        self.files = shard_paths(self.path, m, self.layer)
        self.shard_rows = [int(e["rows"]) for e in entries]
        if sum(self.shard_rows) != int(m["n_rows"]):
            raise DataError(f"{self.path}/manifest.json: shards of layer {self.layer} hold {sum(self.shard_rows)} rows, "
                            f"the manifest says {m['n_rows']}")
        for f, r in zip(self.files, self.shard_rows):  # shape/dtype of every shard against the manifest, cheaply
            open_shard(f, r, self.dim, m["dtype"])
        self.verification = ensure_verified(self.path, self.layer, manifest=m) if verify else {"verified": False}
        st = m["stats"][self.layer]
        self.n_nonfinite = int(st.get("n_nonfinite", 0))
        if self.n_nonfinite and not self.skip_nonfinite:
            bad = st.get("first_nonfinite") or {}
            raise DataError(f"{self.path / 'layers' / self.layer / str(bad.get('file'))}: {self.n_nonfinite} rows "
                            f"hold NaN/Inf (first: row {bad.get('row')}); set data.skip_nonfinite=true to skip them")
        msn = float(st.get("mean_sq_norm", 1.0))
        if msn == 0 or (self.center and float(st.get("centered_mean_sq_norm", 1.0)) <= 1e-10 * msn):
            what = "zero" if msn == 0 else "the same (zero after centring with data.center=true)"
            raise DataError(f"{self.path}: every row of layer {self.layer} is {what}: there is nothing to code; "
                            "check how the cache was made")
        mean_file = cache_file(self.path, st["mean_file"])
        stored_mean = read_mean(mean_file, self.dim) if self.center else None
        self.mean = None if stored_mean is None else stored_mean.astype(np.float32)
        n = int(m["n_rows"])
        self.blocks = cache_blocks(self.shard_rows)
        self.train_blocks, self.val_blocks = split_blocks(self.blocks, self.val_fraction)
        if not self.train_blocks or not self.val_blocks:
            raise DataError(f"{self.path}: {n} rows are too few to split into training and validation "
                            f"(data.val_fraction={self.val_fraction}); a cache needs at least 2 rows")
        self._bad = self._scan_nonfinite() if self.n_nonfinite else ({}, {})
        self.drop_positions, self.normalize = int(drop_positions), str(normalize)
        self.max_norm_ratio, self.norm_dropped, self.median_norm = float(max_norm_ratio), None, None
        drops = {}  # {index in self.blocks: rows left out by the massive-activation remedies (preprocess.py)}
        if self.drop_positions > 0:
            drops = preprocess.dropped_rows(m, self.shard_rows, self.blocks, self.drop_positions)
        if self.max_norm_ratio > 0:
            outliers, self.median_norm = preprocess.norm_outliers(
                lambda i: self._raw_block(self.blocks[i]), len(self.blocks), self.max_norm_ratio)
            merged = preprocess.merge_skips(drops, outliers)
            # the rows the norm rule leaves out beyond drop_positions (the whole layer: train + held-out)
            self.norm_dropped = sum(len(v) for v in merged.values()) - sum(len(v) for v in drops.values())
            drops = merged
        if drops:  # skipped like NaN rows; the centring mean is then taken over the kept rows
            index = {b: i for i, b in enumerate(self.blocks)}
            def split(blocks):
                return {j: drops[index[b]] for j, b in enumerate(blocks) if index[b] in drops}
            self._bad = (preprocess.merge_skips(self._bad[0], split(self.train_blocks)),
                         preprocess.merge_skips(self._bad[1], split(self.val_blocks)))
            if self.center:
                self.mean = preprocess.kept_mean(stored_mean, n - self.n_nonfinite,
                                                 lambda i: self._raw_block(self.blocks[i]), drops).astype(np.float32)
        self.in_sample_blocks, in_sample_bad = self._in_sample_split()
        self._bad = (*self._bad[:2], in_sample_bad)
        self.group_unit, self.eval_groups, self.in_sample_groups = "rows", 0, 0
        self._group_maps: tuple = (None, None)
        rpc = len((m.get("corpus") or {}).get("keep_positions") or []) if m.get("kind") == "hidden_states" else 0
        if rpc > 0:  # rows of one context are a cluster
            self.group_unit = f"contexts of {rpc} rows"
            self._group_maps = (self._context_groups(self.val_blocks, rpc), self._context_groups(self.in_sample_blocks, rpc))
            self.eval_groups, self.in_sample_groups = (g[1] for g in self._group_maps)
        self.train_rows = sum(hi - lo for _, lo, hi in self.train_blocks) - sum(len(v) for v in self._bad[0].values())
        self.val_rows = sum(hi - lo for _, lo, hi in self.val_blocks) - sum(len(v) for v in self._bad[1].values())
        self.in_sample_rows = (sum(hi - lo for _, lo, hi in self.in_sample_blocks)
                               - sum(len(v) for v in self._bad[2].values()))
        if self.val_rows < MIN_VAL_ROWS or self.train_rows < 1:
            raise DataError(f"{self.path}: {self.train_rows} training and {self.val_rows} held-out rows (of {n}) are too "
                            f"few to measure: fvu needs at least {MIN_VAL_ROWS} held-out rows; use a larger cache "
                            "or a larger data.val_fraction")
        self.num_workers = self._capped_workers(self.num_workers)

    def _capped_workers(self, requested: int) -> int:
        """data.num_workers, lowered so that every loader worker holds at least one full training batch: a worker
        batches only its own part of the rows, so more workers than full batches cut every batch short."""
        full = self.train_rows // max(1, self.batch_size)
        capped = min(requested, max(1, full))
        if capped < requested:
            print(f"[data] data.num_workers={requested} lowered to {capped}: the {self.train_rows:,} training rows make "
                  f"{full} full batch{'es' if full != 1 else ''} of data.batch_size={self.batch_size} and a loader "
                  "worker needs at least one (more workers would cut every batch short)", file=sys.stderr)
        return capped

    def _eval_workers(self, rows: int) -> int:
        """Loader workers for an evaluation pass over `rows` rows: at most one per full batch (0: in this process)."""
        return min(self.num_workers, rows // max(1, self.batch_size))

    def _in_sample_split(self) -> tuple[list, dict]:
        """Evenly spaced training blocks, as many as held-out blocks (all when there are fewer), and their
        skipped rows: the rows of the in-sample measurement."""
        k = min(len(self.val_blocks), len(self.train_blocks))
        picks = sorted(set(np.linspace(0, len(self.train_blocks) - 1, k).round().astype(int).tolist()))
        bad = {j: self._bad[0][i] for j, i in enumerate(picks) if i in self._bad[0]}
        return [self.train_blocks[i] for i in picks], bad

    def _context_groups(self, blocks: list, rows_per_context: int) -> tuple:
        """(global row indices -> cluster id in [0, G), G) for the contexts the blocks span."""
        offsets = np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)
        spans = [np.arange((offsets[s] + lo) // rows_per_context, (offsets[s] + hi - 1) // rows_per_context + 1)
                 for s, lo, hi in blocks]
        contexts = np.unique(np.concatenate(spans)) if spans else np.zeros(0, np.int64)

        def group_of(rows: np.ndarray) -> np.ndarray:
            return np.searchsorted(contexts, rows // rows_per_context).astype(np.int64)
        return group_of, len(contexts)

    def _raw_block(self, block: tuple[int, int, int]) -> np.ndarray:
        s, lo, hi = block
        return open_shard(self.files[s], self.shard_rows[s], self.dim, self.manifest["dtype"])[lo:hi]

    def _scan_nonfinite(self) -> tuple[dict, dict]:
        """Row indices holding NaN/Inf per block (train, val): read once, only when the manifest counts some."""
        out = []
        for blocks in (self.train_blocks, self.val_blocks):
            bad = {}
            for i, (s, lo, hi) in enumerate(blocks):
                x = open_shard(self.files[s], self.shard_rows[s], self.dim, self.manifest["dtype"])[lo:hi]
                ok = np.isfinite(x).all(axis=1)
                if not ok.all():
                    bad[i] = np.flatnonzero(~ok)
            out.append(bad)
        return out[0], out[1]

    @classmethod
    def from_config(cls, cfg: Any, data: Any, path: Any) -> "CacheDataModule":
        """From a composed run config, its plan's data (`config.plan.DataPlan`: the layer; with a model, the model's
        width) and the cache folder (data.path, or the one `ensure_cache` found or built); cfg.data holds the
        loader settings."""
        d, model = cfg.data, cfg.model
        return cls(path, data.layer, batch_size=d.batch_size, val_fraction=d.val_fraction, shuffle_buffer=d.shuffle_buffer,
                   seed=d.seed, center=d.center, skip_nonfinite=d.skip_nonfinite, num_workers=d.num_workers,
                   expected_dim=None if model is None else data.model.width,
                   expected_model=None if model is None else (model.name, str(model.dtype)),
                   drop_positions=d.drop_positions, normalize=d.normalize, max_norm_ratio=d.max_norm_ratio)

    # -- distributed and epochs

    def rank_world(self) -> tuple[int, int]:
        if self._rank is not None or self._world is not None:
            rank, world = int(self._rank or 0), int(self._world or 1)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = 0, 1
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        return rank, world

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch used for the next training pass (otherwise: the trainer's epoch, or a pass counter)."""
        self._epoch = int(epoch)

    def _current_epoch(self) -> int:
        if self._epoch is not None:
            return self._epoch
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.current_epoch)
        e = self._passes
        self._passes += 1
        return e

    def _stream(self, blocks, bad, shuffle: bool, evaluation: bool = False, group_of=None) -> RowStream:
        rank, world = self.rank_world()
        per_rank = -(-self.batch_size // world)  # data.batch_size is the global batch: each rank takes ceil(B / W)
        return RowStream(self.files, self.shard_rows, self.dim, self.manifest["dtype"], blocks, bad, per_rank,
                         shuffle, self.shuffle_buffer, self.seed, rank, world, self.mean, self.skip_nonfinite,
                         normalize=self.normalize, evaluation=evaluation, group_of=group_of)

    def batches_per_epoch(self) -> int:
        return self._stream(self.train_blocks, self._bad[0], True).batches_per_epoch(self.num_workers)

    def epoch_batch_sizes(self) -> list[int]:
        """The global batch sizes of one epoch (every rank's batch at each step together), in order."""
        stream = self._stream(self.train_blocks, self._bad[0], True)
        per_rank = [stream.batch_sizes(self.num_workers, r) for r in range(stream.world_size)]
        return [sum(sizes) for sizes in zip(*per_rank)]

    def train_dataloader(self) -> DataLoader:
        """Each pass follows the run's data position (sparse_coding.data.loader); outside a fit the epoch is
        `set_epoch`'s, else the trainer's, else the next of successive passes."""
        stream, workers = self._stream(self.train_blocks, self._bad[0], True), self.num_workers
        passes = Passes(lambda: stream.batches_per_epoch(workers), lambda: trained_batches(getattr(self, "trainer", None)),
                        self._current_epoch)
        return ResumableLoader(stream, passes, lambda epoch, skip: stream.start(epoch, skip, workers), batch_size=None,
                               num_workers=workers)

    def init_rows(self, k: int, seed: int) -> torch.Tensor:
        """k training rows (centred like training batches) chosen by `seed`, the same on every rank.

        Row positions are a seeded permutation of the training rows, so the first j rows do not depend
        on k; with replacement only when k exceeds the training rows.
        """
        n = self.train_rows
        rng = np.random.default_rng([int(seed), 7])
        pos = rng.permutation(n)[:k] if k <= n else rng.integers(0, n, size=k)
        stream = RowStream(self.files, self.shard_rows, self.dim, self.manifest["dtype"], self.train_blocks, self._bad[0],
                           self.batch_size, False, self.shuffle_buffer, self.seed, 0, 1, self.mean, self.skip_nonfinite,
                           normalize=self.normalize)
        out = np.empty((len(pos), self.dim), np.float32)
        order = np.argsort(pos, kind="stable")
        sorted_pos = pos[order]
        first = 0
        for b in range(len(self.train_blocks)):
            n_b = stream.block_len(b)
            lo, hi = np.searchsorted(sorted_pos, [first, first + n_b])
            if hi > lo:
                out[order[lo:hi]] = stream._read_block(b)[sorted_pos[lo:hi] - first]
            first += n_b
        return torch.from_numpy(out)

    def val_dataloader(self) -> DataLoader:
        stream = self._stream(self.val_blocks, self._bad[1], False, evaluation=True, group_of=self._group_maps[0] and self._group_maps[0][0])
        return DataLoader(stream, batch_size=None, num_workers=self._eval_workers(self.val_rows))

    def in_sample_dataloader(self) -> DataLoader:
        """Training rows (evenly spaced blocks, as many rows as held out), evaluated like the held-out set."""
        stream = self._stream(self.in_sample_blocks, self._bad[2], False, evaluation=True,
                              group_of=self._group_maps[1] and self._group_maps[1][0])
        return DataLoader(stream, batch_size=None, num_workers=self._eval_workers(self.in_sample_rows))

    def describe(self) -> dict:
        m = self.manifest
        return {
            "source": "cache",
            "cache_path": str(self.path),
            "kind": m.get("kind"),
            "model": (m.get("model") or {}).get("name"),
            "model_fingerprint": (m.get("model") or {}).get("fingerprint"),
            "corpus": (m.get("corpus") or {}).get("name"),
            "layer": self.layer,
            "d": self.dim,
            "dtype": m["dtype"],
            "rows": int(m["n_rows"]),
            "tokens": int(m.get("n_tokens", m["n_rows"])),
            "train_rows": self.train_rows,
            "val_rows": self.val_rows,
            "in_sample_rows": self.in_sample_rows,
            "se_unit": self.group_unit,
            "nonfinite_rows_skipped": self.n_nonfinite,
            "centered": self.center,
            **preprocess.describe(self.drop_positions, self.normalize,
                                  self.center if self.drop_positions or self.max_norm_ratio else None,
                                  self.max_norm_ratio, self.norm_dropped, self.median_norm),
            "checksums_verified": bool(self.verification.get("verified")),
        }

    def identity(self) -> dict:
        """What makes this data set (`data.KEY`: value): the layer's content (sha256 over its shards' and mean's
        sha256 in the manifest, which every open verifies), the build that made it, and every data setting that
        changes which rows train or how they look. Stored in every checkpoint (`state_dict`) and compared on resume
        (sparse_coding.lifecycle.resume.check_same_data), so a run never continues on another cache, or on a cache
        swapped under the same path. Keys starting with "_" only inform (the path may move)."""
        import hashlib
        import json

        m = self.manifest
        content = {"shards": [[e.get("rows"), e.get("sha256")] for e in m["shards"][self.layer]],
                   "mean": (m["stats"][self.layer] or {}).get("mean_sha256"), "d": self.dim, "dtype": m["dtype"]}
        build = m.get("build") or {k: (m.get(k) or {}).get("fingerprint") for k in ("model", "corpus")}
        return {"data.name": "cache",
                "cache content": hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16],
                "cache build": hashlib.sha256(json.dumps(build, sort_keys=True, default=str).encode()).hexdigest()[:16],
                "layer": self.layer, "data.val_fraction": self.val_fraction, "data.center": self.center,
                "data.skip_nonfinite": self.skip_nonfinite, "data.drop_positions": self.drop_positions,
                "data.max_norm_ratio": self.max_norm_ratio, "data.normalize": self.normalize,
                "_data.path": str(self.path)}

    def state_dict(self) -> dict:
        """Saved in every checkpoint: the data's identity, checked when a run resumes."""
        return {"data_identity": self.identity()}


def check_model(manifest: dict, path: Path, name: str, dtype: str) -> None:
    """A cache of the run's model, computed in the run's `model.dtype` (when its manifest records them)."""
    if manifest.get("model") and manifest["model"].get("name") != name:
        raise ConfigError(f"{path}/manifest.json: cache of model {manifest['model'].get('name')}, the run asks for "
                          f"model={name}")
    built_in = model_dtype_of(manifest)
    if built_in is not None and built_in != dtype:
        raise ConfigError(f"{path}/manifest.json: activations computed with model.dtype={built_in}, the run asks "
                          f"for model.dtype={dtype}: use model.dtype={built_in} or the cache of "
                          f"model.dtype={dtype} (built without data.path)")
