"""SPEC §4 metric identities, exactness of the global sums, and agreement with direct formulas."""

import torch

from sparse_coding.metrics import SparsityMetrics
from sparse_coding.solver import solve


def sparse_batch(n=64, d=8, m=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    alpha = torch.rand(n, m, generator=gen) * (torch.rand(n, m, generator=gen) < 0.2)
    phi = torch.randn(d, m, generator=gen)
    phi /= phi.norm(dim=0)
    return alpha @ phi.T, alpha, phi


def compute(metric, lam):
    metric.lam = lam
    return {k: float(v) for k, v in metric.compute().items()}


def test_perfect_reconstruction_gives_normalized_loss_equal_avg_coef_norm():
    x, alpha, _ = sparse_batch()
    metric = SparsityMetrics(dim=8, dict_size=32)
    metric.update(x, alpha, x, torch.zeros(64), torch.zeros(64, dtype=torch.bool))
    values = compute(metric, lam=0.3)
    assert abs(values["normalized_loss"] - values["avg_coef_norm"]) < 1e-9
    assert values["fvu"] == 0


def test_metrics_match_direct_formulas():
    x, alpha, phi = sparse_batch(seed=1)
    x = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    lam = 0.2
    result = solve(x, phi, lam)
    recon = result.alpha @ phi.T
    metric = SparsityMetrics(dim=8, dict_size=32)
    metric.update(x, result.alpha, recon, result.steps, result.capped)
    values = compute(metric, lam)
    a = result.alpha.double()
    err = (x - recon).double().pow(2).sum(1)
    loss = (err + lam * a.sum(1)).mean()
    mean_max = a.amax(1).mean()
    assert abs(values["loss"] - float(loss)) < 1e-9
    assert abs(values["normalized_loss"] - float(loss / (lam * mean_max))) < 1e-9
    assert abs(values["avg_coef_norm"] - float(a.sum(1).mean() / mean_max)) < 1e-9
    assert abs(values["l0"] - float((a > 0).sum(1).double().mean())) < 1e-12
    centred = (x.double() - x.double().mean(0)).pow(2).sum()
    assert abs(values["fvu"] - float(err.sum() / centred)) < 1e-9
    assert abs(values["explained_variance"] - (1 - values["fvu"])) < 1e-12
    assert values["dead_fraction"] == float(((a > 0).sum(0) == 0).double().mean())


def test_sums_split_over_batches_equal_one_batch():
    """What DDP does: per-rank sums added together equal the sums over all the data."""
    x, alpha, phi = sparse_batch(n=100, seed=3)
    recon = alpha @ phi.T * 0.9
    steps, capped = torch.randint(0, 5, (100,)), torch.rand(100) < 0.1
    whole = SparsityMetrics(8, 32)
    whole.update(x, alpha, recon, steps, capped)
    parts = [SparsityMetrics(8, 32), SparsityMetrics(8, 32)]
    parts[0].update(x[:37], alpha[:37], recon[:37], steps[:37], capped[:37])
    parts[1].update(x[37:], alpha[37:], recon[37:], steps[37:], capped[37:])
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
    metric.update(x, alpha, x, torch.zeros(4), torch.zeros(4, dtype=torch.bool))
    assert compute(metric, 1.0)["avg_coef_norm"] == 12 / 8  # not mean(3/1, 3/3) = 2
