"""The exact non-negative lasso, batched, in float64, with a KKT certificate (the solver-gap reference).

    min_a ||x - Phi a||^2 + lam * sum(a),  a >= 0          (docs/method.md §2.5, per row of x)

Accelerated projected gradient (FISTA with per-row adaptive restart) over the whole batch, and every
`polish_every` iterations an exact solve of the KKT equations on each row's current support,
    a_S = (Phi_S^T Phi_S)^-1 (Phi_S^T x - lam / 2),
kept when it is positive and lowers that row's KKT violation. A row is finished when its KKT
violation is <= tol * lam:
    2 phi_i . r <= lam for every i,   = lam where a_i > 0     (r = x - Phi a).
The violation is returned, so every answer carries its own proof of optimality. Rows are solved
together (two GEMMs an iteration); certified rows leave the batch.
"""

from __future__ import annotations

import torch


def kkt_violation(x: torch.Tensor, phi: torch.Tensor, a: torch.Tensor, lam: float) -> torch.Tensor:
    """Per-row max KKT violation of min ||x - Phi a||^2 + lam |a|_1, a >= 0 (same units as lam)."""
    grad = 2 * (x - a @ phi.T) @ phi  # (n, m): 2 phi_i . r
    viol = torch.where(a > 0, (grad - lam).abs(), (grad - lam).clamp_min(0))
    return viol.max(1).values


def polish_support(x: torch.Tensor, phi: torch.Tensor, a: torch.Tensor, lam: float) -> torch.Tensor:
    """Each row's KKT equations solved exactly on its support; kept only where that helps (see the module doc)."""
    out = a.clone()
    before = kkt_violation(x, phi, a, lam)
    for j in range(a.shape[0]):
        s = torch.nonzero(a[j] > 0).flatten()
        if len(s) == 0:
            continue
        f = phi[:, s]
        try:
            sol = torch.linalg.solve(f.T @ f, f.T @ x[j] - lam / 2)
        except RuntimeError:  # a singular support (duplicated atoms): keep the iterate
            continue
        if bool((sol > 0).all()):
            cand = torch.zeros_like(a[j])
            cand[s] = sol
            if float(kkt_violation(x[j : j + 1], phi, cand[None], lam)[0]) < float(before[j]):
                out[j] = cand
    return out


def exact_lasso(x: torch.Tensor, phi: torch.Tensor, lam: float, tol: float = 1e-3, max_iter: int = 50_000,
                polish_every: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve every row of x (n, d) against phi (d, m); returns (alpha (n, m) float64, KKT violation / lam per row).

    Rows still above `tol` after `max_iter` iterations come back with their violation (the caller decides).
    """
    if lam <= 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    x, phi = x.double(), phi.double()
    n, m = x.shape[0], phi.shape[1]
    step = 1.0 / (2 * torch.linalg.matrix_norm(phi, ord=2).item() ** 2)  # 1 / Lipschitz constant of the gradient
    xphi = x @ phi  # (n, m), fixed
    gram = phi.T @ phi if m < 2 * phi.shape[0] else None  # else y Phi^T Phi as two thin GEMMs (2nmd < nm^2)
    alpha = torch.zeros(n, m, dtype=torch.float64)
    viol = kkt_violation(x, phi, alpha, lam)
    todo = torch.nonzero(viol > tol * lam).flatten()
    a = alpha[todo].clone()
    y, t = a.clone(), torch.ones(len(todo), 1, dtype=torch.float64)
    for it in range(1, max_iter + 1):
        if len(todo) == 0:
            break
        grad = 2 * ((y @ gram if gram is not None else (y @ phi.T) @ phi) - xphi[todo]) + lam
        a_next = (y - step * grad).clamp_min(0)
        # per-row restart when momentum points uphill (O'Donoghue & Candes' gradient scheme)
        restart = ((y - a_next) * (a_next - a)).sum(1, keepdim=True) > 0
        t_next = torch.where(restart, torch.ones_like(t), (1 + torch.sqrt(1 + 4 * t * t)) / 2)
        beta = torch.where(restart, torch.zeros_like(t), (t - 1) / t_next)
        y = a_next + beta * (a_next - a)
        a, t = a_next, t_next
        if it % polish_every == 0 or it == max_iter:
            polished = polish_support(x[todo], phi, a, lam)
            moved = (polished != a).any(1, keepdim=True)  # momentum restarts where the polish was kept
            a, y, t = polished, torch.where(moved, polished, y), torch.where(moved, torch.ones_like(t), t)
            v = kkt_violation(x[todo], phi, a, lam)
            alpha[todo], viol[todo] = a, v
            keep = ~(v <= tol * lam)  # NaN rows stay (and come back with their NaN violation)
            todo, a, y, t = todo[keep], a[keep], y[keep], t[keep]
    return alpha, viol / lam
