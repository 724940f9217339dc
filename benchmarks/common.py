"""Shared helpers for the benchmarks: timing, the machine record, problem set-up, result tables."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from sparse_coding.config.resources import cpu_model
from sparse_coding.solver import solve

RESULTS = Path(__file__).resolve().parent / "results"


def best_time(fn, repeats: int = 3) -> float:
    """Minimum wall time of `repeats` calls (the least disturbed by other load on a shared machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def machine(device: str) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    info = {
        "cpu_count": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device": device,
        "load_average_at_start": load,
    }
    try:
        import numba
        import sklearn

        info.update(numba=numba.__version__, sklearn=sklearn.__version__)
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def auto_lambda(x: torch.Tensor, phi: torch.Tensor, rounds: int = 3) -> float:
    """The module's auto-lambda start: 0.1 * mean max score, then lam <- 0.1 * mean_max(alpha) a few rounds."""
    lam = 0.1 * float((x @ phi).amax(dim=1).clamp_min(0).mean())
    for _ in range(rounds):
        lam = 0.1 * float(solve(x, phi, lam).alpha.amax(dim=1).mean())
    return lam


def perturbed_truth_dictionary(features: torch.Tensor, m: int, seed: int = 1, noise: float = 0.5) -> torch.Tensor:
    """The generator's true features, padded to m columns with noisy copies of them (noise of norm ~0.5)."""
    d, m_true = features.shape
    gen = torch.Generator().manual_seed(seed)
    if m <= m_true:
        phi = features[:, :m].clone()
    else:
        pick = torch.randint(0, m_true, (m - m_true,), generator=gen)
        pad = features[:, pick] + noise / math.sqrt(d) * torch.randn(d, m - m_true, generator=gen)
        phi = torch.cat([features, pad], dim=1)
    return phi / phi.norm(dim=0, keepdim=True)


def brief_training(x: torch.Tensor, m: int, steps: int, batch: int = 1024, lr: float = 1e-2, seed: int = 0):
    """A dictionary trained briefly by the project's alternating scheme (docs/method.md §3): data-row init, then
    `steps` rounds of (solve, one Adam step on ||x - Phi alpha||^2, parallel-gradient removal, renormalise)."""
    gen = torch.Generator().manual_seed(seed)
    n, d = x.shape
    phi = x[torch.randperm(n, generator=gen)[:m]].T.clone()
    phi += 1e-3 * phi.std() * torch.randn(phi.shape, generator=gen)
    phi = (phi / phi.norm(dim=0, keepdim=True).clamp_min(1e-12)).requires_grad_(True)
    opt = torch.optim.Adam([phi], lr=lr)
    lam = auto_lambda(x[:batch], phi.detach(), rounds=2)
    for step in range(steps):
        xb = x[torch.randint(0, n, (batch,), generator=gen)]
        alpha = solve(xb, phi.detach(), lam).alpha
        opt.zero_grad()
        (xb - alpha @ phi.T).pow(2).sum(dim=1).mean().backward()
        with torch.no_grad():
            phi.grad -= phi * (phi.grad * phi).sum(dim=0, keepdim=True)
        opt.step()
        with torch.no_grad():
            phi /= phi.norm(dim=0, keepdim=True).clamp_min(1e-12)
        if step % 10 == 9:
            lam = 0.1 * float(alpha.amax(dim=1).mean())
    return phi.detach()


def write_results(name: str, record: dict, markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def fmt_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "—"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"
