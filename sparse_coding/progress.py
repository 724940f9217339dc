"""The training progress bar: Lightning's rich bar, with the run's progress toward its budget and convergence.

Next to the per-pass bar ("pass k" instead of Lightning's "Epoch k/-2" when the run has no epoch limit) the
bar's text shows

- `samples`: training samples seen, out of the budget that binds (`convergence.max_samples`, else the
  samples `trainer.max_steps` stands for, else none: open-ended), with the share done;
- `held-out`: the last held-out normalized_loss (min..max over a grid of dictionaries);
- `change`: the window's relative change of the tracked metrics (sparse_coding.convergence.relative_change)
  against `convergence.tol`, or "n/m evals" before there are 2 x window evaluations;
- `eta`: the time left to the budget at the run's sample rate (or to convergence.max_minutes, if sooner).

It reads only what the run already holds (the module's history and samples_seen, the trainer's step count and
the ConvergenceMonitor's settings), at most every REFRESH_SECONDS, so it adds no device work.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

from pytorch_lightning.callbacks import RichProgressBar, Timer

from sparse_coding.convergence import ConvergenceMonitor, relative_change

REFRESH_SECONDS = 0.5


def _count(n: float) -> str:
    """12,345 / 1.23M / 4.5G: a sample count short enough for the bar."""
    n = float(n)
    for above, size, unit in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if abs(n) >= above:
            return f"{n / size:.3g}{unit}"
    return f"{n:,.0f}"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class PassProgressBar(RichProgressBar):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._start: Optional[tuple[float, float]] = None  # (time, samples_seen) when training (re)started
        self._cached: tuple[float, dict] = (-math.inf, {})

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            return super()._get_train_description(current_epoch)
        text = f"pass {current_epoch}"
        return f"{text:{len(self.validation_description)}}" if len(self.validation_description) > len(text) else text

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._start = (time.perf_counter(), _samples(pl_module))
        self._cached = (-math.inf, {})

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        now = time.perf_counter()
        if now - self._cached[0] >= REFRESH_SECONDS:
            self._cached = (now, self.budget_status(trainer, pl_module, now))
        return {**items, **self._cached[1]}

    def budget_status(self, trainer: Any, pl_module: Any, now: Optional[float] = None) -> dict[str, str]:
        """The budget and convergence texts shown on the bar (name: value)."""
        now = time.perf_counter() if now is None else now
        monitor = next((cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, ConvergenceMonitor)), None)
        samples = _samples(pl_module)
        budget, share = None, None
        if monitor is not None and monitor.stop and monitor.max_samples > 0 \
                and monitor.max_steps_from == "convergence.max_samples":
            budget = float(monitor.max_samples)
            share = samples / budget
        elif trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step > 0:
            share = trainer.global_step / trainer.max_steps
            budget = samples / share  # the samples max_steps stands for, at the batches seen so far
        out = {"samples": f"{_count(samples)}/{_count(budget)} ({share:.0%})" if budget
               else f"{_count(samples)} (open-ended)"}

        history = getattr(pl_module, "history", None) or []
        if history:
            losses = [d["normalized_loss"] for d in history[-1]["dictionaries"]]
            lo, hi = min(losses), max(losses)
            out["held-out"] = f"{lo:.4g}" if lo == hi else f"{lo:.4g}..{hi:.4g}"
        if monitor is not None:
            change = relative_change(history, monitor.window)
            if change is None:
                out["change"] = f"{len(history)}/{2 * monitor.window} evals (tol {monitor.tol:g})"
            else:
                settling = history and not all(d.get("lam_converged", True) for d in history[-1]["dictionaries"])
                out["change"] = f"{change:.2g}/tol {monitor.tol:g}" + (" (lambda settling)" if settling else "")

        eta = None
        if self._start is not None and share is not None and 0 < share < 1:
            elapsed, trained = now - self._start[0], samples - self._start[1]
            if elapsed > 0 and trained > 0:
                eta = (budget - samples) / (trained / elapsed)
        timer = next((cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, Timer)), None)
        left = timer.time_remaining() if timer is not None else None
        if left is not None and left >= 0:
            eta = left if eta is None else min(eta, left)
        if eta is not None:
            out["eta"] = _duration(eta)
        return out


def _samples(pl_module: Any) -> float:
    """samples_seen, a float64 buffer: read after the step's own host synchronisations (its finiteness checks)."""
    seen = getattr(pl_module, "samples_seen", 0)
    return float(seen.item() if hasattr(seen, "item") else seen)
