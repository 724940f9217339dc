"""The sparsity metrics of SPEC §4, as global sums divided at the end.

`SparsityMetrics` is a torchmetrics `Metric`: every state is a sum over samples, so under DDP
torchmetrics all-reduces the sums and `compute()` divides once — never an average of per-rank
ratios. Sums are kept in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

METRIC_NAMES = (
    "normalized_loss",
    "avg_coef_norm",
    "l0",
    "loss",
    "fvu",
    "explained_variance",
    "mean_l1",
    "mean_max",
    "dead_fraction",
    "capped_fraction",
    "mean_steps",
)


class SparsityMetrics(Metric):
    """Accumulates (x, alpha, reconstruction) batches for one dictionary and one lambda."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, dim: int, dict_size: int) -> None:
        super().__init__()
        self.lam = float("nan")  # set before compute(); the same on every rank
        f64 = torch.float64
        self.add_state("n", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_l1", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_max", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_l0", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_sq_err", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_sq_x", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(dim, dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_capped", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_steps", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("feature_count", torch.zeros(dict_size, dtype=f64), dist_reduce_fx="sum")

    def update(self, x: Tensor, alpha: Tensor, reconstruction: Tensor, steps: Tensor, capped: Tensor) -> None:
        f64 = torch.float64
        self.n += x.shape[0]
        self.sum_l1 += alpha.sum(dtype=f64)
        self.sum_max += alpha.amax(dim=1).sum(dtype=f64)
        active = alpha > 0
        self.sum_l0 += active.sum(dtype=f64)
        self.feature_count += active.sum(dim=0, dtype=f64)
        self.sum_sq_err += (x - reconstruction).pow(2).sum(dtype=f64)
        self.sum_sq_x += x.pow(2).sum(dtype=f64)
        self.sum_x += x.sum(dim=0, dtype=f64)
        self.sum_capped += capped.sum(dtype=f64)
        self.sum_steps += steps.sum(dtype=f64)

    def compute(self) -> dict[str, Tensor]:
        """All metrics; the objective uses the penalty in `self.lam`, which the caller sets."""
        lam = float(self.lam)
        n = self.n
        mean_l1 = self.sum_l1 / n
        mean_max = self.sum_max / n
        loss = (self.sum_sq_err + lam * self.sum_l1) / n
        centred_sq = self.sum_sq_x - self.sum_x.pow(2).sum() / n
        fvu = self.sum_sq_err / centred_sq
        values = {
            "normalized_loss": loss / (lam * mean_max),
            "avg_coef_norm": self.sum_l1 / self.sum_max,
            "l0": self.sum_l0 / n,
            "loss": loss,
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "mean_l1": mean_l1,
            "mean_max": mean_max,
            "dead_fraction": (self.feature_count == 0).to(torch.float64).mean(),
            "capped_fraction": self.sum_capped / n,
            "mean_steps": self.sum_steps / n,
        }
        return values
