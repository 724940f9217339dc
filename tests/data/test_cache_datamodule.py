"""CacheDataModule: complete and disjoint splits, seeded shuffling, DDP rank split, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_coding.cache import build
from sparse_coding.config.plan import resolve
from sparse_coding.data.cache_datamodule import CacheDataModule
from sparse_coding.data.row_stream import batch_plan, stream_plan
from sparse_coding.errors import ConfigError, DataError
from tinymodels import make_tiny_gpt2, run_cfg

N, D = 5000, 8


def make_cache(tmp: Path, x: np.ndarray, name: str = "cache", shard_rows: int = 1000) -> Path:
    np.save(tmp / f"{name}.npy", x)
    return build.import_array(tmp / f"{name}.npy", tmp / name, shard_rows=shard_rows)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    # row i carries its own index in column 0, so every row can be identified after shuffling
    x = np.random.default_rng(1).standard_normal((N, D)).astype(np.float32)
    x[:, 0] = np.arange(N)
    return x, make_cache(tmp, x)


def ids(batches) -> np.ndarray:
    return np.concatenate([b[:, 0].numpy() for b in batches]).round().astype(int)


def test_train_and_val_cover_every_row_once(data):
    x, path = data
    dm = CacheDataModule(path, batch_size=256, shuffle_buffer=700, center=False)
    assert dm.dim == D and dm.truth is None
    train, val = list(dm.train_dataloader()), [b for b, _ in dm.val_dataloader()]
    assert all(b.dtype == torch.float32 and b.ndim == 2 and b.shape[1] == D for b in train + val)
    assert all(len(b) == 256 for b in train[:-1])
    t, v = ids(train), ids(val)
    assert len(set(t) & set(v)) == 0
    assert sorted(np.concatenate([t, v]).tolist()) == list(range(N))
    assert len(v) == dm.val_rows == 500 and len(t) == dm.train_rows == 4500
    assert np.all(np.diff(v) > 0)  # validation is read in order
    np.testing.assert_array_equal(torch.cat(train).numpy(), x[t])  # rows are intact
    assert not np.all(np.diff(t) > 0)  # training is shuffled
    d = dm.describe()
    assert d["rows"] == N and d["train_rows"] == 4500 and d["cache_path"] == str(path) and d["layer"] == "data"


def test_shuffle_is_seeded_and_changes_per_epoch(data):
    _, path = data
    a = CacheDataModule(path, batch_size=256, shuffle_buffer=700, seed=3)
    b = CacheDataModule(path, batch_size=256, shuffle_buffer=700, seed=3)
    a.set_epoch(0), b.set_epoch(0)
    assert np.array_equal(ids(a.train_dataloader()), ids(b.train_dataloader()))
    b.set_epoch(1)
    e1 = ids(b.train_dataloader())
    assert not np.array_equal(ids(a.train_dataloader()), e1) and sorted(e1) == sorted(ids(a.train_dataloader()))
    c = CacheDataModule(path, batch_size=256, shuffle_buffer=700, seed=4)
    c.set_epoch(0)
    assert not np.array_equal(ids(a.train_dataloader()), ids(c.train_dataloader()))
    # without set_epoch, successive passes are successive epochs
    d = CacheDataModule(path, batch_size=256, shuffle_buffer=700, seed=3)
    assert np.array_equal(ids(d.train_dataloader()), ids(a.train_dataloader()))
    assert np.array_equal(ids(d.train_dataloader()), e1)


def test_centering_uses_the_stored_mean(data):
    x, path = data
    dm = CacheDataModule(path, batch_size=1000, center=True)
    rows = torch.cat(list(dm.train_dataloader()) + [b for b, _ in dm.val_dataloader()]).numpy().astype(np.float64)
    np.testing.assert_allclose(rows.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(rows[:, 1:].std(0), x[:, 1:].std(0), rtol=1e-5)


@pytest.mark.parametrize("world,workers,batch", [(2, 1, 256), (3, 1, 500), (4, 2, 100), (3, 1, 1125)])
def test_ddp_ranks_are_disjoint_complete_and_in_step(data, world, workers, batch):
    _, path = data
    seen, counts = [], []
    for rank in range(world):
        dm = CacheDataModule(path, batch_size=batch, shuffle_buffer=300, rank=rank, world_size=world,
                             num_workers=workers, center=False)
        dm.set_epoch(2)
        tb = list(dm.train_dataloader())
        seen.append(set(ids(tb).tolist()))
        counts.append(len(tb))
        vb = [b for b, _ in dm.val_dataloader()]
        seen.append(set(ids(vb).tolist()))
        counts.append(len(vb))
    train = [seen[i] for i in range(0, 2 * world, 2)]
    val = [seen[i] for i in range(1, 2 * world, 2)]
    for group, total in ((train, 4500), (val, 500)):
        assert sum(len(s) for s in group) == total
        assert len(set().union(*group)) == total  # disjoint and together complete
    assert len(set(counts[0::2])) == 1 and len(set(counts[1::2])) == 1  # every rank yields as many batches


def test_batch_plans_keep_ranks_in_step():
    # 4500 rows, 4 ranks: 1125 each; with B=1125 all ranks get 1 batch
    assert [p[0][2] for p in stream_plan(4500, 4, 1, 1125)] == [[1125]] * 4
    # 4501 rows, 2 ranks, B=2250: 2251 + 2250 rows -> both get 2 batches, none empty
    plans = stream_plan(4501, 2, 1, 2250)
    assert [len(p[0][2]) for p in plans] == [2, 2] and all(min(p[0][2]) >= 1 for p in plans)
    assert sum(sum(p[0][2]) for p in plans) == 4501
    assert batch_plan(10, 3, 5) == [5, 4, 1]


def test_corrupted_shard_stops_training(data, tmp_path):
    _, clean = data
    path = tmp_path / "c"
    shutil.copytree(clean, path)
    CacheDataModule(path)  # verified once, recorded
    assert (path / "verified.json").is_file()
    shard = path / "layers" / "data" / "shard_00003.npy"
    raw = bytearray(shard.read_bytes())
    raw[200] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"shard_00003\.npy: sha256 does not match"):
        CacheDataModule(path)
    shard.write_bytes(bytes(raw[:-64]))
    with pytest.raises(DataError, match=r"shard_00003\.npy: cannot be read as \.npy"):
        CacheDataModule(path)


def test_nonfinite_rows_fail_or_are_skipped(tmp_path):
    x = np.random.default_rng(2).standard_normal((2000, 4)).astype(np.float32)
    x[:, 0] = np.arange(2000)
    x[[7, 1500], 2] = np.nan
    x[900, 1] = np.inf
    path = make_cache(tmp_path, x, shard_rows=500)
    with pytest.raises(DataError, match=r"shard_00000\.npy: 3 rows hold NaN/Inf \(first: row 7\).*skip_nonfinite"):
        CacheDataModule(path)
    dm = CacheDataModule(path, batch_size=128, skip_nonfinite=True, center=True)
    rows = torch.cat(list(dm.train_dataloader()) + [b for b, _ in dm.val_dataloader()])
    assert torch.isfinite(rows).all() and len(rows) == 1997 == dm.train_rows + dm.val_rows
    assert dm.describe()["nonfinite_rows_skipped"] == 3
    good = np.delete(x, [7, 900, 1500], axis=0).astype(np.float64)
    np.testing.assert_allclose(dm.mean, good.mean(0), rtol=1e-6)  # statistics ignore the bad rows


def test_width_and_model_mismatch(tmp_path):
    tiny = make_tiny_gpt2(tmp_path / "tiny")
    cfg = run_cfg(["model=gpt2", f"model.path={tiny}", "layer=0", "data.batch_size=64"])
    path = make_cache(tmp_path, np.zeros((300, 16), np.float32))  # d=16, the model has 32
    with pytest.raises(ConfigError, match="width d=16, the model has d=32"):
        CacheDataModule(path, expected_dim=32)
    built = build.ensure_cache(run_cfg(["model=gpt2", f"model.path={tiny}", "layer=1", "corpus=kjv",
                                        "corpus.context_len=16", "corpus.max_tokens=400", f"cache_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="layer 0 is not in this cache \\(it holds 1\\)"):
        CacheDataModule.from_config(cfg, resolve(cfg).data, built)
    one = run_cfg(["model=gpt2", f"model.path={tiny}", "layer=1", "data.batch_size=64"])
    dm = CacheDataModule.from_config(one, resolve(one).data, built)
    assert dm.dim == 32 and dm.describe()["model"] == "gpt2" and dm.describe()["corpus"] == "kjv"
    assert next(iter(dm.train_dataloader())).shape == (64, 32)
    with pytest.raises(ConfigError, match="cache of model gpt2, the run asks for model=minilm"):
        minilm = run_cfg(["model=minilm", "layer=1"])
        CacheDataModule.from_config(minilm, resolve(minilm).data, built)


def test_lightning_fit_reads_the_trainer_epoch(data):
    import pytorch_lightning as pl

    _, path = data

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.epochs: dict[int, list] = {}

        def training_step(self, batch, i):
            self.epochs.setdefault(self.current_epoch, []).append(batch[:, 0].round().long())
            return (self.w * batch.mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = CacheDataModule(path, batch_size=500, shuffle_buffer=1000)
    rec = Recorder()
    pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               num_sanity_val_steps=0, limit_val_batches=0, enable_model_summary=False).fit(rec, datamodule=dm)
    e0, e1 = (torch.cat(rec.epochs[e]).numpy() for e in (0, 1))
    assert sorted(e0) == sorted(e1) and len(e0) == 4500 and not np.array_equal(e0, e1)
    ref = CacheDataModule(path, batch_size=500, shuffle_buffer=1000)
    ref.set_epoch(1)
    np.testing.assert_array_equal(e1, ids(ref.train_dataloader()))
