"""LightningDataModules for the synthetic sets, with an exact DDP batch split.

`SyntheticDataModule` holds one fixed sample in memory (`data.fresh=false`: n training rows, the
fixed-sample protocol); `FreshSyntheticDataModule` (`data.fresh=true`) draws every training batch
anew from the generator, keyed by (seed, epoch, batch), so no row is seen twice and the measurement
is the population value (docs/method.md §7). Both keep a fixed held-out set.

Every rank draws the same seeded permutation of the training rows each epoch and cuts the same
global batches; rank r takes its own contiguous share of each global batch. So a run on W
processes sees exactly the batches a 1-process run sees, and the averaged gradient is the same.

The training loader follows the run's own data position (sparse_coding.data.loader: the k-th batch
trained is batch k mod B of epoch k div B, k restored with the checkpoint), so a resumed run sees
exactly the batches of an uninterrupted one. Without a fitting trainer (a loader used by hand) the
sampler's `set_epoch` and the loader's `load_state_dict` choose the pass.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from sparse_coding.config.schema import DataConfig, SolverConfig
from sparse_coding.data.loader import Passes, ResumableLoader, trained_batches
from sparse_coding.data.synthetic import SyntheticSource, generate, stream_seed

NO_GROUP = -1  # evaluation rows of synthetic data are independent: no cluster ids (sparse_coding.metrics)


def _rank_and_world(trainer: "pl.Trainer | None") -> tuple[int, int]:
    if trainer is None:
        return 0, 1
    return trainer.global_rank, trainer.world_size


def synthetic_identity(name: str, dim: int, n: int, n_val: int, seed: int, scale: float, fresh: bool, active: float,
                       noise: float, preact_std: float) -> dict:
    """What makes a synthetic data set: every generator setting that changes its rows (`data.KEY`: value), the
    ones that apply to this generator. Stored in every checkpoint (the data module's `state_dict`) and compared
    on resume (sparse_coding.lifecycle.resume.check_same_data), so a run never continues on other data."""
    out = {"data.name": name, "data.dim": int(dim), "data.fresh": bool(fresh), "data.n": int(n), "data.n_val": int(n_val),
           "data.seed": int(seed), "data.scale": float(scale)}
    if name in ("sparse_linear", "sparse_nonlinear"):
        out["data.active"] = float(active)
    if name == "sparse_linear":
        out["data.noise"] = float(noise)
    if name == "sparse_nonlinear":
        out["data.preact_std"] = float(preact_std)
    return out


class RowBatches(Dataset):
    """Indexed by a tensor of row indices, returns those rows as one (B, d) batch."""

    def __init__(self, x: Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, rows: Tensor) -> Tensor:
        return self.x[rows]


class EvalBatches(RowBatches):
    """Evaluation batches: (rows, cluster ids); synthetic rows are independent, so every id is NO_GROUP."""

    def __getitem__(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        return self.x[rows], torch.full((len(rows),), NO_GROUP, dtype=torch.int64)


class GlobalBatchSampler(Sampler):
    """Yields this rank's share of each global batch; shuffled per epoch from (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._pass: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start(self, epoch: int, skip: int) -> int:
        """The next pass (set by the training loader): `epoch`, its first `skip` global batches left out; the
        loader drops none itself."""
        self._pass = (epoch, skip)
        return 0

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def _next_pass(self) -> tuple[int, int]:
        """(epoch, batches to skip) of the pass about to start: the loader's, else `set_epoch`'s from its start."""
        chosen, self._pass = self._pass, None
        return chosen if chosen is not None else (self.epoch, 0)

    def __iter__(self):
        epoch, skip = self._next_pass()
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        else:
            order = torch.arange(self.n)
        for start in range(skip * self.batch_size, self.n, self.batch_size):
            batch = order[start : start + self.batch_size]
            yield batch.tensor_split(self.world_size)[self.rank]


class SyntheticDataModule(pl.LightningDataModule):
    """A synthetic data set (docs/method.md §7), generated once; `n` training and `n_val` held-out rows."""

    def __init__(
        self,
        name: str,
        dim: int,
        n: int,
        n_val: int,
        seed: int = DataConfig.seed,  # the defaults are the schema's; a run passes every setting (from_config)
        active: float = DataConfig.active,
        noise: float = DataConfig.noise,
        scale: float = DataConfig.scale,
        batch_size: int = DataConfig.batch_size,
        eval_batch_size: int = SolverConfig.eval_batch_size,
        preact_std: float = DataConfig.preact_std,
    ) -> None:
        super().__init__()
        data = generate(name, dim, n + n_val, seed, active=active, noise=noise, preact_std=preact_std)
        x = data.x * scale
        self.train_x, self.val_x = x[:n].contiguous(), x[n:].contiguous()
        self.train_rows, self.val_rows = n, n_val
        # in-sample rows: as many training rows as held-out ones, spread over the whole training set
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed(seed, 11)))[:n_val]
        self.in_sample_x = self.train_x[pick.sort().values]
        self.truth = data.truth or None
        self._describe(name, dim, n, n_val, seed, scale, False, active, noise, preact_std, batch_size, eval_batch_size)

    def _describe(self, name: str, dim: int, n: int, n_val: int, seed: int, scale: float, fresh: bool, active: float,
                  noise: float, preact_std: float, batch_size: int, eval_batch_size: int) -> None:
        """The settings both synthetic modules keep: sizes, seeds, the data description and identity."""
        self.dim, self.eval_groups, self.group_unit = dim, 0, "rows"
        self.seed, self.batch_size, self.eval_batch_size = seed, batch_size, eval_batch_size
        self.data_identity = synthetic_identity(name, dim, n, n_val, seed, scale, fresh, active, noise, preact_std)
        generator = {k.removeprefix("data."): v for k, v in self.data_identity.items()
                     if k in ("data.active", "data.noise", "data.preact_std")}
        self.info = {"data": name, "fresh": fresh, ("rows_per_epoch" if fresh else "n_train"): n, "n_val": n_val,
                     "seed": seed, **generator}

    @classmethod
    def from_config(cls, cfg) -> "SyntheticDataModule":
        d = cfg.data
        kind = FreshSyntheticDataModule if d.fresh else SyntheticDataModule
        return kind(
            d.name, d.dim, d.n, d.n_val, seed=d.seed, active=d.active, noise=d.noise, scale=d.scale,
            batch_size=d.batch_size, eval_batch_size=cfg.solver.eval_batch_size, preact_std=d.preact_std,
        )

    def describe(self) -> dict:
        return {**self.info, "se_unit": self.group_unit}

    def identity(self) -> dict:
        """The data's identity (`synthetic_identity`)."""
        return dict(self.data_identity)

    def state_dict(self) -> dict:
        """Saved in every checkpoint: the data's identity, checked when a run resumes."""
        return {"data_identity": self.identity()}

    def init_rows(self, k: int, seed: int) -> Tensor:
        """k training rows chosen by `seed` (with replacement only when k exceeds the data)."""
        gen = torch.Generator().manual_seed(seed)
        n = self.train_x.shape[0]
        rows = torch.randperm(n, generator=gen)[:k] if k <= n else torch.randint(0, n, (k,), generator=gen)
        return self.train_x[rows]

    def _sampler(self, rows: int, batch_size: int, training: bool, kind=GlobalBatchSampler) -> GlobalBatchSampler:
        """Batches of `rows` rows; a training sampler is shuffled (fixed sample)."""
        rank, world = _rank_and_world(self.trainer)
        shuffle = training and kind is GlobalBatchSampler
        return kind(rows, batch_size, shuffle=shuffle, seed=self.seed, rank=rank, world_size=world)

    def _training_loader(self, dataset: Dataset, sampler: GlobalBatchSampler) -> ResumableLoader:
        """The training loader: each pass follows the run's data position (sparse_coding.data.loader)."""
        passes = Passes(lambda: len(sampler), lambda: trained_batches(self.trainer), lambda: sampler.epoch)
        return ResumableLoader(dataset, passes, sampler.start, sampler=sampler, batch_size=None)

    def batches_per_epoch(self) -> int:
        return -(-self.train_rows // self.batch_size)

    def epoch_batch_sizes(self) -> list[int]:
        """The global batch sizes of one epoch, in order (the last one may be short)."""
        rows = self.epoch_rows if self.train_rows is None else self.train_rows
        k = -(-rows // self.batch_size)
        return [self.batch_size] * (k - 1) + [rows - self.batch_size * (k - 1)] if k > 0 else []

    def train_dataloader(self) -> DataLoader:
        return self._training_loader(RowBatches(self.train_x), self._sampler(self.train_rows, self.batch_size, True))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_x)

    def in_sample_dataloader(self) -> DataLoader:
        """Training rows (as many as held out), evaluated like the held-out set: the in-sample measurement."""
        return self._eval_loader(self.in_sample_x)

    def _eval_loader(self, x: Tensor) -> DataLoader:
        return DataLoader(EvalBatches(x), sampler=self._sampler(x.shape[0], self.eval_batch_size, False), batch_size=None)


class FreshBatchSampler(GlobalBatchSampler):
    """Like GlobalBatchSampler over `n` rows an epoch, but yields (epoch, batch, rows, rank's slice) keys:
    the rows themselves are drawn fresh by FreshBatches."""

    def __iter__(self):
        epoch, skip = self._next_pass()
        for j in range(skip, len(self)):
            rows = min(self.batch_size, self.n - j * self.batch_size)
            share = torch.arange(rows).tensor_split(self.world_size)[self.rank]
            yield (epoch, j, rows, int(share[0]) if len(share) else 0, len(share))


class FreshBatches(Dataset):
    """Training batch (epoch, j): a global batch drawn from the source with seed (data seed, epoch, j); this
    rank's contiguous share of it. Every rank draws the same global batch, so DDP sees 1-process batches."""

    def __init__(self, source: SyntheticSource, seed: int, scale: float) -> None:
        self.source, self.seed, self.scale = source, seed, scale

    def __len__(self) -> int:
        return 0

    def __getitem__(self, key: tuple) -> Tensor:
        epoch, j, rows, lo, count = key
        x = self.source.draw(rows, stream_seed(self.seed, 1, epoch, j)).x * self.scale
        return x[lo:lo + count]


class FreshSyntheticDataModule(SyntheticDataModule):
    """`data.fresh=true`: training batches drawn fresh from the generator (an epoch is `n` rows); the
    held-out set (`n_val` rows) and the in-sample rows (the first `n_val` rows trained on) are fixed."""

    def __init__(self, name: str, dim: int, n: int, n_val: int, seed: int = DataConfig.seed,
                 active: float = DataConfig.active, noise: float = DataConfig.noise, scale: float = DataConfig.scale,
                 batch_size: int = DataConfig.batch_size, eval_batch_size: int = SolverConfig.eval_batch_size,
                 preact_std: float = DataConfig.preact_std) -> None:
        pl.LightningDataModule.__init__(self)
        self.source = SyntheticSource(name, dim, seed, active=active, noise=noise, preact_std=preact_std)
        held_out = self.source.draw(n_val, stream_seed(seed, 2))
        self.val_x = held_out.x * scale
        self.scale = scale
        self.train_rows, self.val_rows = None, n_val  # no finite training set
        self.epoch_rows = n
        self.truth = held_out.truth or None
        self._describe(name, dim, n, n_val, seed, scale, True, active, noise, preact_std, batch_size, eval_batch_size)
        first = FreshBatches(self.source, seed, scale)
        batches, got = [], 0
        for j in range(-(-n_val // batch_size)):  # the first rows of epoch 0, as training sees them
            rows = min(batch_size, n - j * batch_size) if j * batch_size < n else 0
            if rows <= 0:
                break
            batches.append(first[(0, j, rows, 0, rows)])
            got += rows
        self.in_sample_x = torch.cat(batches)[:n_val] if batches else self.val_x[:0]

    def init_rows(self, k: int, seed: int) -> Tensor:
        """k fresh rows for Phi's data init, drawn in fixed chunks keyed by `seed`: the first j rows do not
        depend on k (a dictionary starts alike alone and in a bank)."""
        chunk = 4096
        parts = [self.source.draw(chunk, stream_seed(self.seed, 3, seed, i)).x for i in range(-(-k // chunk))]
        return torch.cat(parts)[:k] * self.scale if parts else self.val_x[:0]

    def batches_per_epoch(self) -> int:
        return -(-self.epoch_rows // self.batch_size)

    def train_dataloader(self) -> DataLoader:
        sampler = self._sampler(self.epoch_rows, self.batch_size, True, FreshBatchSampler)
        return self._training_loader(FreshBatches(self.source, self.seed, self.scale), sampler)
