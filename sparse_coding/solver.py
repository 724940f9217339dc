"""The greedy coefficient solver: non-negative matching pursuit with shrinkage (SPEC §2).

For each sample x (all samples of a batch at once):

    r <- x, alpha <- 0
    repeat:  c <- Phi^T r;  i <- argmax_i c_i;  a <- c_i - lam/2
             if a <= 0: stop;  alpha_i += a;  r <- r - a * f_i

Each accepted step lowers ||x - Phi alpha||^2 + lam ||alpha||_1 by exactly a^2 (unit columns).

`solve` is the fast batched form. It never forms the residual: with the Gram matrix G = Phi^T Phi
the scores update as c <- c - a * G[i], O(m) per sample and step instead of O(dm), and samples
that have stopped are dropped from the working set so late steps stay cheap. `solve_reference` is
the plain per-sample loop, kept as the readable twin the tests compare against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# A step is taken only when the best score beats lam/2 by more than the scores' rounding error
# (a few ulps of ||x||). Without this guard, floating-point noise after each step (the chosen atom's
# score lands on lam/2 exactly, in exact arithmetic) lets a sample take spurious steps of size ~1e-16.
_ROUNDING_ULPS = 16

# Drop stopped samples from the working set once they make up this share of it. Compacting copies
# the whole score matrix, so doing it for every single stopped sample would cost more than it saves.
_COMPACT_FRACTION = 0.125


@dataclass
class SolveResult:
    alpha: Tensor  # (n, m) non-negative coefficients
    steps: Tensor  # (n,) accepted greedy steps per sample (int64)
    capped: Tensor  # (n,) True where a sample stopped only because it hit max_steps


def _check_inputs(x: Tensor, phi: Tensor, lam: float, max_steps: int) -> float:
    if x.dim() != 2 or phi.dim() != 2:
        raise ValueError(f"x must be (n, d) and phi (d, m); got {tuple(x.shape)} and {tuple(phi.shape)}")
    if x.shape[1] != phi.shape[0]:
        raise ValueError(f"x has d={x.shape[1]} columns but phi has d={phi.shape[0]} rows")
    if not x.is_floating_point() or x.dtype != phi.dtype or x.device != phi.device:
        raise ValueError(
            f"x and phi must share a floating dtype and device; got {x.dtype}/{x.device} and {phi.dtype}/{phi.device}"
        )
    lam = float(lam)
    if not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"lam must be a finite number > 0, got {lam}")
    if int(max_steps) != max_steps or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps}")
    if not (torch.isfinite(x).all() and torch.isfinite(phi).all()):
        raise ValueError("x and phi must be finite (found NaN or Inf)")
    return lam


def solve(x: Tensor, phi: Tensor, lam: float, max_steps: int = 256, gram: Tensor | None = None) -> SolveResult:
    """Batched greedy solve of min ||x - Phi alpha||^2 + lam ||alpha||_1 over alpha >= 0.

    x: (n, d); phi: (d, m) with unit-norm columns; lam > 0. `gram` may pass a precomputed
    Phi^T Phi when the same dictionary is used for many batches. Runs on x's device and dtype.
    """
    lam = _check_inputs(x, phi, lam, max_steps)
    n, m = x.shape[0], phi.shape[1]
    half_lam = lam / 2
    gram = phi.T @ phi if gram is None else gram
    limit = half_lam + _ROUNDING_ULPS * torch.finfo(x.dtype).eps * x.norm(dim=1)  # per-sample stop level
    scores = x @ phi  # (k, m): scores of the samples still in the working set
    rows = torch.arange(n, device=x.device)  # their indices in the batch
    capped = torch.zeros(n, dtype=torch.bool, device=x.device)
    picked_rows, picked_atoms, picked_amounts = [], [], []
    gram_rows = torch.empty_like(scores)
    stopped = 0  # samples in the working set that have stopped (their amount is clamped to 0)

    for step in range(max_steps + 1):
        if rows.numel() == 0:
            break
        best, atom = scores.max(dim=1)
        go = best > limit
        if step == max_steps:
            capped[rows[go]] = True
            break
        amount = torch.where(go, best - half_lam, 0)  # a stopped sample takes zero steps from here on
        stopped = rows.numel() - int(go.sum())
        if stopped == rows.numel():
            break
        if stopped >= _COMPACT_FRACTION * rows.numel():
            keep = go.nonzero().squeeze(1)
            scores, rows, atom, amount, limit = scores[keep], rows[keep], atom[keep], amount[keep], limit[keep]
            gram_rows = gram_rows[: rows.numel()]
        picked_rows.append(rows)
        picked_atoms.append(atom)
        picked_amounts.append(amount)
        torch.index_select(gram, 0, atom, out=gram_rows)
        scores.addcmul_(gram_rows, amount.unsqueeze(1), value=-1)

    alpha = torch.zeros(n, m, dtype=x.dtype, device=x.device)
    steps = torch.zeros(n, dtype=torch.int64, device=x.device)
    if picked_rows:
        r, a, v = torch.cat(picked_rows), torch.cat(picked_atoms), torch.cat(picked_amounts)
        alpha.index_put_((r, a), v, accumulate=True)
        steps.index_add_(0, r, (v > 0).to(torch.int64))
    return SolveResult(alpha=alpha, steps=steps, capped=capped)


def solve_reference(x: Tensor, phi: Tensor, lam: float, max_steps: int = 256) -> SolveResult:
    """The same algorithm, one sample at a time, recomputing Phi^T r from the residual each step."""
    lam = _check_inputs(x, phi, lam, max_steps)
    n, m = x.shape[0], phi.shape[1]
    alpha = torch.zeros(n, m, dtype=x.dtype, device=x.device)
    steps = torch.zeros(n, dtype=torch.int64, device=x.device)
    capped = torch.zeros(n, dtype=torch.bool, device=x.device)
    eps = torch.finfo(x.dtype).eps
    for j in range(n):
        residual = x[j].clone()
        limit = lam / 2 + _ROUNDING_ULPS * eps * float(x[j].norm())
        for step in range(max_steps + 1):
            scores = phi.T @ residual
            i = int(torch.argmax(scores))
            amount = scores[i] - lam / 2
            if scores[i] <= limit:
                break
            if step == max_steps:
                capped[j] = True
                break
            alpha[j, i] += amount
            residual -= amount * phi[:, i]
            steps[j] += 1
    return SolveResult(alpha=alpha, steps=steps, capped=capped)


def objective(x: Tensor, phi: Tensor, alpha: Tensor, lam: float) -> Tensor:
    """Per-sample ||x - Phi alpha||^2 + lam ||alpha||_1 (SPEC §1), shape (n,)."""
    residual = x - alpha @ phi.T
    return residual.pow(2).sum(dim=1) + lam * alpha.sum(dim=1)
