"""Synthetic data sets with known sparsity and the controls (docs/method.md §7.1–7.3).

Every generator is a pure function of its arguments and a seed; it returns float32 samples
(n, dim). `sparse_linear` also returns its true coefficients so a run can report the ground truth.

Decisions where the paper is silent (documented in README "Definitions"):
- `sparse_linear`: the data are centred over the whole generated set (train and held-out), then
  noise of variance a * sigma^2 / d per coordinate is added.
- controls are scaled so that E||x||^2 = d (identity covariance for the isotropic ones); for the
  heavy-tailed control (a Cauchy norm has no variance) the scale is the empirical one.
- `sparse_nonlinear`: the sparse-linear coefficients pass through a random one-hidden-layer GELU
  MLP (4d -> 4d -> d, no biases), then are centred and scaled like a control; no extra noise. The
  first layer's weights are N(0, preact_std^2 * 3/a), so the pre-activations z = alpha W1 have
  standard deviation ~preact_std (E||alpha||^2 = a/3): at the default 1 GELU is far from linear. With
  `preact_std=0` the weights are N(0, 1/fan_in) (the earlier control: z has std ~sqrt(a/(12 d)),
  0.057 at d=256, a=10, where GELU(z) ~ z/2 and the data are sparse-linear in disguise). The truth
  reports `nonlinear_share`: the share of the centred data's power that GELU's linearisation at 0
  (z/2) does not carry, and `preact_std` as measured.

Two ways to sample (docs/method.md §7): `generate` draws one fixed sample of n rows (the fixed-sample
protocol, `data.fresh=false`); `SyntheticSource` holds a generator's fixed parts (its ground-truth
features or MLP weights, drawn from the seed) and draws as many fresh rows as asked
(`data.fresh=true`), centred and scaled with statistics of a fixed calibration sample, so every batch
is new data from the same distribution and a measurement on it is the population value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sparse_coding.errors import ConfigError, DataError

GENERATORS = ("sparse_linear", "gaussian", "heavy_tailed", "rademacher", "sparse_nonlinear")


def stream_seed(*key: int) -> int:
    """One 63-bit generator seed from a tuple of integers (numpy's SeedSequence mixing)."""
    import numpy as np

    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint32).astype(np.uint64)
               .view(np.uint64)[0] >> np.uint64(1))

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


def first_layer(m_true: int, active: float, preact_std: float, gen: torch.Generator) -> Tensor:
    """The sparse non-linear control's first weights: pre-activations of std ~preact_std (0: 1/sqrt(fan_in))."""
    scale = preact_std * math.sqrt(3.0 / active) if preact_std > 0 else 1 / math.sqrt(m_true)
    return torch.randn(m_true, m_true, generator=gen) * scale


def nonlinear_truth(alpha: Tensor, w1: Tensor, w2: Tensor, active: float) -> dict:
    """sparse_truth plus how non-linear the rows are: the share of their centred power that GELU's
    linearisation at 0 (z/2) misses, and the measured pre-activation std."""
    z = alpha @ w1
    x = torch.nn.functional.gelu(z) @ w2
    lin = (z / 2) @ w2
    x, lin = x - x.mean(dim=0), lin - lin.mean(dim=0)
    share = float((x - lin).double().pow(2).sum() / x.double().pow(2).sum().clamp_min(1e-300))
    return {**sparse_truth(alpha, active), "nonlinear_share": share, "preact_std": float(z.double().std())}


def generate(name: str, dim: int, n: int, seed: int, active: float = 10.0, noise: float = 0.1,
             preact_std: float = 1.0) -> SyntheticData:
    """n samples of the named data set (see module docstring).

    Raises ConfigError when the samples would all be zero (e.g. one sample, which centring removes,
    or too few active features to draw any): there would be nothing to code.
    """
    data = _generate(name, dim, n, seed, active, noise, preact_std)
    if not torch.isfinite(data.x).all():
        raise DataError(f"data={name}: the generator produced NaN/Inf (dim={dim}, n={n}, seed={seed})")
    if not data.x.any():
        raise DataError(f"data={name}: all {n} generated samples are zero (dim={dim}, active={active}, n={n}, "
                        "centred): raise data.n/data.n_val (centring a single sample leaves zero) or data.active")
    return data


def _generate(name: str, dim: int, n: int, seed: int, active: float, noise: float, preact_std: float) -> SyntheticData:
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
        w1 = first_layer(4 * dim, active, preact_std, gen)
        w2 = torch.randn(4 * dim, dim, generator=gen) / math.sqrt(4 * dim)
        x = torch.nn.functional.gelu(alpha @ w1) @ w2
        x -= x.mean(dim=0)
        return SyntheticData(x=_scale_to_unit_variance(x), true_alpha=alpha, truth=nonlinear_truth(alpha, w1, w2, active))
    if name == "gaussian":
        return SyntheticData(x=torch.randn(n, dim, generator=gen))
    if name == "rademacher":
        return SyntheticData(x=torch.randint(0, 2, (n, dim), generator=gen).float() * 2 - 1)
    # heavy_tailed: a uniform direction times the absolute value of a standard Cauchy draw
    direction = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    direction /= direction.norm(dim=1, keepdim=True)
    radius = torch.tan(math.pi * (torch.rand(n, 1, generator=gen, dtype=torch.float64) - 0.5)).abs()
    return SyntheticData(x=_scale_to_unit_variance(direction * radius).float())


CALIBRATION_ROWS = 16384  # rows of the fixed sample whose mean / scale a fresh source uses


class SyntheticSource:
    """A synthetic generator's fixed parts, drawing fresh rows on demand (`data.fresh=true`).

    `draw(n, seed)` is a pure function of (the source, n, seed): the same seed gives the same rows.
    Sparse-linear rows are centred with their exact population mean (E[alpha] = a/(4d) * 1/2 per
    feature); the sparse non-linear and heavy-tailed rows are centred/scaled with the mean and
    power of a fixed calibration sample, the same for every draw.
    """

    def __init__(self, name: str, dim: int, seed: int, active: float = 10.0, noise: float = 0.1,
                 preact_std: float = 1.0) -> None:
        if name not in GENERATORS:
            raise ConfigError(f"unknown synthetic data set {name!r}: choose one of {', '.join(GENERATORS)}")
        self.name, self.dim, self.seed, self.active, self.noise = name, int(dim), int(seed), float(active), float(noise)
        gen = torch.Generator().manual_seed(int(seed))
        m_true = 4 * self.dim
        self.features = self.w1 = self.w2 = None
        if name == "sparse_linear":
            self.features = _unit_columns(torch.randn(self.dim, m_true, generator=gen))
            self.mean = self.features.sum(dim=1) * (0.5 * self.active / m_true)
        if name == "sparse_nonlinear":
            self.w1 = first_layer(m_true, self.active, float(preact_std), gen)
            self.w2 = torch.randn(m_true, self.dim, generator=gen) / math.sqrt(m_true)
        self.shift, self.power = torch.zeros(self.dim), torch.ones(())
        if name in ("sparse_nonlinear", "heavy_tailed"):
            calib = self._raw(CALIBRATION_ROWS, torch.Generator().manual_seed(int(seed) * 7919 + 1))[0]
            if name == "sparse_nonlinear":
                self.shift = calib.double().mean(dim=0).float()
                calib = calib - self.shift
            self.power = calib.double().pow(2).sum(dim=1).mean().div(self.dim).sqrt().float()
            if not self.power > 0:
                raise DataError(f"data={name}: the generator's calibration sample is all zero "
                                f"(dim={dim}, active={active}): raise data.active")

    def _raw(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
        if self.name == "sparse_linear":
            alpha = sparse_coefficients(n, self.dim, self.active, gen)
            x = alpha @ self.features.T - self.mean
            x += torch.randn(n, self.dim, generator=gen) * math.sqrt(self.active * self.noise**2 / self.dim)
            return x, alpha
        if self.name == "sparse_nonlinear":
            alpha = sparse_coefficients(n, self.dim, self.active, gen)
            return torch.nn.functional.gelu(alpha @ self.w1) @ self.w2, alpha
        if self.name == "gaussian":
            return torch.randn(n, self.dim, generator=gen), None
        if self.name == "rademacher":
            return torch.randint(0, 2, (n, self.dim), generator=gen).float() * 2 - 1, None
        direction = torch.randn(n, self.dim, generator=gen, dtype=torch.float64)
        direction /= direction.norm(dim=1, keepdim=True)
        radius = torch.tan(math.pi * (torch.rand(n, 1, generator=gen, dtype=torch.float64) - 0.5)).abs()
        return (direction * radius).float(), None

    def draw(self, n: int, seed: int) -> SyntheticData:
        """n fresh rows (float32), drawn from a generator seeded with `seed`; sparse data carry their truth."""
        x, alpha = self._raw(int(n), torch.Generator().manual_seed(int(seed)))
        x = (x - self.shift) / self.power
        if not torch.isfinite(x).all():
            raise DataError(f"data={self.name}: the generator produced NaN/Inf (dim={self.dim}, seed={seed})")
        truth = {}
        if alpha is not None:
            truth = (nonlinear_truth(alpha, self.w1, self.w2, self.active) if self.name == "sparse_nonlinear"
                     else sparse_truth(alpha, self.active))
        return SyntheticData(x=x, true_alpha=alpha, truth=truth)
