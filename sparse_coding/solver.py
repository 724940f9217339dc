"""The greedy coefficient solver: non-negative matching pursuit with shrinkage (docs/method.md §2).

For each sample x (all samples of a batch at once):

    r <- x, alpha <- 0
    repeat:  c <- Phi^T r;  i <- argmax_i c_i;  a <- c_i - lam/2
             if a <= tol * lam/2: stop;  alpha_i += a;  r <- r - a * f_i

Each accepted step lowers ||x - Phi alpha||^2 + lam ||alpha||_1 by exactly a^2 (unit columns).
In exact arithmetic the steps shrink geometrically and never reach a <= 0, so the stop is the
explicit relative tolerance `tol` (docs/method.md §2.2): the same rule in float32 and float64 and in every
backend, so steps, L0 and the capped fraction do not depend on the dtype. Its default was chosen
by measurement (docs/performance.md): it moves S1 and L_norm by < 0.1 % against tol -> 0.

`solve` is the fast form. It never forms the residual: with the Gram matrix G = Phi^T Phi the
scores update as c <- c - a * G[i], O(m) per sample and step instead of O(dm). Two backends:
- "numba" (default on CPU when numba is installed): a compiled loop, samples spread over the cores,
  each sample's m scores kept in cache for all its steps; the update and the next maximum are one
  pass over them. It writes only the nonzero coefficients.
- "torch" (any device; CPU fallback): all samples in lock-step with batched tensor ops; samples that
  have stopped are dropped from the working set so late steps stay cheap.
`solve_reference` is the plain per-sample loop, kept as the readable twin the tests compare against.

The result is sparse (CSR rows: `indices`, `values`, `offsets`), so decoding, gradients and every
metric cost O(nonzeros), not O(n * m); `alpha` gives the dense (n, m) matrix when one is wanted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import functional as F

# The default relative step tolerance (docs/method.md §2.2; measured in docs/performance.md).
DEFAULT_TOL = 1e-2

# Drop stopped samples from the working set once they make up this share of it. Compacting copies
# the whole score matrix, so doing it for every single stopped sample would cost more than it saves.
_COMPACT_FRACTION = 0.125


@dataclass
class SolveResult:
    """Sparse coefficients of n samples over m atoms, as CSR rows: sample j's nonzeros are
    `indices[offsets[j]:offsets[j+1]]` (distinct atoms) with `values` > 0 at the same positions."""

    indices: Tensor  # (nnz,) int64 atom of each nonzero coefficient
    values: Tensor  # (nnz,) its coefficient, > 0
    offsets: Tensor  # (n + 1,) int64 row pointer
    steps: Tensor  # (n,) accepted greedy steps per sample (int64); >= l0 since atoms can repeat
    capped: Tensor  # (n,) True where a sample stopped only because it hit max_steps
    m: int  # dictionary size
    _dense: Tensor | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return self.offsets.numel() - 1

    @property
    def rows(self) -> Tensor:
        """(nnz,) the sample of each nonzero."""
        counts = self.l0
        return torch.repeat_interleave(torch.arange(self.n, device=counts.device), counts)

    @property
    def l0(self) -> Tensor:
        """(n,) number of nonzero coefficients per sample."""
        return self.offsets.diff()

    @property
    def alpha(self) -> Tensor:
        """The dense (n, m) coefficient matrix (built once, on demand)."""
        if self._dense is None:
            dense = torch.zeros(self.n, self.m, dtype=self.values.dtype, device=self.values.device)
            dense[self.rows, self.indices] = self.values
            self._dense = dense
        return self._dense

    def row_sums(self) -> Tensor:
        """(n,) ||alpha_j||_1."""
        return _segment(self.values, self.offsets, "sum")

    def row_max(self) -> Tensor:
        """(n,) max_i alpha_ij (0 for a sample with no coefficient)."""
        return _segment(self.values, self.offsets, "max")

    def feature_counts(self) -> Tensor:
        """(m,) number of samples using each atom (int64)."""
        return torch.bincount(self.indices, minlength=self.m)

    def decode(self, phi: Tensor) -> Tensor:
        """Phi alpha for every sample, (n, d), from the nonzeros only; differentiable in phi."""
        return F.embedding_bag(self.indices, phi.T, self.offsets[:-1], mode="sum",
                               per_sample_weights=self.values.to(phi.dtype))


def _segment(values: Tensor, offsets: Tensor, reduce: str) -> Tensor:
    n = offsets.numel() - 1
    if values.numel() == 0:
        return torch.zeros(n, dtype=values.dtype, device=values.device)
    return torch.segment_reduce(values, reduce, offsets=offsets, unsafe=True, initial=0)


def from_dense(alpha: Tensor, steps: Tensor, capped: Tensor) -> SolveResult:
    """A SolveResult from a dense (n, m) coefficient matrix."""
    rows, atoms = alpha.nonzero(as_tuple=True)  # row-major: samples in order
    counts = torch.bincount(rows, minlength=alpha.shape[0])
    offsets = torch.zeros(alpha.shape[0] + 1, dtype=torch.int64, device=alpha.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return SolveResult(atoms, alpha[rows, atoms], offsets, steps, capped, alpha.shape[1], _dense=alpha)


def all_finite(t: Tensor) -> bool:
    """One float64 sum instead of isfinite's several passes: NaN/Inf propagate into it, and a float64 sum
    of float32/float16 values cannot overflow; only a non-finite sum (possible for huge float64 values)
    needs the element-wise check."""
    return bool(torch.isfinite(t.sum(dtype=torch.float64))) or bool(torch.isfinite(t).all())


def _check_inputs(x: Tensor, phi: Tensor, lam: float, max_steps: int, tol: float) -> float:
    if x.dim() != 2 or phi.dim() != 2:
        raise ValueError(f"x must be (n, d) and phi (d, m); got {tuple(x.shape)} and {tuple(phi.shape)}")
    if x.shape[1] != phi.shape[0]:
        raise ValueError(f"x has d={x.shape[1]} columns but phi has d={phi.shape[0]} rows")
    if x.dtype != phi.dtype or x.device != phi.device:
        raise ValueError(
            f"x and phi must share a dtype and device; got {x.dtype}/{x.device} and {phi.dtype}/{phi.device}"
        )
    if x.dtype not in (torch.float32, torch.float64):
        # half precision rounds scores by ~1e-3 relative: the step tolerance would be meaningless
        raise ValueError(f"the solver needs float32 or float64 tensors, got {x.dtype} (cast with .float())")
    lam = float(lam)
    if not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"lam must be a finite number > 0, got {lam}")
    if int(max_steps) != max_steps or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and 0 < tol < 1):
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
    if not (all_finite(x) and all_finite(phi)):
        raise ValueError("x and phi must be finite (found NaN or Inf)")
    return lam


def _thresholds(lam: float, tol: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """lam/2 and tol*lam/2 rounded to the data's dtype, the same numbers in every backend."""
    half = torch.tensor(lam / 2, dtype=dtype)
    return half, torch.tensor(tol * (lam / 2), dtype=dtype)


def solve(
    x: Tensor, phi: Tensor, lam: float, max_steps: int = 256, gram: Tensor | None = None, backend: str = "auto",
    tol: float = DEFAULT_TOL,
) -> SolveResult:
    """Batched greedy solve of min ||x - Phi alpha||^2 + lam ||alpha||_1 over alpha >= 0.

    x: (n, d); phi: (d, m) with unit-norm columns; lam > 0; a step of size a is taken only while
    a > tol * lam/2. `gram` may pass a precomputed Phi^T Phi when the same dictionary is used for
    many batches. Runs on x's device and dtype (float32 or float64).
    backend: "auto" (the compiled CPU kernel for CPU tensors when numba is installed, else torch),
    "torch" (batched tensor ops, any device) or "numba" (CPU only). No gradient flows through it.
    """
    lam = _check_inputs(x, phi, lam, max_steps, tol)
    if backend not in ("auto", "torch", "numba"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'numba', got {backend!r}")
    use_kernel = backend == "numba" or (backend == "auto" and x.device.type == "cpu" and _kernel_available())
    if use_kernel and x.device.type != "cpu":
        raise ValueError(f"the numba backend runs on CPU tensors only; x is on {x.device}")
    with torch.no_grad():
        x, phi = x.detach(), phi.detach()
        gram = phi.T @ phi if gram is None else gram.detach()
        half, step_min = _thresholds(lam, tol, x.dtype)
        scores = x @ phi  # (n, m) Phi^T x for every sample
        if use_kernel:
            return _solve_kernel(scores, gram, half, step_min, int(max_steps))
        return _solve_torch(scores, gram, half.to(x.device), step_min.to(x.device), int(max_steps))


def _solve_torch(scores: Tensor, gram: Tensor, half: Tensor, step_min: Tensor, max_steps: int) -> SolveResult:
    """All samples in lock-step: one (k, m) max, Gram-row gather and update per greedy step."""
    n, m = scores.shape
    rows = torch.arange(n, device=scores.device)  # indices of the samples still in the working set
    capped = torch.zeros(n, dtype=torch.bool, device=scores.device)
    picks = []
    gram_rows = torch.empty_like(scores)
    for step in range(max_steps + 1):
        best, atom = scores.max(dim=1)
        amount = best - half
        go = amount > step_min
        if step == max_steps:
            capped[rows[go]] = True
            break
        going = int(go.sum())
        if going == 0:
            break
        amount.mul_(go)  # a stopped sample takes zero steps from here on
        if rows.numel() - going >= _COMPACT_FRACTION * rows.numel():
            keep = go.nonzero().squeeze(1)
            scores, rows, atom, amount = scores[keep], rows[keep], atom[keep], amount[keep]
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
    return from_dense(alpha, steps, capped)


def _solve_kernel(scores: Tensor, gram: Tensor, half: Tensor, step_min: Tensor, max_steps: int) -> SolveResult:
    """One sample at a time per core, its m scores held in L1/L2 cache for all its steps; each sample
    writes its distinct atoms and their coefficients into its own row of (n, width) buffers."""
    n, m = scores.shape
    width = min(max_steps, m)  # a sample cannot hold more distinct atoms than either
    atoms = torch.empty(n, width, dtype=torch.int64)
    values = torch.empty(n, width, dtype=scores.dtype)
    counts = torch.zeros(n, dtype=torch.int64)
    steps = torch.zeros(n, dtype=torch.int64)
    capped = torch.zeros(n, dtype=torch.bool)
    kernel = _kernel()
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))  # obey torch's setting
    kernel(scores.numpy(), gram.contiguous().numpy(), half.reshape(1).numpy(), step_min.reshape(1).numpy(),
           max_steps, atoms.numpy(), values.numpy(), counts.numpy(), steps.numpy(), capped.numpy())
    keep = torch.arange(width) < counts.unsqueeze(1)  # row-major: samples stay in order
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    return SolveResult(atoms[keep], values[keep], offsets, steps, capped, m)


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
        import numpy as np

        LANES = 16  # noqa: N806 - a compile-time constant of the kernel

        @numba.njit(cache=True, nogil=True, inline="always")
        def max_of(c, lanes):  # pragma: no cover - compiled
            # Running maxima in LANES independent lanes, written as a fixed-length inner loop the compiler turns
            # into vector compares and blends; a single running max is a chain of dependent compares (~3x slower).
            m = c.shape[0]
            width = lanes.shape[0]
            if m < width:
                best = c[0]
                for t in range(1, m):
                    best = c[t] if c[t] > best else best
                return best
            for lane in range(width):
                lanes[lane] = c[lane]
            whole = m - m % width
            for t in range(width, whole, width):
                for lane in range(width):
                    v = c[t + lane]
                    lanes[lane] = v if v > lanes[lane] else lanes[lane]
            best = lanes[0]
            for lane in range(1, width):
                best = lanes[lane] if lanes[lane] > best else best
            for t in range(whole, m):
                best = c[t] if c[t] > best else best
            return best

        @numba.njit(cache=True, nogil=True, inline="always")
        def first_index_of(c, best, width):  # pragma: no cover - compiled
            # The first index holding `best` (as torch.argmax picks), found a block of `width` at a time.
            m = c.shape[0]
            t = 0
            while t + width <= m:
                hit = False
                for lane in range(width):
                    hit |= c[t + lane] == best
                if hit:
                    break
                t += width
            while t < m - 1 and c[t] != best:
                t += 1
            return t

        @numba.njit(parallel=True, cache=True, nogil=True)
        def greedy(scores, gram, half, step_min, max_steps, atoms, values, counts, steps, capped):  # pragma: no cover
            n, m = scores.shape
            for j in numba.prange(n):
                c = scores[j]  # updated in place: c = Phi^T r for this sample's residual r
                lanes = np.empty(LANES, scores.dtype)
                best = max_of(c, lanes)
                for step in range(max_steps + 1):
                    amount = best - half[0]
                    if not amount > step_min[0]:
                        break
                    if step == max_steps:
                        capped[j] = True
                        break
                    i = first_index_of(c, best, lanes.shape[0])
                    k = 0
                    while k < counts[j] and atoms[j, k] != i:  # accumulate a repeated atom
                        k += 1
                    if k == counts[j]:
                        atoms[j, k] = i
                        values[j, k] = amount
                        counts[j] += 1
                    else:
                        values[j, k] += amount
                    steps[j] += 1
                    g = gram[i]
                    for t in range(m):  # a plain pass the compiler vectorises
                        c[t] -= amount * g[t]
                    best = max_of(c, lanes)

        _KERNEL = greedy
    return _KERNEL


def solve_reference(x: Tensor, phi: Tensor, lam: float, max_steps: int = 256, tol: float = DEFAULT_TOL) -> SolveResult:
    """The same algorithm, one sample at a time, recomputing Phi^T r from the residual each step."""
    lam = _check_inputs(x, phi, lam, max_steps, tol)
    n, m = x.shape[0], phi.shape[1]
    alpha = torch.zeros(n, m, dtype=x.dtype, device=x.device)
    steps = torch.zeros(n, dtype=torch.int64, device=x.device)
    capped = torch.zeros(n, dtype=torch.bool, device=x.device)
    half, step_min = (t.to(x.device) for t in _thresholds(lam, tol, x.dtype))
    for j in range(n):
        residual = x[j].clone()
        for step in range(max_steps + 1):
            scores = phi.T @ residual
            i = int(torch.argmax(scores))
            amount = scores[i] - half
            if not amount > step_min:
                break
            if step == max_steps:
                capped[j] = True
                break
            alpha[j, i] += amount
            residual -= amount * phi[:, i]
            steps[j] += 1
    return from_dense(alpha, steps, capped)


def objective(x: Tensor, phi: Tensor, alpha: Tensor, lam: float) -> Tensor:
    """Per-sample ||x - Phi alpha||^2 + lam ||alpha||_1 (docs/method.md §1), shape (n,)."""
    residual = x - alpha @ phi.T
    return residual.pow(2).sum(dim=1) + lam * alpha.sum(dim=1)
