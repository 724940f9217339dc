"""The greedy coefficient solver: non-negative matching pursuit with shrinkage (SPEC §2).

For each sample x (all samples of a batch at once):

    r <- x, alpha <- 0
    repeat:  c <- Phi^T r;  i <- argmax_i c_i;  a <- c_i - lam/2
             if a <= 0: stop;  alpha_i += a;  r <- r - a * f_i

Each accepted step lowers ||x - Phi alpha||^2 + lam ||alpha||_1 by exactly a^2 (unit columns).

`solve` is the fast form. It never forms the residual: with the Gram matrix G = Phi^T Phi the
scores update as c <- c - a * G[i], O(m) per sample and step instead of O(dm). Two backends:
- "numba" (default on CPU when numba is installed): a compiled loop, samples spread over the cores,
  each sample's m scores kept in cache for all its steps; the update and the next maximum are one
  pass over them. About 10x the tensor path on a 2-core CPU (docs/performance.md).
- "torch" (any device; CPU fallback): all samples in lock-step with batched tensor ops; samples that
  have stopped are dropped from the working set so late steps stay cheap.
`solve_reference` is the plain per-sample loop, kept as the readable twin the tests compare against.
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


def all_finite(t: Tensor) -> bool:
    """One float64 sum instead of isfinite's several passes: NaN/Inf propagate into it, and a float64 sum
    of float32/float16 values cannot overflow; only a non-finite sum (possible for huge float64 values)
    needs the element-wise check."""
    return bool(torch.isfinite(t.sum(dtype=torch.float64))) or bool(torch.isfinite(t).all())


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
    if not (all_finite(x) and all_finite(phi)):
        raise ValueError("x and phi must be finite (found NaN or Inf)")
    return lam


def solve(
    x: Tensor, phi: Tensor, lam: float, max_steps: int = 256, gram: Tensor | None = None, backend: str = "auto"
) -> SolveResult:
    """Batched greedy solve of min ||x - Phi alpha||^2 + lam ||alpha||_1 over alpha >= 0.

    x: (n, d); phi: (d, m) with unit-norm columns; lam > 0. `gram` may pass a precomputed
    Phi^T Phi when the same dictionary is used for many batches. Runs on x's device and dtype.
    backend: "auto" (the compiled CPU kernel for CPU tensors when numba is installed, else torch),
    "torch" (batched tensor ops, any device) or "numba" (CPU only). No gradient flows through it.
    """
    lam = _check_inputs(x, phi, lam, max_steps)
    if backend not in ("auto", "torch", "numba"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'numba', got {backend!r}")
    use_kernel = backend == "numba" or (backend == "auto" and x.device.type == "cpu" and _kernel_available())
    if use_kernel and x.device.type != "cpu":
        raise ValueError(f"the numba backend runs on CPU tensors only; x is on {x.device}")
    with torch.no_grad():
        x, phi = x.detach(), phi.detach()
        gram = phi.T @ phi if gram is None else gram.detach()
        limit = lam / 2 + _ROUNDING_ULPS * torch.finfo(x.dtype).eps * x.norm(dim=1)  # per-sample stop level
        scores = x @ phi  # (n, m) Phi^T x for every sample
        if use_kernel:
            return _solve_kernel(scores, gram, limit, lam / 2, int(max_steps))
        return _solve_torch(scores, gram, limit, lam / 2, int(max_steps))


def _solve_torch(scores: Tensor, gram: Tensor, limit: Tensor, half_lam: float, max_steps: int) -> SolveResult:
    """All samples in lock-step: one (k, m) max, Gram-row gather and update per greedy step."""
    n, m = scores.shape
    rows = torch.arange(n, device=scores.device)  # indices of the samples still in the working set
    capped = torch.zeros(n, dtype=torch.bool, device=scores.device)
    picks = []
    gram_rows = torch.empty_like(scores)
    for step in range(max_steps + 1):
        best, atom = scores.max(dim=1)
        go = best > limit
        if step == max_steps:
            capped[rows[go]] = True
            break
        going = int(go.sum())
        if going == 0:
            break
        amount = (best - half_lam).mul_(go)  # a stopped sample takes zero steps from here on
        if rows.numel() - going >= _COMPACT_FRACTION * rows.numel():
            keep = go.nonzero().squeeze(1)
            scores, rows, atom, amount, limit = scores[keep], rows[keep], atom[keep], amount[keep], limit[keep]
            gram_rows = gram_rows[:going]
        picks.append((rows, atom, amount))
        torch.index_select(gram, 0, atom, out=gram_rows)
        scores.addcmul_(gram_rows, amount.unsqueeze(1), value=-1)

    alpha = torch.zeros(n, m, dtype=scores.dtype, device=scores.device)
    steps = torch.zeros(n, dtype=torch.int64, device=scores.device)
    if picks:
        r, a, v = (torch.cat(t) for t in zip(*picks))
        alpha.index_put_((r, a), v, accumulate=True)
        steps.index_add_(0, r, (v > 0).to(torch.int64))
    return SolveResult(alpha=alpha, steps=steps, capped=capped)


def _solve_kernel(scores: Tensor, gram: Tensor, limit: Tensor, half_lam: float, max_steps: int) -> SolveResult:
    """One sample at a time per core, its m scores held in L1/L2 cache for all its steps."""
    n, m = scores.shape
    alpha = torch.zeros(n, m, dtype=scores.dtype)
    steps = torch.zeros(n, dtype=torch.int64)
    capped = torch.zeros(n, dtype=torch.bool)
    half = torch.tensor([half_lam], dtype=scores.dtype)  # lam/2 rounded to the data's dtype, as in torch
    kernel = _kernel()
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))  # obey torch's setting
    kernel(scores.numpy(), gram.contiguous().numpy(), limit.contiguous().numpy(), half.numpy(), max_steps,
           alpha.numpy(), steps.numpy(), capped.numpy())
    return SolveResult(alpha=alpha, steps=steps, capped=capped)


_KERNEL = None


def _kernel_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _kernel():
    """Compile (or load from numba's on-disk cache) the per-sample greedy loop."""
    global _KERNEL
    if _KERNEL is None:
        import numba

        @numba.njit(parallel=True, cache=True, nogil=True)
        def greedy(scores, gram, limit, half, max_steps, alpha, steps, capped):  # pragma: no cover - compiled
            n, m = scores.shape
            for j in numba.prange(n):
                c = scores[j]  # updated in place: c = Phi^T r for this sample's residual r
                best = c[0]
                for t in range(1, m):
                    best = max(best, c[t])
                for step in range(max_steps + 1):
                    if not best > limit[j]:
                        break
                    if step == max_steps:
                        capped[j] = True
                        break
                    i = 0
                    while c[i] != best:  # the first index holding the maximum, as torch.argmax picks
                        i += 1
                    amount = best - half[0]
                    alpha[j, i] += amount
                    steps[j] += 1
                    g = gram[i]
                    c[0] -= amount * g[0]
                    best = c[0]
                    for t in range(1, m):  # update and next maximum in one pass
                        c[t] -= amount * g[t]
                        best = max(best, c[t])

        _KERNEL = greedy
    return _KERNEL


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
