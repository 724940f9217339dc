"""One rank's stream of a cached layer's rows: blocks read by memory map, shuffled, cut into batches.

`RowStream` reads the blocks of one split (training, held-out or in-sample) in a seeded order
(`order`: permuted by (seed, epoch) when shuffled), one shard mapped at a time, passes the rows
through a seeded shuffle buffer of `shuffle_buffer` rows (memory stays bounded by it whatever the
cache size) and yields batches: the rows tensor (training) or (rows, cluster ids) (evaluation).
NaN/Inf rows and the rows the massive-activation remedies leave out are skipped; rows are centred
with `mean` and normalised (sparse_coding.data.preprocess).

`stream_plan` cuts the stream into `world_size` contiguous parts of equal size (±1 row), one per
rank, and each rank's part among its DataLoader workers the same way; every rank yields the same
number of batches (a rank never waits on another). `start(epoch, skip, workers)` sets up a pass that
leaves out its first `skip` batches (a resumed run: sparse_coding.data.loader): workers skip whole
rounds of the DataLoader's round-robin, the loader drops the rest (`resume_plan`).

The cache data module (sparse_coding.data.cache_datamodule) makes one stream per split and rank.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset

from sparse_coding.cache.store import open_shard
from sparse_coding.data import preprocess
from sparse_coding.errors import DataError


def split_counts(total: int, parts: int) -> list[int]:
    """`total` cut into `parts` contiguous counts differing by at most one (larger first)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def batch_plan(n: int, n_batches: int, batch_size: int) -> list[int]:
    """Sizes of `n_batches` batches holding `n` rows: full batches first, none empty when possible."""
    if n_batches <= 0:
        return []
    sizes = [batch_size] * (n_batches - 1) + [n - batch_size * (n_batches - 1)]
    i = n_batches - 2
    while sizes[-1] < 1 and i >= 0:  # a shorter rank: borrow rows from the previous batches
        give = min(sizes[i] - 1, 1 - sizes[-1])
        sizes[i] -= give
        sizes[-1] += give
        i -= 1
    return [s for s in sizes if s > 0]


def stream_plan(total: int, world: int, workers: int, batch_size: int) -> list[list[tuple[int, int, list[int]]]]:
    """For every rank, for every worker: (start, stop) in the row stream and its batch sizes.

    Every rank gets the same number of batches per worker, so DDP ranks stay in step.
    """
    per_rank = split_counts(total, world)
    starts = np.concatenate([[0], np.cumsum(per_rank)]).tolist()
    segs = [split_counts(n, workers) for n in per_rank]
    n_batches = [max(math.ceil(max(segs[r][w] for r in range(world)) / batch_size), 0) for w in range(workers)]
    plan = []
    for r in range(world):
        pos = starts[r]
        row = []
        for w in range(workers):
            n = segs[r][w]
            row.append((pos, pos + n, batch_plan(n, n_batches[w], batch_size)))
            pos += n
        plan.append(row)
    return plan


class RowStream(IterableDataset):
    """Batches (float32 tensors, B × d) of one layer's rows for one rank; see the module docstring."""

    def __init__(self, files: list[Path], shard_rows: list[int], d: int, dtype: str, blocks: list[tuple[int, int, int]],
                 bad_rows: dict[int, np.ndarray], batch_size: int, shuffle: bool, shuffle_buffer: int, seed: int,
                 rank: int, world_size: int, mean: Optional[np.ndarray], skip_nonfinite: bool,
                 normalize: str = "none", evaluation: bool = False, group_of=None):
        self.files, self.shard_rows, self.d, self.dtype = files, shard_rows, d, dtype
        self.normalize = normalize
        # evaluation streams yield (rows, cluster ids); group_of maps global row indices to ids (None: -1)
        self.evaluation, self.group_of = evaluation, group_of
        self.row_offsets = np.concatenate([[0], np.cumsum(shard_rows)]).astype(np.int64)
        self.blocks, self.bad_rows = blocks, bad_rows
        self.batch_size, self.shuffle, self.shuffle_buffer, self.seed = batch_size, shuffle, shuffle_buffer, seed
        self.rank, self.world_size, self.mean, self.skip_nonfinite = rank, world_size, mean, skip_nonfinite
        self.epoch = 0
        self.skipped = 0
        self._open: Optional[tuple[int, np.ndarray]] = None  # (shard, its memory map): one shard mapped at a time
        self._skip = 0  # batches of this rank's loader the next pass leaves out (a resumed run)

    def start(self, epoch: int, skip: int, workers: int) -> int:
        """The next pass: `epoch`'s stream without the first `skip` batches this rank's loader (with `workers`
        loader workers) would yield. Returns the batches the loader drops itself (`resume_plan`)."""
        self.epoch, self._skip = epoch, skip
        return self.resume_plan(workers)[1]

    def resume_plan(self, workers: int) -> tuple[list[int], int]:
        """(batches each worker skips, batches the DataLoader then drops) to leave out the pass's first batches.

        The DataLoader reads workers round-robin (one that runs out leaves the rotation), so workers
        skip whole rounds and the loader drops the rest of the last, partial round.
        """
        nw = max(1, workers)
        if not self._skip:
            return [0] * nw, 0
        total = sum(self.block_len(b) for b in self.order())
        counts = [len(p[2]) for p in stream_plan(total, self.world_size, nw, self.batch_size)[self.rank]]
        left, skips, r = self._skip, [0] * nw, 0
        while r < max(counts, default=0):
            active = [w for w, c in enumerate(counts) if c > r]
            if left < len(active):
                break
            for w in active:
                skips[w] += 1
            left -= len(active)
            r += 1
        return skips, left

    def batches_per_epoch(self, workers: int) -> int:
        """Batches this rank's loader yields in one pass (the same every epoch and on every rank)."""
        total = sum(self.block_len(b) for b in range(len(self.blocks)))
        return sum(len(p[2]) for p in stream_plan(total, self.world_size, max(1, workers), self.batch_size)[self.rank])

    def batch_sizes(self, workers: int, rank: Optional[int] = None) -> list[int]:
        """A rank's batch sizes in one pass, in the order its DataLoader yields them (workers round-robin; one
        that runs out leaves the rotation)."""
        total = sum(self.block_len(b) for b in range(len(self.blocks)))
        plan = stream_plan(total, self.world_size, max(1, workers), self.batch_size)[self.rank if rank is None else rank]
        parts = [p[2] for p in plan]
        return [sizes[r] for r in range(max((len(x) for x in parts), default=0)) for sizes in parts if len(sizes) > r]

    def block_len(self, b: int) -> int:
        s, lo, hi = self.blocks[b]
        return hi - lo - (len(self.bad_rows[b]) if b in self.bad_rows else 0)

    def _map(self, shard: int) -> np.ndarray:
        """The shard's memory map. Only one map is kept open: pages of a dropped map leave the process's
        resident memory, so RSS stays bounded by one shard whatever the cache size (re-mapping costs
        one header read per block, negligible beside training on it)."""
        if self._open is None or self._open[0] != shard:
            self._open = None  # unmap the previous shard first
            self._open = (shard, open_shard(self.files[shard], self.shard_rows[shard], self.d, self.dtype))
        return self._open[1]

    def _read_block(self, b: int) -> np.ndarray:
        return self._read_block_rows(b)[0]

    def _read_block_rows(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """The block's kept rows (centred, normalised) and their global row indices in the layer."""
        s, lo, hi = self.blocks[b]
        x = np.array(self._map(s)[lo:hi], dtype=np.float32)  # a copy: the map is read-only
        rows = np.arange(lo, hi, dtype=np.int64) + self.row_offsets[s]
        ok = np.isfinite(x).all(axis=1)
        if b in self.bad_rows:
            ok[self.bad_rows[b]] = False
            self.skipped += int((~ok).sum())
            x, rows = x[ok], rows[ok]
        elif not ok.all():
            row = lo + int(np.flatnonzero(~ok)[0])
            if self.skip_nonfinite:  # the manifest's count missed this row: the advice below would be circular
                raise DataError(f"{self.files[s]}: row {row} holds NaN/Inf that the manifest does not count: the cache "
                                "changed after it was built; rebuild it")
            raise DataError(f"{self.files[s]}: row {row} holds NaN/Inf (use data.skip_nonfinite=true to skip such rows)")
        if self.mean is not None:
            x -= self.mean
        return preprocess.normalize_rows(x, self.normalize), rows

    def order(self) -> list[int]:
        idx = np.arange(len(self.blocks))
        if self.shuffle:
            idx = np.random.default_rng([self.seed, self.epoch]).permutation(idx)
        return idx.tolist()

    def _rows(self, order: list[int], start: int, stop: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Rows [start, stop) of the stream that reads the blocks in `order`, with their global row indices."""
        pos = 0
        for b in order:
            n = self.block_len(b)
            if pos + n > start and pos < stop:
                x, rows = self._read_block_rows(b)
                a, z = max(start - pos, 0), min(stop - pos, n)
                yield x[a:z], rows[a:z]
            pos += n
            if pos >= stop:
                return

    def _shuffled(self, chunks: Iterator[np.ndarray], n: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        cap = max(1, min(self.shuffle_buffer, n))
        buf = np.empty((cap, self.d), np.float32)
        fill = 0
        for chunk in chunks:
            take = min(cap - fill, len(chunk))
            buf[fill : fill + take] = chunk[:take]
            fill += take
            chunk = chunk[take:]
            for p in range(0, len(chunk), cap):
                piece = chunk[p : p + cap]
                slots = rng.choice(cap, size=len(piece), replace=False)
                out = buf[slots].copy()
                buf[slots] = piece
                yield out
        yield buf[:fill][rng.permutation(fill)]

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        order = self.order()
        total = sum(self.block_len(b) for b in order)
        start, stop, sizes = stream_plan(total, self.world_size, nw, self.batch_size)[self.rank][wid]
        skip = self.resume_plan(nw)[0][wid]
        self._skip = 0
        chunks = self._rows(order, start, stop)
        if self.evaluation:  # (rows, cluster ids)
            chunks = ((x, self.group_of(rows) if self.group_of else np.full(len(rows), -1, np.int64))
                      for x, rows in chunks)
        else:
            chunks = ((x,) for x, _ in chunks)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, wid, 1])
            chunks = ((x,) for x in self._shuffled((c[0] for c in chunks), stop - start, rng))
        pending: list[tuple] = []
        have = 0
        it = iter(sizes)
        want = next(it, None)
        for chunk in chunks:
            pending.append(chunk)
            have += len(chunk[0])
            while want is not None and have >= want:
                cat = tuple(np.concatenate(parts) for parts in zip(*pending)) if len(pending) > 1 else pending[0]
                if skip > 0:  # resuming: this batch was trained on before the checkpoint
                    skip -= 1
                else:
                    yield self._batch(tuple(a[:want] for a in cat))
                pending, have = [tuple(a[want:] for a in cat)], have - want
                want = next(it, None)
        if want is not None and have > 0 and skip <= 0:
            yield self._batch(tuple(np.concatenate(parts) for parts in zip(*pending)))

    def _batch(self, arrays: tuple):
        """A training batch is the rows tensor; an evaluation batch is (rows, cluster ids)."""
        tensors = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
        return tensors if self.evaluation else tensors[0]
