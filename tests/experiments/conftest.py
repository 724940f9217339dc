"""The experiments' shared fixture: tiny runs of the synthetic experiments, made once for the session."""

import pytest

from sparse_coding.experiments import runner
from tests.helpers import TINY_POINT as TINY


@pytest.fixture(scope="session")
def tiny_results(tmp_path_factory):
    """(runs folder, results folder, rows by experiment): two tiny points each of the synthetic experiments (four
    of the controls) and the synthetic sensitivity bank, their CSV tables written."""
    root = tmp_path_factory.mktemp("runs")
    results = tmp_path_factory.mktemp("results")
    out = {}
    for name in ("sparsity", "controls", "dict_size"):
        limit = {"controls": 4}.get(name, 2)
        rows = runner.run_experiment(name, "quick", root, extra=TINY, limit=limit, log=lambda s: None)
        runner.write_csv(rows, results / f"{name}.csv")
        out[name] = rows
    # the synthetic sensitivity case (the real one needs a model cache)
    point = [p for p in runner.points_of("sensitivity", "quick", TINY) if p.family == "synthetic"][0]
    point = runner.resolve(point, "quick", root)
    out["sensitivity"] = runner.rows_of(point, "quick", runner.run_point(point, "quick", root))
    runner.write_csv(out["sensitivity"], results / "sensitivity.csv")
    return root, results, out
