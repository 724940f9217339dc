"""The cache data module (sparse_coding.data.cache_datamodule): complete and disjoint splits, seeded shuffling, the
DDP rank split, the centring mean, the in-sample blocks and context clusters, init rows, and the caches it refuses
(damaged shards, non-finite rows, nothing to code, too few rows, another model or width)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from sparse_coding.cache import build, store
from sparse_coding.config.plan import resolve
from sparse_coding.data.cache_datamodule import CacheDataModule
from sparse_coding.errors import ConfigError, DataError
from tests.helpers import import_cache
from tests.helpers import row_ids as ids
from tests.tinymodels import run_cfg


def test_train_and_val_cover_every_row_once(indexed_cache):
    x, path = indexed_cache
    dm = CacheDataModule(path, batch_size=256, shuffle_buffer=700, center=False)
    assert dm.dim == x.shape[1] and dm.truth is None
    train, val = list(dm.train_dataloader()), [b for b, _ in dm.val_dataloader()]
    assert all(b.dtype == torch.float32 and b.ndim == 2 and b.shape[1] == x.shape[1] for b in train + val)
    assert all(len(b) == 256 for b in train[:-1])
    t, v = ids(train), ids(val)
    assert len(set(t) & set(v)) == 0
    assert sorted(np.concatenate([t, v]).tolist()) == list(range(len(x)))
    assert len(v) == dm.val_rows == 500 and len(t) == dm.train_rows == 4500
    assert np.all(np.diff(v) > 0)  # validation is read in order
    np.testing.assert_array_equal(torch.cat(train).numpy(), x[t])  # rows are intact
    assert not np.all(np.diff(t) > 0)  # training is shuffled
    d = dm.describe()
    assert d["rows"] == len(x) and d["train_rows"] == 4500 and d["cache_path"] == str(path) and d["layer"] == "data"


def test_shuffle_is_seeded_and_changes_per_epoch(indexed_cache):
    _, path = indexed_cache
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


def test_centering_uses_the_stored_mean(indexed_cache):
    x, path = indexed_cache
    dm = CacheDataModule(path, batch_size=1000, center=True)
    rows = torch.cat(list(dm.train_dataloader()) + [b for b, _ in dm.val_dataloader()]).numpy().astype(np.float64)
    np.testing.assert_allclose(rows.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(rows[:, 1:].std(0), x[:, 1:].std(0), rtol=1e-5)


@pytest.mark.parametrize("world,workers,batch", [(2, 1, 256), (3, 1, 500), (4, 2, 100), (3, 1, 1125)])
def test_ddp_ranks_are_disjoint_complete_and_in_step(indexed_cache, world, workers, batch):
    _, path = indexed_cache
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


def test_corrupted_shard_stops_training(indexed_cache, tmp_path):
    _, clean = indexed_cache
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
    path = import_cache(tmp_path / "cache", x, shard_rows=500)
    with pytest.raises(DataError, match=r"shard_00000\.npy: 3 rows hold NaN/Inf \(first: row 7\).*skip_nonfinite"):
        CacheDataModule(path)
    dm = CacheDataModule(path, batch_size=128, skip_nonfinite=True, center=True)
    rows = torch.cat(list(dm.train_dataloader()) + [b for b, _ in dm.val_dataloader()])
    assert torch.isfinite(rows).all() and len(rows) == 1997 == dm.train_rows + dm.val_rows
    assert dm.describe()["nonfinite_rows_skipped"] == 3
    good = np.delete(x, [7, 900, 1500], axis=0).astype(np.float64)
    np.testing.assert_allclose(dm.mean, good.mean(0), rtol=1e-6)  # statistics ignore the bad rows


def test_width_and_model_mismatch(tiny_gpt2, tmp_path):
    tiny = tiny_gpt2
    cfg = run_cfg(["model=gpt2", f"model.path={tiny}", "layer=0", "data.batch_size=64"])
    path = import_cache(tmp_path / "cache", np.zeros((300, 16), np.float32), shard_rows=1000)  # d=16, the model has 32
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


def test_cache_evaluation_batches_carry_their_context_and_in_sample_rows_are_training_rows(tiny_gpt2_cache):
    _, gpt2_cache = tiny_gpt2_cache
    m = store.read_manifest(gpt2_cache)
    raw = np.concatenate([np.load(f) for f in store.shard_paths(gpt2_cache, m, "1")]).astype(np.float32)
    dm = CacheDataModule(gpt2_cache, "1", batch_size=40, center=False)
    assert dm.group_unit == "contexts of 16 rows" and dm.describe()["se_unit"] == "contexts of 16 rows"

    def rows_and_groups(loader):
        xs, gs = zip(*loader)
        return torch.cat(xs).numpy(), torch.cat(gs).numpy()

    offsets = np.concatenate([[0], np.cumsum(dm.shard_rows)])

    def global_rows(blocks):
        return np.concatenate([np.arange(offsets[s] + lo, offsets[s] + hi) for s, lo, hi in blocks])

    for loader, blocks, count in ((dm.val_dataloader(), dm.val_blocks, dm.eval_groups),
                                  (dm.in_sample_dataloader(), dm.in_sample_blocks, dm.in_sample_groups)):
        x, groups = rows_and_groups(loader)
        idx = global_rows(blocks)
        np.testing.assert_array_equal(x, raw[idx])  # the rows read are those of the blocks, in order
        contexts = np.unique(idx // 16)  # cluster ids: each row's context, numbered densely
        np.testing.assert_array_equal(groups, np.searchsorted(contexts, idx // 16))
        assert count == len(contexts)
    ins_idx, val_idx = global_rows(dm.in_sample_blocks), global_rows(dm.val_blocks)
    assert set(map(tuple, dm.in_sample_blocks)) <= set(map(tuple, dm.train_blocks))
    assert not set(ins_idx) & set(val_idx)
    assert len(ins_idx) == dm.in_sample_rows and len(dm.in_sample_blocks) == len(dm.val_blocks)
    assert np.ptp(ins_idx) > 0.5 * len(raw)  # spread over the training set, not its first rows


def test_cache_init_rows_are_seeded_centred_training_rows(tmp_path):
    x = (np.random.default_rng(2).standard_normal((2000, 8)) + 5).astype(np.float32)
    np.save(tmp_path / "acts.npy", x)
    path = build.import_array(tmp_path / "acts.npy", tmp_path / "cache", shard_rows=600)
    dm = CacheDataModule(path, batch_size=100, seed=0)
    rows = dm.init_rows(50, seed=7)
    assert rows.shape == (50, 8) and rows.dtype == torch.float32
    assert torch.equal(rows, dm.init_rows(50, seed=7))
    assert torch.equal(rows[:20], dm.init_rows(20, seed=7))  # a prefix: independent of k
    assert not torch.equal(rows, dm.init_rows(50, seed=8))
    val = torch.cat([b for b, _ in dm.val_dataloader()])
    centred = torch.from_numpy(x - dm.mean)
    matches = [(centred == r).all(dim=1).nonzero().flatten() for r in rows]
    assert all(len(m) == 1 for m in matches)  # every row is one row of the cache, centred
    val_hits = sum(bool((val == r).all(dim=1).any()) for r in rows)
    assert val_hits == 0  # and never a validation row
    assert len({int(m) for m in matches}) == 50  # no repeats while k <= training rows


def test_cache_batch_size_is_the_global_batch(tmp_path):
    np.save(tmp_path / "a.npy", np.random.default_rng(0).standard_normal((1200, 4)).astype(np.float32))
    path = build.import_array(tmp_path / "a.npy", tmp_path / "c")
    for world in (1, 2, 4):
        sizes = [len(b) for b in CacheDataModule(path, batch_size=200, rank=0, world_size=world,
                                                 center=False).train_dataloader()]
        assert max(sizes) == 200 // world  # W ranks together take data.batch_size rows per step


def test_a_shard_changed_in_place_with_its_mtime_kept_is_found_on_every_open(tmp_path):
    path = import_cache(tmp_path / "c", np.random.default_rng(0).standard_normal((256, 8)).astype(np.float32))
    CacheDataModule(path)  # first open: verified
    shard = path / "layers" / "data" / "shard_00001.npy"
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-4:] = np.float32(1e3).tobytes()  # one value changed, size unchanged
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DataError, match="shard_00001.npy: sha256 does not match"):
        CacheDataModule(path)


@pytest.mark.parametrize("kind", ["zero", "constant"])
def test_a_cache_with_nothing_to_code_is_refused(tmp_path, kind):
    arr = np.zeros((300, 8), np.float32) if kind == "zero" else np.tile(np.arange(8, dtype=np.float32), (300, 1))
    path = import_cache(tmp_path / "c", arr)
    with pytest.raises(DataError, match="nothing to code"):
        CacheDataModule(path)
    if kind == "constant":  # without centring the rows are not zero: training is allowed
        CacheDataModule(path, center=False)


def test_a_single_row_cache_is_refused(tmp_path):
    path = import_cache(tmp_path / "c", np.ones((1, 4), np.float32))
    with pytest.raises(DataError, match="too few to split"):
        CacheDataModule(path, center=False)


def test_more_workers_than_full_batches_are_lowered_and_batches_stay_full(tmp_path, capsys):
    path = import_cache(tmp_path / "c", np.random.default_rng(0).standard_normal((3000, 8)).astype(np.float32), 1000)
    dm = CacheDataModule(path, batch_size=1024, num_workers=64)
    assert dm.num_workers == 2 == dm.train_rows // 1024
    note = capsys.readouterr().err
    assert "data.num_workers=64 lowered to 2" in note and "2,700 training rows make 2 full batches" in note
    dm.set_epoch(0)
    sizes = [len(b) for b in dm.train_dataloader()]
    assert sizes == dm.epoch_batch_sizes() and sum(sizes) == dm.train_rows
    assert sizes.count(1024) == 2  # each worker's part starts with a full batch (was 64 batches of 42 rows)
    assert sum(len(x) for x, _ in dm.val_dataloader()) == dm.val_rows



def test_a_cache_too_small_to_measure_is_refused_before_training(tmp_path):
    """Two rows: one training and one held-out row, too few for fvu (synthetic data: tests/config/test_checks.py)."""
    path = import_cache(tmp_path / "c", np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32))
    with pytest.raises(DataError, match="too few to measure"):
        CacheDataModule(path)
