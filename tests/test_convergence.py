"""Training until the measurement converges (sparse_coding.convergence, docs/method.md): the stopping rule and the
relative change it reads, the fixed protocol, budgets in samples (short batches counted) and the advice when a
budget ends an unconverged run. (Scale invariance: tests/integration/test_train.py; auto-λ's fixed point:
tests/test_module.py.)"""

import json
import math

import numpy as np
import pytest

from sparse_coding.convergence import has_converged, relative_change, steps_for_samples, unconverged_advice
from tests.helpers import import_cache, train

SMALL = ["data=sparse_linear", "data.dim=16", "data.active=4", "data.n=2048", "data.n_val=1024",
         "data.batch_size=256", "dictionary.mult=4"]


def point(samples, values, lam_ok=True):
    return {"samples_seen": samples, "dictionaries": [
        {"normalized_loss": v, "avg_coef_norm": v / 2, "lam_converged": lam_ok} for v in values]}


def test_has_converged_rule():
    flat = [point(i, [10.0]) for i in range(6)]
    assert has_converged(flat, window=3, tol=0.01)
    assert not has_converged(flat[:5], window=3, tol=0.01)  # two windows are needed
    drifting = [point(i, [10.6 - 0.1 * i]) for i in range(6)]  # window means 10.5 and 10.2: 3 %
    assert not has_converged(drifting, window=3, tol=0.01)
    assert has_converged(drifting, window=3, tol=0.05)
    noisy = [point(i, [18.0 + (0.1 if i % 2 else -0.1)]) for i in range(6)]  # 1.1 % swings, no drift
    assert has_converged(noisy, window=2, tol=0.01)
    assert not has_converged([point(i, [10.0], lam_ok=False) for i in range(6)], window=3, tol=0.01)
    bank = [point(i, [10.0, 5.0 + 0.2 * i]) for i in range(6)]  # the second dictionary still moves
    assert not has_converged(bank, window=3, tol=0.01)
    assert not has_converged([point(i, [math.nan]) for i in range(6)], window=3, tol=0.01)


def test_default_run_converges_and_reports(tmp_path):
    result = train(tmp_path, SMALL)
    assert result["converged"] is True and result["stopped_by"] == "converged"
    history = result["history"]
    assert len(history) >= 6
    assert [h["samples_seen"] for h in history] == sorted({h["samples_seen"] for h in history})
    for key in ("normalized_loss", "avg_coef_norm"):
        values = [h["dictionaries"][0][key] for h in history[-6:]]
        assert abs(sum(values[3:]) - sum(values[:3])) / 3 <= 0.01 * sum(values[3:]) / 3
    assert result["lam_converged"]
    assert result["samples_seen"] == result["optimizer_steps"] * 256
    timing = result["timing"]
    assert 0 < timing["eval_seconds"] < timing["fit_seconds"] and timing["samples_per_second"] > 0
    assert result["normalized_loss_se"] > 0 and result["avg_coef_norm_se"] > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("converged", "samples_seen", "optimizer_steps", "history", "timing", "normalized_loss_se"):
        assert key in saved
    assert (tmp_path / "plots" / "convergence.png").stat().st_size > 0


def test_fixed_protocol_is_exact_and_evaluation_does_not_change_training(tmp_path):
    """convergence.stop=false + trainer.max_epochs=N trains exactly N epochs, whatever the evaluation cadence."""
    fixed = SMALL + ["convergence.stop=false", "trainer.max_epochs=3"]
    a = train(tmp_path / "a", fixed + ["convergence.eval_every=512"])
    b = train(tmp_path / "b", fixed + ["convergence.eval_every=100000"])
    assert a["samples_seen"] == b["samples_seen"] == 3 * 2048
    assert a["optimizer_steps"] == 3 * 8
    assert a["stopped_by"] == "trainer.max_epochs"
    assert len(a["history"]) > len(b["history"])
    for key in ("normalized_loss", "avg_coef_norm", "l0", "lam", "fvu"):
        assert a[key] == b[key], key  # bit-identical: evaluating never touches Phi, lambda or the data order


def test_budget_ends_an_unconverged_run_with_advice(tmp_path, capsys):
    result = train(tmp_path, SMALL + ["convergence.max_samples=768"])
    assert result["converged"] is False and result["stopped_by"] == "convergence.max_samples"
    assert result["samples_seen"] == 768
    out = capsys.readouterr().out
    assert "NOT converged" in out and "convergence.max_samples" in out
    assert "raise convergence.max_samples" in unconverged_advice(result)


def test_relative_change_of_window_means():
    flat = [point(i, [10.0]) for i in range(6)]
    assert relative_change(flat, window=3) == 0.0
    assert relative_change(flat[:5], window=3) is None  # two windows are needed
    assert relative_change([], window=1) is None
    drifting = [point(i, [10.6 - 0.1 * i]) for i in range(6)]  # window means 10.5 then 10.2
    assert relative_change(drifting, window=3) == pytest.approx(0.3 / 10.2)
    # the largest over the dictionaries of a grid: the second one moves 20 % (12.5 -> 10)
    grid = [point(i, [10.0, 12.5]) for i in range(2)] + [point(i, [10.0, 10.0]) for i in range(2, 4)]
    assert relative_change(grid, window=2) == pytest.approx(0.25)
    # only the last 2 x window evaluations count
    assert relative_change([point(0, [99.0])] + flat, window=3) == 0.0
    bad = flat[:5] + [point(5, [math.nan])]
    assert relative_change(bad, window=3) == math.inf


def test_relative_change_agrees_with_has_converged():
    for history in ([point(i, [10.6 - 0.1 * i]) for i in range(6)], [point(i, [10.0 + 0.001 * i]) for i in range(6)]):
        change = relative_change(history, window=3)
        for tol in (0.001, 0.01, 0.05):
            assert has_converged(history, window=3, tol=tol) == (change <= tol)


def test_a_sample_budget_stops_at_the_budget_and_says_so(tmp_path):
    path = import_cache(tmp_path / "c", np.random.default_rng(0).standard_normal((3000, 8)).astype(np.float32), 1000)
    result = train(tmp_path / "run", ["data=cache", f"data.path={path}", "data.num_workers=64", "dictionary.mult=2",
                                      "convergence.tol=1e-9", "convergence.max_samples=7000"])
    assert result["stopped_by"] == "convergence.max_samples"
    assert 7000 <= result["samples_seen"] < 7000 + 1024  # short batches counted: the budget is met, not undershot


def test_steps_for_samples_counts_short_batches():
    assert steps_for_samples(2048, [1024, 1024]) == 2
    assert steps_for_samples(2049, [1024, 1024]) == 3
    assert steps_for_samples(3000, [1024, 652]) == 4  # 1676 an epoch: 1024 + 652 + 1024 + (<= 652)
    assert steps_for_samples(0, [10]) == 0
