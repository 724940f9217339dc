"""The metrics (sparse_coding.metrics): docs/method.md's identities, exactness of the global sums, the metric names,
and the standard errors (row, cluster-robust, the ratio's closed form) against direct formulas."""

import numpy as np
import pytest
import torch

from sparse_coding.metrics import METRIC_NAMES, SparsityMetrics, ratio_se
from sparse_coding.solver import from_dense, solve


def sparse_batch(n=64, d=8, m=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    alpha = torch.rand(n, m, generator=gen) * (torch.rand(n, m, generator=gen) < 0.2)
    phi = torch.randn(d, m, generator=gen)
    phi /= phi.norm(dim=0)
    return alpha @ phi.T, alpha, phi


def codes_of(alpha, steps=None, capped=None):
    n = alpha.shape[0]
    steps = (alpha > 0).sum(1) if steps is None else steps
    capped = torch.zeros(n, dtype=torch.bool) if capped is None else capped
    return from_dense(alpha, steps, capped)


def compute(metric, lam):
    metric.lam = lam
    return {k: float(v) for k, v in metric.compute().items()}


def test_perfect_reconstruction_gives_normalized_loss_equal_avg_coef_norm():
    x, alpha, _ = sparse_batch()
    metric = SparsityMetrics(dim=8, dict_size=32)
    metric.update(x, codes_of(alpha), x)
    values = compute(metric, lam=0.3)
    assert abs(values["normalized_loss"] - values["avg_coef_norm"]) < 1e-9
    assert values["fvu"] == 0


def test_metric_names_are_what_compute_returns_each_once():
    x, alpha, _ = sparse_batch()
    metric = SparsityMetrics(dim=8, dict_size=32)
    metric.update(x, codes_of(alpha), x)
    assert sorted(compute(metric, lam=0.3)) == sorted(METRIC_NAMES) and len(set(METRIC_NAMES)) == len(METRIC_NAMES)


def test_metrics_match_direct_formulas():
    x, alpha, phi = sparse_batch(seed=1)
    x = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    lam = 0.2
    result = solve(x, phi, lam)
    recon = result.alpha @ phi.T
    metric = SparsityMetrics(dim=8, dict_size=32)
    metric.update(x, result, result.decode(phi))
    values = compute(metric, lam)
    a = result.alpha.double()
    err = (x - recon).double().pow(2).sum(1)
    loss = (err + lam * a.sum(1)).mean()
    mean_max = a.amax(1).mean()
    assert abs(values["loss"] - float(loss)) < 1e-6
    assert abs(values["normalized_loss"] - float(loss / (lam * mean_max))) < 1e-6
    assert abs(values["avg_coef_norm"] - float(a.sum(1).mean() / mean_max)) < 1e-9
    assert abs(values["l0"] - float((a > 0).sum(1).double().mean())) < 1e-12
    centred = (x.double() - x.double().mean(0)).pow(2).sum()
    assert abs(values["fvu"] - float(err.sum() / centred)) < 1e-6
    assert abs(values["explained_variance"] - (1 - values["fvu"])) < 1e-12
    assert values["dead_fraction"] == float(((a > 0).sum(0) == 0).double().mean())
    assert values["capped_fraction"] == float(result.capped.double().mean())
    assert values["mean_steps"] == float(result.steps.double().mean())


def test_dead_fraction_counts_a_feature_that_is_never_used():
    """Data and nine atoms in the first d-1 coordinates; three atoms along the last one score 0 forever."""
    gen = torch.Generator().manual_seed(4)
    d, m = 6, 12
    phi = torch.randn(d, m, generator=gen)
    phi[-1, 3:] = 0
    phi[:, :3] = 0
    phi[-1, :3] = 1  # orthogonal to every residual
    phi /= phi.norm(dim=0)
    x = torch.randn(200, d, generator=gen)
    x[:, -1] = 0
    result = solve(x, phi, 0.05, max_steps=500)
    metric = SparsityMetrics(d, m)
    metric.update(x, result, result.decode(phi))
    values = compute(metric, 0.05)
    used = (result.alpha > 0).sum(0)
    assert (used[:3] == 0).all()
    assert values["dead_fraction"] == float((used == 0).sum()) / m
    assert values["dead_fraction"] >= 3 / m


def test_capped_fraction_is_a_direct_count():
    gen = torch.Generator().manual_seed(5)
    phi = torch.randn(8, 32, generator=gen)
    phi /= phi.norm(dim=0)
    x = torch.randn(100, 8, generator=gen)
    lam = 0.3
    free = solve(x, phi, lam, max_steps=10_000)
    cap = int(free.steps.float().median())
    result = solve(x, phi, lam, max_steps=cap)
    metric = SparsityMetrics(8, 32)
    metric.update(x, result, result.decode(phi))
    values = compute(metric, lam)
    direct = int((free.steps > cap).sum())  # samples that needed more steps than allowed
    assert 0 < direct < 100
    assert values["capped_fraction"] == direct / 100


def test_sums_split_over_batches_equal_one_batch():
    """What DDP does: per-rank sums added together equal the sums over all the data."""
    x, alpha, phi = sparse_batch(n=100, seed=3)
    recon = alpha @ phi.T * 0.9
    steps, capped = torch.randint(0, 5, (100,)), torch.rand(100) < 0.1
    whole = SparsityMetrics(8, 32)
    whole.update(x, codes_of(alpha, steps, capped), recon)
    parts = [SparsityMetrics(8, 32), SparsityMetrics(8, 32)]
    parts[0].update(x[:37], codes_of(alpha[:37], steps[:37], capped[:37]), recon[:37])
    parts[1].update(x[37:], codes_of(alpha[37:], steps[37:], capped[37:]), recon[37:])
    parts[0].merge_state(parts[1])  # torchmetrics' own reduction of the "sum" states
    a, b = compute(whole, 0.5), compute(parts[0], 0.5)
    for key in a:
        assert abs(a[key] - b[key]) < 1e-9, key


def test_ratio_of_sums_not_mean_of_ratios():
    """Two halves with different sparsity: S1 is the ratio of global sums."""
    alpha = torch.zeros(4, 3)
    alpha[0] = torch.tensor([1.0, 1.0, 1.0])  # l1 3, max 1
    alpha[1] = torch.tensor([3.0, 0.0, 0.0])  # l1 3, max 3
    alpha[2:] = alpha[:2]
    x = torch.zeros(4, 2)
    metric = SparsityMetrics(2, 3)
    metric.update(x, codes_of(alpha), x)
    assert compute(metric, 1.0)["avg_coef_norm"] == 12 / 8  # not mean(3/1, 3/3) = 2


def test_standard_errors_match_the_delta_method_and_the_bootstrap():
    x, alpha, phi = sparse_batch(n=2000, d=8, m=32, seed=6)
    x = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    lam = 0.25
    result = solve(x.double(), phi.double(), lam)
    metric = SparsityMetrics(8, 32)
    metric.update(x.double(), result, result.decode(phi.double()))
    values = compute(metric, lam)
    e = (x.double() - result.decode(phi.double())).pow(2).sum(1).numpy()
    l1, mx = result.row_sums().numpy(), result.row_max().numpy()
    n = len(e)
    # direct delta method
    r = l1.sum() / mx.sum()
    se = np.sqrt(((l1 - r * mx) ** 2).sum() / (n * (n - 1))) / mx.mean()
    assert abs(values["avg_coef_norm_se"] - se) < 1e-9 * max(se, 1)
    y = e + lam * l1
    rn = y.sum() / (lam * mx.sum())
    se_n = np.sqrt(((y - rn * lam * mx) ** 2).sum() / (n * (n - 1))) / (lam * mx.mean())
    assert abs(values["normalized_loss_se"] - se_n) < 1e-9 * max(se_n, 1)
    # an independent check: the bootstrap spread of the ratio
    rng = np.random.default_rng(0)
    boot_s1, boot_n = [], []
    for _ in range(400):
        idx = rng.integers(0, n, n)
        boot_s1.append(l1[idx].sum() / mx[idx].sum())
        boot_n.append(y[idx].sum() / (lam * mx[idx].sum()))
    assert abs(np.std(boot_s1) / values["avg_coef_norm_se"] - 1) < 0.2
    assert abs(np.std(boot_n) / values["normalized_loss_se"] - 1) < 0.2


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
