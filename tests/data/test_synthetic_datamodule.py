"""Issue 19: the in-sample measurement beside the held-out one, the generalization gap, fresh synthetic
data, and cluster-robust standard errors (docs/method.md §5.3-5.4, §7)."""

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import ROOT
from sparse_coding.config.schema import register_configs
from sparse_coding.data.synthetic_datamodule import FreshSyntheticDataModule, SyntheticDataModule
from sparse_coding.metrics import SparsityMetrics, ratio_se

register_configs()

QUIET = ["logger=none", "trainer.enable_progress_bar=false"]


def train(tmp_path, overrides):
    from sparse_coding.run import run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=QUIET + overrides)
    return run(cfg, tmp_path)


# ---- fresh synthetic data ---------------------------------------------------------------------


def test_fresh_batches_are_new_each_batch_and_epoch_and_split_exactly_across_ranks():
    dm = FreshSyntheticDataModule("sparse_linear", 8, n=100, n_val=40, seed=1, active=3, batch_size=32)
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(0)
    epoch0 = [dm.train_dataloader().dataset[k] for k in sampler]
    sampler.set_epoch(1)
    epoch1 = [dm.train_dataloader().dataset[k] for k in sampler]
    assert [len(b) for b in epoch0] == [32, 32, 32, 4]  # an epoch is data.n rows
    assert not torch.equal(epoch0[0], epoch0[1]) and not torch.equal(epoch0[0], epoch1[0])
    # two ranks: contiguous shares of the same global batch
    from sparse_coding.data.synthetic_datamodule import FreshBatchSampler, FreshBatches

    data = FreshBatches(dm.source, dm.seed, 1.0)
    shares = [[data[k] for k in FreshBatchSampler(100, 32, shuffle=False, seed=1, rank=r, world_size=2)]
              for r in (0, 1)]
    for whole, a, b in zip(epoch0, *shares):
        assert torch.equal(torch.cat([a, b]), whole)
    # in-sample rows are the first rows trained on; the held-out set is separate
    assert torch.equal(dm.in_sample_x, torch.cat(epoch0)[:40])
    assert not torch.equal(dm.val_x, dm.in_sample_x)


def test_init_rows_do_not_depend_on_how_many_are_asked_for():
    dm = FreshSyntheticDataModule("gaussian", 8, n=64, n_val=16, seed=0)
    assert torch.equal(dm.init_rows(5000, seed=2)[:100], dm.init_rows(100, seed=2))


def test_fixed_sample_in_sample_rows_are_training_rows_spread_over_the_set():
    dm = SyntheticDataModule("sparse_linear", 8, n=1000, n_val=200, seed=0, active=3)
    train = {tuple(r) for r in dm.train_x.tolist()}
    assert len(dm.in_sample_x) == 200 and all(tuple(r) in train for r in dm.in_sample_x.tolist())
    held = {tuple(r) for r in dm.val_x.tolist()}
    assert not any(tuple(r) in held for r in dm.in_sample_x.tolist())


# ---- cluster-robust standard errors ----------------------------------------------------------


class Codes:
    def __init__(self, alpha):
        self.alpha = alpha
        self.l0 = (alpha > 0).sum(1)
        self.capped = torch.zeros(len(alpha), dtype=torch.bool)
        self.steps = self.l0

    def row_sums(self):
        return self.alpha.sum(1)

    def row_max(self):
        return self.alpha.amax(1)

    def feature_counts(self):
        return (self.alpha > 0).sum(0)


def test_clustered_se_matches_a_brute_force_cluster_robust_formula_and_the_row_se_with_singletons():
    gen = torch.Generator().manual_seed(0)
    n, d, m, groups = 300, 6, 10, 17
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    alpha = torch.rand(n, m, generator=gen, dtype=torch.float64) * (torch.rand(n, m, generator=gen) < 0.3)
    recon = x + 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    g = torch.randint(0, groups, (n,), generator=gen)
    metric = SparsityMetrics(d, m, groups)
    for part in torch.arange(n).split(64):  # batches that cut clusters
        metric.update(x[part], Codes(alpha[part]), recon[part], g[part])
    metric.lam = 0.7
    out = metric.compute()
    e = (x - recon).pow(2).sum(1)
    y, z = e + 0.7 * alpha.sum(1), 0.7 * alpha.amax(1)
    r = y.sum() / z.sum()
    yg = torch.zeros(groups, dtype=torch.float64).index_add_(0, g, y)
    zg = torch.zeros(groups, dtype=torch.float64).index_add_(0, g, z)
    present = torch.bincount(g, minlength=groups) > 0
    G = int(present.sum())
    brute = (G / (G - 1) * (yg - r * zg)[present].pow(2).sum()).sqrt() / z.sum()
    assert float(out["normalized_loss_se"]) == pytest.approx(float(brute), rel=1e-9)
    assert float(out["se_clusters"]) == G
    # one row per cluster: the cluster-robust SE is the independent-rows SE
    single = SparsityMetrics(d, m, n)
    single.update(x, Codes(alpha), recon, torch.arange(n))
    single.lam = 0.7
    s = single.compute()
    assert float(s["normalized_loss_se"]) == pytest.approx(float(s["normalized_loss_se_rows"]), rel=1e-9)
    assert float(s["avg_coef_norm_se"]) == pytest.approx(float(s["avg_coef_norm_se_rows"]), rel=1e-9)


def test_correlated_clusters_widen_the_standard_error():
    gen = torch.Generator().manual_seed(1)
    n, d, m = 2000, 4, 8
    level = torch.rand(n // 50, generator=gen).repeat_interleave(50) * 4 + 0.1  # 40 clusters sharing a scale
    alpha = torch.rand(n, m, generator=gen, dtype=torch.float64) * level[:, None]
    x = torch.zeros(n, d, dtype=torch.float64)
    metric = SparsityMetrics(d, m, 40)
    metric.update(x, Codes(alpha), x + level[:, None].double(), torch.arange(n) // 50)
    metric.lam = 1.0
    out = metric.compute()
    assert float(out["normalized_loss_se"]) > 2 * float(out["normalized_loss_se_rows"])


# ---- runs ------------------------------------------------------------------------------------


def test_fresh_run_reports_a_small_gap_and_a_fixed_small_sample_a_large_one(tmp_path, capsys):
    base = ["data=sparse_linear", "data.dim=16", "data.active=4", "data.n_val=2048", "data.batch_size=256",
            "dictionary.mult=8", "convergence.max_samples=400000"]
    fresh = train(tmp_path / "fresh", base)
    assert fresh["data"]["fresh"] is True
    assert abs(fresh["generalization_gap"]) < 0.02 and fresh["sample_sufficient"] is True
    assert fresh["in_sample"]["n_samples"] == 2048
    fixed = train(tmp_path / "fixed", base + ["data.fresh=false", "data.n=512"])
    out = capsys.readouterr().out
    assert fixed["generalization_gap"] > 0.05 and fixed["sample_sufficient"] is False
    assert fixed["generalization_gap"] > 3 * fixed["generalization_gap_se"]
    assert fixed["in_sample"]["normalized_loss"] < fixed["normalized_loss"]
    assert "raise data.n" in out and "sample is too small" in out
    on_disk = json.loads((tmp_path / "fixed" / "metrics.json").read_text())
    assert on_disk["in_sample"] == pytest.approx(fixed["in_sample"]) and on_disk["sample_sufficient"] is False

    # SparseDictionary.measure reproduces both numbers on the same rows
    from sparse_coding import SparseDictionary
    from sparse_coding.config.plan import resolve
    from sparse_coding.run import build_datamodule

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=QUIET + base + ["data.fresh=false", "data.n=512"])
    dm = build_datamodule(cfg, resolve(cfg))
    d = SparseDictionary.load(tmp_path / "fixed")
    held, ins = d.measure(dm.val_x), d.measure(dm.in_sample_x)
    assert held["normalized_loss"] == pytest.approx(fixed["normalized_loss"], rel=1e-6)
    assert ins["normalized_loss"] == pytest.approx(fixed["in_sample"]["normalized_loss"], rel=1e-6)


def test_ratio_se_is_unchanged_for_independent_rows():
    # the closed form the row SE uses, against a direct computation
    gen = torch.Generator().manual_seed(2)
    y, x = torch.rand(100, generator=gen, dtype=torch.float64), torch.rand(100, generator=gen, dtype=torch.float64) + 1
    n = torch.tensor(100.0, dtype=torch.float64)
    se = ratio_se(n, y.sum(), x.sum(), (y * y).sum(), (x * x).sum(), (x * y).sum())
    r = y.sum() / x.sum()
    direct = ((y - r * x).pow(2).sum() / (100 * 99)).sqrt() / x.mean()
    assert float(se) == pytest.approx(float(direct), rel=1e-12)
    assert np.isfinite(float(se))


# ---- caches: in-sample blocks and context clusters --------------------------------------------


@pytest.fixture(scope="module")
def gpt2_cache(tiny_gpt2_cache):
    """A tiny random GPT-2's layer=all cache over 16-token contexts (conftest.py)."""
    return tiny_gpt2_cache


def test_cache_evaluation_batches_carry_their_context_and_in_sample_rows_are_training_rows(gpt2_cache):
    from sparse_coding.cache import store
    from sparse_coding.data.cache_datamodule import CacheDataModule

    _, gpt2_cache = gpt2_cache
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


def test_cache_run_reports_clustered_standard_errors_and_its_gap(gpt2_cache, tmp_path):
    tiny, path = gpt2_cache
    overrides = ["model=gpt2", f"model.path={tiny}", "data=cache", f"data.path={path}", "layer=1", "dictionary.mult=2", "data.batch_size=128",
                 "convergence.max_samples=20000", "data.val_fraction=0.2"]
    result = train(tmp_path, overrides)
    assert result["data"]["se_unit"] == "contexts of 16 rows"
    assert result["se_clusters"] < result["n_samples"]
    assert result["normalized_loss_se"] != result["normalized_loss_se_rows"]
    assert "generalization_gap" in result and result["sample_sufficient"] in (True, False)
    assert result["in_sample"]["se_clusters"] < result["in_sample"]["n_samples"]


def test_an_undefined_in_sample_error_is_written_as_null_without_failing_the_run():
    from sparse_coding.outputs import is_in_sample_path, nonfinite_paths

    result = {"normalized_loss": 7.0, "in_sample": {"normalized_loss_se": float("nan")}, "generalization_gap_se": float("nan"),
              "dictionaries": [{"in_sample": {"l0": float("inf")}, "generalization_gap": float("nan"), "loss": float("nan")}]}
    paths = nonfinite_paths(result)
    assert [p for p in paths if not is_in_sample_path(p)] == ["dictionaries[0].loss"]  # only a held-out metric fails
