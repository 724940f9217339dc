"""The progress bar toward the budget (sparse_coding.progress, issue 20 item 8): the bar's text for a given run
state (no training: a fake trainer and module). (The relative change it shows: tests/test_convergence.py.)"""

from types import SimpleNamespace

import torch

from sparse_coding.convergence import ConvergenceMonitor, relative_change


def point(samples, values, lam_ok=True):
    return {"samples_seen": samples, "dictionaries": [
        {"normalized_loss": v, "avg_coef_norm": v / 2, "lam_converged": lam_ok} for v in values]}


def fake_state(samples, global_step, max_steps, history, monitor):
    trainer = SimpleNamespace(callbacks=[monitor], max_steps=max_steps, global_step=global_step)
    module = SimpleNamespace(samples_seen=torch.tensor(float(samples), dtype=torch.float64), history=history)
    return trainer, module


def test_bar_text_shows_samples_budget_loss_change_and_eta():
    from sparse_coding.progress import PassProgressBar

    monitor = ConvergenceMonitor(window=3, tol=0.001, stop=True, max_samples=1_000_000,
                                 max_steps_from="convergence.max_samples")
    history = [point(50_000 * (i + 1), [0.2 - 0.001 * i]) for i in range(6)]
    trainer, module = fake_state(250_000, 1000, 4000, history, monitor)
    bar = PassProgressBar()
    bar._start = (100.0, 50_000.0)  # 200,000 samples in the last 20 s: 10,000 a second
    text = bar.budget_status(trainer, module, now=120.0)
    assert text["samples"] == "250k/1M (25%)"
    assert text["held-out"] == "0.195"
    change = relative_change(history, 3)
    assert text["change"] == f"{change:.2g}/tol 0.001"
    assert text["eta"] == "1:15"  # 750,000 samples left at 10,000 a second
    line = " ".join(f"{k}: {v}" for k, v in text.items())
    assert "250k/1M" in line and "tol 0.001" in line

    # before two windows of evaluations: how many there are of how many are needed
    trainer, module = fake_state(100_000, 400, 4000, history[:2], monitor)
    assert bar.budget_status(trainer, module, now=120.0)["change"] == "2/6 evals (tol 0.001)"

    # trainer.max_steps binds: the budget in samples from the share of steps done
    steps_monitor = ConvergenceMonitor(window=3, tol=0.01, stop=True, max_steps_from="trainer.max_steps")
    trainer, module = fake_state(25_600, 100, 400, [], steps_monitor)
    text = bar.budget_status(trainer, module, now=120.0)
    assert text["samples"] == "25.6k/102k (25%)" and "held-out" not in text

    # open-ended: no budget, no ETA
    open_monitor = ConvergenceMonitor(window=3, tol=0.01, stop=True)
    trainer, module = fake_state(1_234, 50, -1, [], open_monitor)
    text = bar.budget_status(trainer, module, now=120.0)
    assert text["samples"] == "1,234 (open-ended)" and "eta" not in text
