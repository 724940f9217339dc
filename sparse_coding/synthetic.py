"""Synthetic data sets with known sparsity and the controls (SPEC §5, paper App. D–E).

Every generator is a pure function of its arguments and a seed; it returns float32 samples
(n, dim). `sparse_linear` also returns its true coefficients so a run can report the ground truth.

Decisions where the paper is silent (documented in README "Definitions"):
- `sparse_linear`: the data are centred over the whole generated set (train and held-out), then
  noise of variance a * sigma^2 / d per coordinate is added.
- controls are scaled so that E||x||^2 = d (identity covariance for the isotropic ones); for the
  heavy-tailed control (a Cauchy norm has no variance) the scale is the empirical one.
- `sparse_nonlinear`: the sparse-linear coefficients pass through a random one-hidden-layer GELU
  MLP (4d -> 4d -> d, N(0, 1/fan_in) weights, no biases), then are centred and scaled like a
  control; no extra noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sparse_coding.errors import ConfigError

GENERATORS = ("sparse_linear", "gaussian", "heavy_tailed", "rademacher", "sparse_nonlinear")


@dataclass
class SyntheticData:
    x: Tensor  # (n, dim) float32
    truth: dict = field(default_factory=dict)  # ground-truth values, per held-out rows when known
    true_alpha: Tensor | None = None  # (n, 4 dim) for sparse data


def _unit_columns(t: Tensor) -> Tensor:
    return t / t.norm(dim=0, keepdim=True)


def sparse_coefficients(n: int, dim: int, active: float, gen: torch.Generator) -> Tensor:
    """(n, 4 dim) coefficients: each Uniform(0, 1) with probability active / (4 dim), else 0."""
    m_true = 4 * dim
    mask = torch.rand(n, m_true, generator=gen) < active / m_true
    return torch.rand(n, m_true, generator=gen) * mask


def sparse_truth(alpha: Tensor, active: float) -> dict:
    l1 = alpha.sum(dim=1).double()
    mx = alpha.amax(dim=1).double()
    return {
        "ground_truth": active / 2,  # the paper's reference value for S1 and L_norm
        "active": active,
        "true_l0": float((alpha > 0).sum(dim=1).double().mean()),
        "true_avg_coef_norm": float(l1.sum() / mx.sum()),
    }


def _scale_to_unit_variance(x: Tensor) -> Tensor:
    power = x.pow(2).sum(dim=1).mean().div(x.shape[1]).sqrt()
    return x / power if power > 0 else x  # all-zero data stay zero (and are refused by `generate`)


def generate(name: str, dim: int, n: int, seed: int, active: float = 10.0, noise: float = 0.1) -> SyntheticData:
    """n samples of the named data set (see module docstring).

    Raises ConfigError when the samples would all be zero (e.g. one sample, which centring removes,
    or too few active features to draw any): there would be nothing to code.
    """
    data = _generate(name, dim, n, seed, active, noise)
    if not torch.isfinite(data.x).all():
        raise ConfigError(f"data={name}: the generator produced NaN/Inf (dim={dim}, n={n}, seed={seed})")
    if not data.x.any():
        raise ConfigError(f"data={name}: all {n} generated samples are zero (dim={dim}, active={active}, n={n}, "
                          "centred): raise data.n/data.n_val (centring a single sample leaves zero) or data.active")
    return data


def _generate(name: str, dim: int, n: int, seed: int, active: float, noise: float) -> SyntheticData:
    if name not in GENERATORS:
        raise ConfigError(f"unknown synthetic data set {name!r}: choose one of {', '.join(GENERATORS)}")
    gen = torch.Generator().manual_seed(int(seed))
    if name == "sparse_linear":
        features = _unit_columns(torch.randn(dim, 4 * dim, generator=gen))
        alpha = sparse_coefficients(n, dim, active, gen)
        x = alpha @ features.T
        x -= x.mean(dim=0)
        x += torch.randn(n, dim, generator=gen) * math.sqrt(active * noise**2 / dim)
        return SyntheticData(x=x, true_alpha=alpha, truth=sparse_truth(alpha, active))
    if name == "sparse_nonlinear":
        alpha = sparse_coefficients(n, dim, active, gen)
        w1 = torch.randn(4 * dim, 4 * dim, generator=gen) / math.sqrt(4 * dim)
        w2 = torch.randn(4 * dim, dim, generator=gen) / math.sqrt(4 * dim)
        x = torch.nn.functional.gelu(alpha @ w1) @ w2
        x -= x.mean(dim=0)
        return SyntheticData(x=_scale_to_unit_variance(x), true_alpha=alpha, truth=sparse_truth(alpha, active))
    if name == "gaussian":
        return SyntheticData(x=torch.randn(n, dim, generator=gen))
    if name == "rademacher":
        return SyntheticData(x=torch.randint(0, 2, (n, dim), generator=gen).float() * 2 - 1)
    # heavy_tailed: a uniform direction times the absolute value of a standard Cauchy draw
    direction = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    direction /= direction.norm(dim=1, keepdim=True)
    radius = torch.tan(math.pi * (torch.rand(n, 1, generator=gen, dtype=torch.float64) - 0.5)).abs()
    return SyntheticData(x=_scale_to_unit_variance(direction * radius).float())
