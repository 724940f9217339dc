"""The extra analyses (sparse_coding.experiments.extras): the greedy solver's gap to the exact lasso on a trained
dictionary, kept per run and recomputed only when its file is damaged."""

import json

import pytest

from sparse_coding.experiments import extras, runner
from tests.helpers import TINY_POINT as TINY


def test_solver_gap_on_trained_dictionary(tiny_results):
    root, _, _ = tiny_results
    point = runner.points_of("sparsity", "quick", TINY, 1)[0]
    config, dictionaries = extras.load_dictionaries(runner.run_dir(root, "quick", point))
    x = extras.held_out_rows(config, 32)
    assert x.shape == (32, 8)
    label, phi, lam, mult = dictionaries[0]
    r = extras.lasso_gap(x, phi, lam, 256)
    # the exact lasso is the optimum of the same objective: the greedy one cannot beat it
    assert r["gap_ratio"] >= 1 - 2 * extras.KKT_TOL  # up to what the KKT certificate allows
    assert r["kkt_violation_over_lam"] <= extras.KKT_TOL and r["lasso_converged"]  # converged, right scaling
    # the metrics under both codes, on the same rows, Phi and lam
    for k in ("normalized_loss", "avg_coef_norm", "l0", "fvu"):
        assert r[f"greedy_{k}"] > 0 and r[f"lasso_{k}"] > 0
    g = extras.code_metrics(x, phi, extras.solve(x, phi, lam, 256).alpha, lam)
    assert g["normalized_loss"] == pytest.approx(r["greedy_normalized_loss"])
    assert r["lasso_objective"] == pytest.approx(extras.code_metrics(x, phi, extras.exact_lasso(x, phi, lam)[0], lam)["loss"])


def test_solver_gap_rows_are_kept_per_run(tiny_results):
    root, _, _ = tiny_results
    logged = []
    rows = extras.solver_gap("quick", root, log=logged.append, extra=TINY)
    assert rows and logged and all(r["lasso_converged"] and r["gap_ratio"] >= 1 - 2 * extras.KKT_TOL for r in rows)
    assert all(isinstance(r["converged"], bool) for r in rows)  # the dictionary's own convergence, beside the lasso's
    assert {r["experiment"] for r in rows} >= {"sparsity", "controls", "dict_size"}
    assert all((root / "quick" / "runs" / r["run"] / "solver_gap.json").is_file() for r in rows)
    again = extras.solver_gap("quick", root, log=logged.append, extra=TINY)  # read back, not recomputed
    assert again == rows and len(logged) == len({(r["run"], r["dict_mult"]) for r in rows})
    kept = root / "quick" / "runs" / rows[0]["run"] / "solver_gap.json"
    kept.write_text("{ cut short")  # a damaged file is recomputed, not a crash
    def timeless(rs):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rs]

    assert timeless(extras.solver_gap("quick", root, log=logged.append, extra=TINY)) == timeless(again)
    assert json.loads(kept.read_text())["rows"]
