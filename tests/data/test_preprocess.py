"""The massive-activation remedies (sparse_coding.data.preprocess) as the cache data module applies them:
data.drop_positions, data.normalize=token and data.max_norm_ratio (rows left out of both splits and of the mean),
alone and together; and the checks of these switches."""

import numpy as np
import pytest

from sparse_coding.cache import build, store
from sparse_coding.config.checks import validate
from sparse_coding.config.compose import compose_config
from sparse_coding.data import preprocess
from sparse_coding.data.cache_datamodule import CacheDataModule
from sparse_coding.data.preprocess import context_positions
from sparse_coding.errors import ConfigError


def test_drop_positions_and_token_normalisation(tiny_gpt2_cache):
    _, path = tiny_gpt2_cache
    m = store.read_manifest(path)
    raw = np.concatenate([np.load(f) for f in store.shard_paths(path, m, "1")]).astype(np.float64)
    pos = context_positions(m, np.arange(len(raw)))
    assert (pos == np.arange(len(raw)) % 16).all()
    kept = raw[pos >= 2]
    dm = CacheDataModule(path, "1", batch_size=32, drop_positions=2)
    rows = np.concatenate([b.numpy() for b in list(dm.train_dataloader()) + [b for b, _ in dm.val_dataloader()]])
    assert len(rows) == dm.train_rows + dm.val_rows == len(kept)
    np.testing.assert_allclose(dm.mean, kept.mean(0), rtol=1e-5, atol=1e-6)  # the mean of the kept rows only
    # every kept row is there once (centred with that mean), no dropped row is
    want = np.sort(np.round(kept - kept.mean(0), 4), axis=0)
    np.testing.assert_allclose(np.sort(rows.astype(np.float64), axis=0), want, atol=1e-3)
    assert dm.init_rows(8, 0).shape == (8, m["d"])
    assert dm.describe()["drop_positions"] == 2 and dm.describe()["normalize"] == "none"
    unit = CacheDataModule(path, "1", batch_size=32, normalize="token")
    norms = np.concatenate([np.linalg.norm(b.numpy(), axis=1) for b, _ in unit.val_dataloader()])
    np.testing.assert_allclose(norms, np.sqrt(m["d"]), rtol=1e-5)


def test_max_norm_ratio_leaves_out_massive_rows(tmp_path):
    """Sink-like rows (any position) above ratio x the median norm are left out of both splits and the mean."""

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 8)).astype(np.float32)
    # blocks of 150 rows; blocks 9 and 19 (rows 1350-1499, 2850-2999) are held out: sinks in both splits,
    # before and after a held-out block
    sinks = np.array([5, 140, 1400, 1420, 1600, 2200, 2900, 2999])
    x[sinks, 3] += 400.0  # ~140x the median norm (about 2.8), in one dimension
    np.save(tmp_path / "a.npy", x)
    path = build.import_array(tmp_path / "a.npy", tmp_path / "c")
    dm = CacheDataModule(path, batch_size=64, max_norm_ratio=10)
    kept = np.delete(x, sinks, axis=0).astype(np.float64)
    assert dm.norm_dropped == len(sinks) and dm.val_rows == 300 - 4 and dm.train_rows == 2700 - 4
    assert dm.median_norm == pytest.approx(np.median(np.linalg.norm(x, axis=1)), rel=1e-5)
    np.testing.assert_allclose(dm.mean, kept.mean(0), atol=1e-5)
    val = np.concatenate([b.numpy() for b, _ in dm.val_dataloader()])
    held_out = np.r_[1350:1500, 2850:3000]
    want = np.delete(x[held_out], [np.flatnonzero(held_out == s)[0] for s in sinks if s in held_out], axis=0)
    np.testing.assert_allclose(val, want - dm.mean, atol=1e-5)  # in order, the sinks gone
    rows = np.concatenate([b.numpy() for b in dm.train_dataloader()] + [val])
    np.testing.assert_allclose(np.sort(rows, axis=0), np.sort(kept - kept.mean(0), axis=0), atol=1e-4)
    d = dm.describe()
    assert d["max_norm_ratio"] == 10 and d["norm_outliers_dropped"] == len(sinks) and d["mean_over_kept_rows"]
    plain = CacheDataModule(path, batch_size=64)
    assert plain.train_rows + plain.val_rows == 3000 and "norm_outliers_dropped" not in plain.describe()
    # a bad ratio is refused by the config checks (test_preprocess_switches_are_validated), not by the data module


def test_kept_mean_reads_only_the_left_out_rows(tmp_path):
    """The mean of the kept rows, from the stored mean minus the left-out rows: NaN rows are in neither."""

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 6)).astype(np.float32)
    x[[3, 700, 1999], 2] += 300.0
    x[[10, 1500]] = np.nan
    np.save(tmp_path / "a.npy", x)
    path = build.import_array(tmp_path / "a.npy", tmp_path / "c")
    dm = CacheDataModule(path, batch_size=64, max_norm_ratio=10, skip_nonfinite=True)
    kept = np.delete(x, [3, 700, 1999, 10, 1500], axis=0).astype(np.float64)
    assert dm.norm_dropped == 3 and dm.train_rows + dm.val_rows == len(kept)
    np.testing.assert_allclose(dm.mean, kept.mean(0), rtol=1e-6, atol=1e-6)
    # a left-out NaN row (as drop_positions can leave out) is not subtracted from the finite rows' mean
    finite = x[np.isfinite(x).all(1)].astype(np.float64)
    blocks = [x[:1000], x[1000:]]
    got = preprocess.kept_mean(finite.mean(0), len(finite), blocks.__getitem__, {0: np.array([3, 10, 3]), 1: np.array([999])})
    want = np.delete(x, [3, 1999], axis=0).astype(np.float64)
    np.testing.assert_allclose(got, want[np.isfinite(want).all(1)].mean(0), rtol=1e-9, atol=1e-12)


def test_max_norm_ratio_with_drop_positions(tiny_gpt2_cache):
    """Both rules together: the union is left out, the norm rule counts only what it adds; ranks agree."""

    _, path = tiny_gpt2_cache
    m = store.read_manifest(path)
    raw = np.concatenate([np.load(f) for f in store.shard_paths(path, m, "1")]).astype(np.float64)
    pos = context_positions(m, np.arange(len(raw)))
    norms = np.linalg.norm(raw, axis=1)
    high = norms > 1.02 * np.median(norms)  # a low ratio, so that the rule leaves out many rows at every position
    keep = (pos >= 2) & ~high
    assert (high & (pos < 2)).any() and (high & (pos >= 2)).any()
    dm = CacheDataModule(path, "1", batch_size=32, drop_positions=2, max_norm_ratio=1.02)
    assert dm.train_rows + dm.val_rows == keep.sum() and dm.norm_dropped == (high & (pos >= 2)).sum()
    np.testing.assert_allclose(dm.mean, raw[keep].mean(0), rtol=1e-5, atol=1e-6)
    other = CacheDataModule(path, "1", batch_size=32, drop_positions=2, max_norm_ratio=1.02, rank=1, world_size=2)
    for a, b in zip(dm._bad, other._bad):
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_preprocess_switches_are_validated(tmp_path):
    for bad, what in ((["data.drop_positions=1"], "real activations"), (["data.normalize=l2"], "data.normalize"),
                      (["data.drop_positions=-1"], "data.drop_positions"), (["data.max_norm_ratio=10"], "real activations"),
                      (["model=gpt2", "data.max_norm_ratio=0.5"], "data.max_norm_ratio"),
                      (["model=gpt2", "data.max_norm_ratio=1"], "data.max_norm_ratio"),
                      (["model=gpt2", "data.max_norm_ratio=-3"], "data.max_norm_ratio"),
                      (["model=gpt2", "data.max_norm_ratio=inf"], "data.max_norm_ratio")):
        with pytest.raises(ConfigError, match=what):
            validate(compose_config(bad))
    # an imported array has no context positions: a one-line error when the data module opens it
    np.save(tmp_path / "a.npy", np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32))
    path = build.import_array(tmp_path / "a.npy", tmp_path / "c")
    with pytest.raises(ConfigError, match="no context positions"):
        CacheDataModule(path, drop_positions=1)
