"""Train until the held-out measurement has converged (docs/method.md §6), and say whether it did.

The held-out metrics are computed every `convergence.eval_every` training samples (Lightning's
`val_check_interval`, counted across epochs). `ConvergenceMonitor` reads the module's history after
each evaluation and stops the fit (`trainer.should_stop`, as EarlyStopping does) once, for every
dictionary, normalized_loss and avg_coef_norm each moved by less than `tol` (relative) between the
means of the last two runs of `window` evaluations, and auto-lambda has settled. It also times the fit
and its evaluations, and notes when a cache was passed over more than once.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Timer

from sparse_coding.lightning_compat import is_last_batch

# Auto cadence: evaluate every EVAL_MULTIPLE x (held-out rows) training samples. Evaluating a row
# (solve only, one Gram per pass) costs about 0.4x training on it (solve, Gram per batch,
# decode, gradient, Adam): measured 14.5 % of the fit at 4x (MiniLM layer 3), so 6x keeps it near 10 %.
EVAL_MULTIPLE = 6
TRACKED = ("normalized_loss", "avg_coef_norm")


def eval_every_samples(cfg: Any, val_rows: int, global_batch: int) -> int:
    """Training samples between evaluations, a whole number of global batches."""
    every = int(cfg.convergence.eval_every) or EVAL_MULTIPLE * int(val_rows)
    return max(1, math.ceil(every / global_batch)) * global_batch


def check_train_batches(cfg: Any, batches_per_epoch: int) -> None:
    """A fractional trainer.limit_train_batches that leaves no batch of an epoch is one line (Lightning raises a
    MisconfigurationException from inside the fit)."""
    from sparse_coding.errors import ConfigError

    limit = cfg.trainer.get("limit_train_batches")
    if isinstance(limit, float) and 0 < limit < 1 and int(limit * batches_per_epoch) < 1:
        raise ConfigError(f"trainer.limit_train_batches={limit!r} leaves no batch of the {batches_per_epoch} training "
                          f"batches an epoch ({limit!r} x {batches_per_epoch} < 1): use at least "
                          f"{1 / batches_per_epoch:.3g}, or a whole number of batches")


def steps_for_samples(samples: int, epoch_sizes: list[int]) -> int:
    """Batches until `samples` training samples are trained on, an epoch being batches of `epoch_sizes` rows (the
    last batch of an epoch, or of a loader worker's part, may be short)."""
    per_epoch = sum(epoch_sizes)
    if per_epoch <= 0:
        return 0
    epochs, rest = divmod(int(samples), per_epoch)
    steps, got = epochs * len(epoch_sizes), 0
    for size in epoch_sizes:
        if got >= rest:
            break
        got += size
        steps += 1
    return steps


def trainer_schedule(cfg: Any, val_rows: int, global_batch: int, epoch_sizes: Optional[list[int]] = None) -> dict:
    """Trainer arguments for the evaluation cadence and the budget. `epoch_sizes`: the global batch sizes of one
    epoch, in order (the data module's `epoch_batch_sizes()`): the sample budget is then the step at which the run
    has trained on `convergence.max_samples` samples, short batches included (else max_samples / batch)."""
    c, t = cfg.convergence, cfg.trainer
    every = eval_every_samples(cfg, val_rows, global_batch)
    max_steps = int(t.max_steps)
    max_steps_from = "trainer.max_steps"
    max_time = None
    if c.stop:
        if c.max_samples > 0:
            batches = steps_for_samples(c.max_samples, epoch_sizes) if epoch_sizes else math.ceil(c.max_samples / global_batch)
            budget_steps = batches * int(cfg.dictionary.inner_steps)
            if max_steps < 1 or budget_steps < max_steps:
                max_steps, max_steps_from = budget_steps, "convergence.max_samples"
        if c.max_minutes > 0:
            max_time = {"seconds": float(c.max_minutes) * 60}
    return {
        "val_check_interval": every // global_batch,
        "check_val_every_n_epoch": None,  # the interval counts batches across epochs
        "max_steps": max_steps,
        "max_steps_from": max_steps_from,
        "max_time": max_time,
    }


def has_converged(history: list[dict], window: int, tol: float) -> bool:
    """The mean of the last `window` evaluations differs from the mean of the `window` before them by
    less than `tol` (relative) on every tracked metric of every dictionary, and every auto-lambda has
    settled (at the latest evaluation). Comparing window means, not single evaluations, keeps the
    optimizer's step-to-step noise (about 1 % at d=256) from holding a converged run open, and still
    catches a slow drift."""
    if len(history) < 2 * window:
        return False
    recent, before = history[-window:], history[-2 * window:-window]
    for k, latest in enumerate(recent[-1]["dictionaries"]):
        if not latest["lam_converged"]:
            return False
        for key in TRACKED:
            now = [point["dictionaries"][k][key] for point in recent]
            then = [point["dictionaries"][k][key] for point in before]
            if not all(math.isfinite(v) for v in now + then):
                return False
            mean_now, mean_then = sum(now) / window, sum(then) / window
            if abs(mean_now - mean_then) > tol * abs(mean_now):
                return False
    return True


def relative_change(history: list[dict], window: int) -> Optional[float]:
    """How far the run is from converging: the largest relative change, over every dictionary and tracked metric,
    between the means of the last `window` evaluations and of the `window` before them (what has_converged
    compares with `tol`); None before 2 x window evaluations, inf for a non-finite value or a zero mean that moved."""
    if window < 1 or len(history) < 2 * window:
        return None
    recent, before = history[-window:], history[-2 * window:-window]
    worst = 0.0
    for k in range(len(recent[-1]["dictionaries"])):
        for key in TRACKED:
            now = [point["dictionaries"][k][key] for point in recent]
            then = [point["dictionaries"][k][key] for point in before]
            if not all(math.isfinite(v) for v in now + then):
                return math.inf
            mean_now, mean_then = sum(now) / window, sum(then) / window
            diff = abs(mean_now - mean_then)
            change = diff / abs(mean_now) if mean_now != 0 else (0.0 if diff == 0 else math.inf)
            worst = max(worst, change)
    return worst


class ConvergenceMonitor(pl.Callback):
    """Stops the fit when the measurement has converged (with `stop`), times fit and evaluation."""

    def __init__(self, window: int, tol: float, stop: bool, max_samples: int = 0, max_minutes: float = 0.0,
                 train_rows: Optional[int] = None, is_cache: bool = False, fixed_rows: bool = False,
                 max_steps_from: str = "trainer.max_steps") -> None:
        self.window, self.tol, self.stop = int(window), float(tol), bool(stop)
        self.max_samples, self.max_minutes = int(max_samples), float(max_minutes)
        self.train_rows, self.is_cache = train_rows, is_cache
        self.fixed_rows = fixed_rows  # token embeddings: the vocabulary is all the data there is
        self.max_steps_from = max_steps_from
        self.converged = False
        self.stopped_by: Optional[str] = None
        self.fit_seconds = 0.0
        self.eval_seconds = 0.0
        self.passes = 0
        self._fit_start: Optional[float] = None
        self._eval_start: Optional[float] = None
        self._ended_converged = False

    # ---- timing ----
    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()
        # a resumed run decides afresh, except one whose checkpoint was taken after it had converged
        # (its outputs were never written): it stops before training any further
        self._ended_converged = self.stop and self.stopped_by == "converged"
        self.stopped_by, self.converged = None, False

    def on_train_start(self, trainer, pl_module) -> None:
        if self._ended_converged:
            trainer.should_stop = True
            self.stopped_by, self.converged = "converged", True

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._fit_start is not None:
            self.fit_seconds += time.perf_counter() - self._fit_start
            self._fit_start = None
        if self.stopped_by is None:
            self.stopped_by = self._budget_reason(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._eval_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._eval_start is not None and trainer.state.fn == "fit":
            self.eval_seconds += time.perf_counter() - self._eval_start
        self._eval_start = None
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        self.converged = has_converged(pl_module.history, self.window, self.tol)
        if self.converged and self.stop and not trainer.should_stop:
            trainer.should_stop = True
            self.stopped_by = "converged"

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        every = int(getattr(pl_module, "hparams", {}).get("epoch_batches", 0) or 0)
        if every > 0:  # passes by the run's own position: after a resume Lightning may re-enter a finished epoch
            passes = pl_module.global_step // int(pl_module.hparams.get("inner_steps", 1)) // every
            if passes <= self.passes:
                return  # a budget ended the epoch part-way, or this pass was counted before the checkpoint
            self.passes = passes
        elif not is_last_batch(trainer):
            return  # a budget ended the epoch part-way
        else:
            self.passes += 1
        if self.is_cache and not self.converged and self.passes == 1 and not trainer.should_stop and trainer.is_global_zero:
            rows = f"{self.train_rows:,} " if self.train_rows else ""
            hint = ("the vocabulary is the whole data set" if self.fixed_rows else
                    "fresh tokens are better: build a larger cache with corpus.max_tokens=...")
            print(f"note: the cache's {rows}training rows are used up before convergence; passing over them "
                  f"again ({hint})")

    def _budget_reason(self, trainer, pl_module) -> str:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return self.max_steps_from
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.current_epoch >= trainer.max_epochs:
            return "trainer.max_epochs"
        timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
        if self.stop and timer is not None and timer.time_remaining() is not None and timer.time_remaining() <= 0:
            return "convergence.max_minutes"
        return "interrupted"

    # ---- checkpoints: a resumed run keeps its timing and knows whether it had converged ----
    def state_dict(self) -> dict:
        return {"stopped_by": self.stopped_by, "converged": self.converged, "fit_seconds": self._elapsed_fit(),
                "eval_seconds": self.eval_seconds, "passes": self.passes}

    def load_state_dict(self, state: dict) -> None:
        self.stopped_by = state.get("stopped_by")
        self.converged = bool(state.get("converged", False))
        self.fit_seconds = float(state.get("fit_seconds", 0.0))
        self.eval_seconds = float(state.get("eval_seconds", 0.0))
        self.passes = int(state.get("passes", 0))

    def _elapsed_fit(self) -> float:
        running = time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0
        return self.fit_seconds + running

    # ---- the report ----
    def report(self, pl_module) -> dict:
        history = pl_module.history
        converged = has_converged(history, self.window, self.tol)  # at the final state, whatever stopped the run
        samples = int(pl_module.samples_seen)
        return {
            "converged": converged,
            "stopped_by": self.stopped_by,
            "samples_seen": samples,
            "optimizer_steps": int(pl_module.global_step),
            "epochs_completed": self.passes,
            "convergence": {"tol": self.tol, "window": self.window, "stop": self.stop},
            "history": history,
            "timing": {
                "fit_seconds": round(self.fit_seconds, 3),
                "eval_seconds": round(self.eval_seconds, 3),
                "samples_per_second": round(samples / self.fit_seconds, 1) if self.fit_seconds > 0 else None,
            },
        }


def unconverged_advice(report: dict) -> Optional[str]:
    """One line for a run that ended without converging: what stopped it and what to raise."""
    if report.get("converged"):
        return None
    raise_what = {
        "convergence.max_samples": "raise convergence.max_samples",
        "convergence.max_minutes": "raise convergence.max_minutes",
        "trainer.max_steps": "raise trainer.max_steps",
        "trainer.max_epochs": "raise trainer.max_epochs (or drop it: convergence.stop=true trains until converged)",
    }.get(report.get("stopped_by") or "", "rerun with a larger budget")
    return (f"warning: the measurement has NOT converged (stopped by {report.get('stopped_by')} after "
            f"{report.get('samples_seen', 0):,} samples): {raise_what}; the numbers above are not final")


def sample_sufficiency(result: dict, gap_tol: float) -> dict:
    """`sample_sufficient`: every dictionary's held-out normalized_loss is within `gap_tol` (relative) of its
    in-sample value, i.e. the dictionary has not memorised the rows it was fitted on (docs/method.md §5.4)."""
    entries = result.get("dictionaries", [result])
    gaps = [e.get("generalization_gap") for e in entries]
    if any(g is None or not math.isfinite(g) for g in gaps):
        return {"sample_sufficient": None, "gap_tol": gap_tol}
    return {"sample_sufficient": all(abs(g) <= gap_tol for g in gaps), "gap_tol": gap_tol}


def insufficient_sample_advice(result: dict, cfg: Any, datamodule: Any) -> Optional[str]:
    """One line for a run whose held-out and in-sample measurements differ by more than gap_tol: what to raise."""
    if result.get("sample_sufficient") is not False:
        return None
    entries = result.get("dictionaries", [result])
    worst = max(entries, key=lambda e: abs(e["generalization_gap"]))
    if cfg.model is None and cfg.data.name != "cache":
        what = "raise data.n or use data.fresh=true (fresh batches from the generator)"
    elif cfg.get("activation") == "token_embeddings":
        what = "the vocabulary is all the data there is: report both numbers, or use a smaller dictionary.mult"
    elif cfg.model is not None and not (cfg.data.name == "cache" and cfg.data.get("path")):
        what = f"raise corpus.max_tokens (now {int(cfg.corpus.max_tokens):,}) for a larger cache"
    else:
        what = "use a larger cache"
    rows = getattr(datamodule, "train_rows", None)
    fitted = f"its {rows:,} training rows" if rows else "the rows it was fitted on"
    return (f"warning: the sample is too small for this dictionary: held-out normalized_loss is "
            f"{worst['generalization_gap']:+.1%} off the in-sample value on {fitted} ({worst['label']}; "
            f"convergence.gap_tol={result['gap_tol']:g}): {what}; the held-out number is not the population value")


def resolution_note(result: dict, tol: float) -> Optional[str]:
    """A note when the held-out set resolves normalized_loss more coarsely than convergence.tol: convergence
    then means 'stopped moving within the measurement's own uncertainty'."""
    entries = result.get("dictionaries", [result])
    rel = max((e["normalized_loss_se"] / e["normalized_loss"] for e in entries
               if e.get("normalized_loss") and math.isfinite(e.get("normalized_loss_se", math.nan))), default=0.0)
    if rel <= tol:
        return None
    return (f"note: the held-out set resolves normalized_loss to +/-{rel:.1%} (1 SE, clustered), coarser than "
            f"convergence.tol={tol:g}: differences below that are not resolved; a larger held-out set "
            "(data.val_fraction, a larger cache) measures more finely")
