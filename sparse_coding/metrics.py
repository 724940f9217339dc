"""The sparsity metrics of docs/method.md §5, as global sums divided at the end.

`SparsityMetrics` is a torchmetrics `Metric`: every state is a sum over samples, so under DDP
torchmetrics all-reduces the sums and `compute()` divides once — never an average of per-rank
ratios. Sums are kept in float64.

Standard errors (docs/method.md §5) are delta-method errors of a ratio of sums. Rows of a cache are
not independent (tokens of one context share it), so when the evaluation rows carry cluster ids
(`n_groups` > 0: the context each row came from) the reported `*_se` are cluster-robust, from
per-cluster sums; `*_se_rows` always treat rows as independent. `se_clusters` says how many clusters
the SE used (the row count when rows are independent).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

# The names `SparsityMetrics.compute` returns (docs/method.md §5.1), in the groups the tables show together; every
# list of metric names in the package is made of these (tests/test_metrics.py checks they are compute's keys).
SPARSITY = ("normalized_loss", "normalized_loss_se", "avg_coef_norm", "avg_coef_norm_se", "l0")  # the measurement
ROW_SES = ("normalized_loss_se_rows", "avg_coef_norm_se_rows", "se_clusters")  # rows taken as independent (§5.3)
FIT = ("loss", "fvu", "explained_variance")  # how well Φα reconstructs x
SCALES = ("mean_l1", "mean_max")  # the per-row means the two ratios divide
DIAGNOSTICS = ("dead_fraction", "capped_fraction", "mean_steps")  # how the features and the solver fared
METRIC_NAMES = (*SPARSITY, *ROW_SES, *FIT, *SCALES, *DIAGNOSTICS, "n_samples")


def ratio_se(n: Tensor, sy: Tensor, sx: Tensor, syy: Tensor, sxx: Tensor, sxy: Tensor) -> Tensor:
    """Standard error of R = sum(y) / sum(x) over n samples, by the delta method:
    Var(R) ~ sum((y_j - R x_j)^2) / (n (n - 1) xbar^2). Only sums are needed, so it all-reduces."""
    r = sy / sx
    spread = (syy - 2 * r * sxy + r * r * sxx).clamp_min(0)
    return (spread / (n * (n - 1))).sqrt() / (sx / n)


def clustered_ratio_se(y: Tensor, x: Tensor, present: Tensor) -> Tensor:
    """Cluster-robust standard error of R = sum(y) / sum(x) from per-cluster sums y_g, x_g (clusters with
    `present` rows only): Var(R) ~ G / (G - 1) * sum_g (y_g - R x_g)^2 / (sum x)^2. With one row per
    cluster it equals `ratio_se`."""
    y, x = y[present], x[present]
    g = y.new_tensor(float(y.numel()))
    r = y.sum() / x.sum()
    return (g / (g - 1) * (y - r * x).pow(2).sum()).sqrt() / x.sum()


class SparsityMetrics(Metric):
    """Accumulates (x, sparse coefficients, reconstruction) batches for one dictionary and one lambda."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, dim: int, dict_size: int, n_groups: int = 0) -> None:
        super().__init__()
        self.n_groups = int(n_groups)
        self.lam = float("nan")  # set before compute(); the same on every rank
        f64 = torch.float64
        # per-sample quantities e = ||x - Phi alpha||^2, l1 = ||alpha||_1, mx = max_i alpha_i: their sums,
        # squares and cross products give both ratios and their standard errors for any lambda
        for name in ("n", "sum_l1", "sum_max", "sum_l0", "sum_sq_err", "sum_sq_x", "sum_capped", "sum_steps",
                     "sum_e2", "sum_l1_2", "sum_max_2", "sum_e_l1", "sum_e_max", "sum_l1_max"):
            self.add_state(name, torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(dim, dtype=f64), dist_reduce_fx="sum")
        self.add_state("feature_count", torch.zeros(dict_size, dtype=f64), dist_reduce_fx="sum")
        # per-cluster sums of e, l1, mx and the row count (cluster-robust standard errors)
        for name in ("group_n", "group_e", "group_l1", "group_max"):
            self.add_state(name, torch.zeros(self.n_groups, dtype=f64), dist_reduce_fx="sum")

    def update(self, x: Tensor, codes, reconstruction: Tensor, groups: Tensor | None = None) -> None:
        """`codes`: the solver's SolveResult for the rows of x; `reconstruction`: Phi alpha, (n, d);
        `groups`: the cluster id in [0, n_groups) of each row (needed when n_groups > 0)."""
        f64 = torch.float64
        e = (x - reconstruction).pow(2).sum(dim=1, dtype=f64)
        l1 = codes.row_sums().to(f64)
        mx = codes.row_max().to(f64)
        self.n += x.shape[0]
        self.sum_l1 += l1.sum()
        self.sum_max += mx.sum()
        self.sum_l0 += codes.l0.sum(dtype=f64)
        self.feature_count += codes.feature_counts().to(f64)
        self.sum_sq_err += e.sum()
        self.sum_sq_x += x.pow(2).sum(dtype=f64)
        self.sum_x += x.sum(dim=0, dtype=f64)
        self.sum_capped += codes.capped.sum(dtype=f64)
        self.sum_steps += codes.steps.sum(dtype=f64)
        self.sum_e2 += e.pow(2).sum()
        self.sum_l1_2 += l1.pow(2).sum()
        self.sum_max_2 += mx.pow(2).sum()
        self.sum_e_l1 += (e * l1).sum()
        self.sum_e_max += (e * mx).sum()
        self.sum_l1_max += (l1 * mx).sum()
        if self.n_groups:
            if groups is None or groups.shape[0] != x.shape[0]:
                raise ValueError("SparsityMetrics with n_groups > 0 needs a cluster id for every row")
            g = groups.to(device=e.device, dtype=torch.int64)
            if x.shape[0] and (int(g.min()) < 0 or int(g.max()) >= self.n_groups):
                raise ValueError(f"cluster ids must lie in [0, {self.n_groups})")
            self.group_n.index_add_(0, g, torch.ones_like(e))
            self.group_e.index_add_(0, g, e)
            self.group_l1.index_add_(0, g, l1)
            self.group_max.index_add_(0, g, mx)

    def compute(self) -> dict[str, Tensor]:
        """All metrics; the objective uses the penalty in `self.lam`, which the caller sets."""
        lam = float(self.lam)
        n = self.n
        mean_l1 = self.sum_l1 / n
        mean_max = self.sum_max / n
        loss = (self.sum_sq_err + lam * self.sum_l1) / n
        centred_sq = self.sum_sq_x - self.sum_x.pow(2).sum() / n
        fvu = self.sum_sq_err / centred_sq
        # normalized_loss = sum(y) / sum(x) with y = e + lam l1 and x = lam mx
        sy = self.sum_sq_err + lam * self.sum_l1
        syy = self.sum_e2 + 2 * lam * self.sum_e_l1 + lam * lam * self.sum_l1_2
        sxy = lam * self.sum_e_max + lam * lam * self.sum_l1_max
        nl_se_rows = ratio_se(n, sy, lam * self.sum_max, syy, lam * lam * self.sum_max_2, sxy)
        s1_se_rows = ratio_se(n, self.sum_l1, self.sum_max, self.sum_l1_2, self.sum_max_2, self.sum_l1_max)
        present = self.group_n > 0
        if self.n_groups and int(present.sum()) >= 2:  # one cluster has no spread: fall back to independent rows
            nl_se = clustered_ratio_se(self.group_e + lam * self.group_l1, lam * self.group_max, present)
            s1_se = clustered_ratio_se(self.group_l1, self.group_max, present)
            clusters = present.sum(dtype=torch.float64)
        else:
            nl_se, s1_se, clusters = nl_se_rows, s1_se_rows, n
        values = {
            "normalized_loss": loss / (lam * mean_max),
            "normalized_loss_se": nl_se,
            "avg_coef_norm": self.sum_l1 / self.sum_max,
            "avg_coef_norm_se": s1_se,
            "normalized_loss_se_rows": nl_se_rows,
            "avg_coef_norm_se_rows": s1_se_rows,
            "se_clusters": clusters,
            "l0": self.sum_l0 / n,
            "loss": loss,
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "mean_l1": mean_l1,
            "mean_max": mean_max,
            "dead_fraction": (self.feature_count == 0).to(torch.float64).mean(),
            "capped_fraction": self.sum_capped / n,
            "mean_steps": self.sum_steps / n,
            "n_samples": n,
        }
        return values
