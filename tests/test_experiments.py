"""Small-scale versions of every experiment: the pipeline (runner -> CSV -> figures -> report) runs end to end.

Points are shrunk with extra overrides (tiny d, few rows, one epoch); the numbers are not checked
against the paper here, only that each stage produces what the next one reads.
"""

import json

import pytest

from sparse_coding.experiments import report, runner
from sparse_coding.experiments.__main__ import main
from sparse_coding.experiments.grid import EXPERIMENTS, Point

TINY = ["data.dim=8", "data.n=256", "data.n_val=128", "data.batch_size=128", "trainer.max_epochs=1",
        "solver.max_steps=32"]


def test_grid_covers_the_issue():
    quick = {name: fn("quick") for name, fn in EXPERIMENTS.items()}
    assert sorted({p.x["a"] for p in quick["sparsity"]}) == [2, 4, 8, 16, 20, 32, 64, 128, 256]
    assert sorted({p.x["a"] for p in EXPERIMENTS["sparsity"]("full")}) == [2, 4, 8, 16, 20, 32, 64, 128, 512]
    assert {p.x["data"] for p in quick["controls"]} == {"sparse_linear", "gaussian", "rademacher", "heavy_tailed",
                                                        "sparse_nonlinear"}
    layers = {(p.x["model"], p.x["layer"]) for p in quick["layers"]}
    assert len(layers) == 7 + 11  # quick: every third SmolLM2 hidden state
    assert len({(p.x["model"], p.x["layer"]) for p in EXPERIMENTS["layers"]("full")}) == 7 + 31
    for name, pts in quick.items():  # every point has 3 seeds
        seeds = {}
        for p in pts:
            seeds.setdefault(json.dumps(p.x, sort_keys=True), set()).add(p.seed)
        assert all(len(s) >= 3 for s in seeds.values()), name
    # identical overrides share a run directory: Fig. 1a's a=20 is Fig. 1b's a=20
    a20 = [p for p in quick["sparsity"] if p.x["a"] == 20 and p.seed == 0][0]
    b20 = [p for p in quick["controls"] if p.x.get("a") == 20 and p.seed == 0][0]
    assert a20.key("quick") == b20.key("quick")
    assert a20.key("quick") != a20.key("full")


def test_point_overrides_compose_and_validate():
    from sparse_coding.config import validate

    for name in EXPERIMENTS:
        for scale in ("quick", "full"):
            p = EXPERIMENTS[name](scale)[0]
            cfg = runner.compose(p.all_overrides(scale))
            validate(cfg)
            assert cfg.seed == cfg.data.seed == p.seed


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """Two tiny points each of the synthetic experiments, the sensitivity bank and the solver gap."""
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


def test_runner_rows_and_resume(tiny_results):
    root, results, out = tiny_results
    rows = out["sparsity"]
    assert [r["a"] for r in rows] == [2, 4]
    for r in rows:
        assert r["dim"] == 8 and r["lam_mode"] == "auto" and r["lam"] > 0 and r["ground_truth"] == r["a"] / 2
        assert r["normalized_loss"] > 0 and r["seconds"] > 0
    # a finished point is not rerun: its metrics.json is left untouched
    point = runner.points_of("sparsity", "quick", TINY, 1)[0]
    metrics = runner.run_dir(root, "quick", point) / "metrics.json"
    before = metrics.stat().st_mtime_ns
    again = runner.run_experiment("sparsity", "quick", root, extra=TINY, limit=1, log=lambda s: None)
    assert metrics.stat().st_mtime_ns == before and again[0]["normalized_loss"] == rows[0]["normalized_loss"]
    assert runner.read_csv(results / "sparsity.csv")[0]["normalized_loss"] == pytest.approx(rows[0]["normalized_loss"], rel=1e-5)


def test_bank_experiments(tiny_results):
    _, _, out = tiny_results
    assert sorted(r["dict_mult"] for r in out["dict_size"]) == [2, 2, 4, 4, 8, 8, 16, 16]
    sens = out["sensitivity"]
    assert len(sens) == 3 and all(r["lam_mode"] == "fixed" for r in sens)
    ratios = sorted(r["lam"] / r["auto_lam"] for r in sens)
    assert ratios[0] == pytest.approx(0.316, rel=1e-3) and ratios[-1] == pytest.approx(3.16, rel=1e-3)


def test_solver_gap_on_trained_dictionary(tiny_results):
    from sparse_coding.experiments import extras

    root, _, _ = tiny_results
    point = runner.points_of("sparsity", "quick", TINY, 1)[0]
    config, dictionaries = extras.load_dictionaries(runner.run_dir(root, "quick", point))
    x = extras.held_out_rows(config, 32)
    assert x.shape == (32, 8)
    label, phi, lam, mult = dictionaries[0]
    r = extras.lasso_gap(x, phi, lam, 256)
    # the exact lasso is the optimum of the same objective: the greedy one cannot beat it
    assert r["gap_ratio"] >= 1 - 1e-6
    assert r["kkt_violation_over_lam"] < 1e-2  # the alpha = lam / 2 mapping is the right scaling


def test_figures_and_report(tiny_results, tmp_path):
    _, results, _ = tiny_results
    for name in ("sparsity", "controls", "dict_size", "sensitivity"):
        paths = report.plot_experiment(name, results)
        assert paths and all(p.stat().st_size > 10_000 for p in paths), name
    text = report.write_report(results, tmp_path / "RESULTS.md").read_text()
    for heading in ("Metric vs true sparsity", "Sparse vs controls", "Dictionary-size", "Sensitivity"):
        assert heading in text
    assert "sparsity.png)" in text and "not run" in text  # missing experiments are said to be missing


def test_cli_runs_a_tiny_experiment(tmp_path):
    rc = main(["run", "sparsity", "--scale", "quick", "--root", str(tmp_path / "runs"), "--results",
               str(tmp_path / "res"), "--limit", "1", "--no-wandb", *[f"--set={o}" for o in TINY]])
    assert rc == 0
    assert runner.read_csv(tmp_path / "res" / "sparsity.csv")[0]["a"] == 2
    assert (tmp_path / "res" / "sparsity.png").is_file()
    assert json.loads((tmp_path / "res" / "timing.json").read_text())["sparsity"]["compute_seconds"] > 0


@pytest.mark.slow
def test_layers_and_functional_check_on_real_models(tmp_path):
    """minilm layers from a tiny cache, then the SmolLM2 functional check on two hidden states."""
    from sparse_coding.experiments import extras

    extra = [f"cache_dir={tmp_path / 'cache'}", "corpus.max_tokens=512", "dictionary.mult=1", "trainer.max_epochs=1",
             "trainer.limit_train_batches=1", "solver.max_steps=32"]
    rows = runner.run_experiment("layers", "quick", tmp_path / "runs", extra=extra, limit=2, log=lambda s: None)
    assert [(r["model"], r["layer"]) for r in rows] == [("minilm", 0), ("minilm", 1)]
    for k in (0, 30):
        p = Point("layers", "layers", ["model=smollm2", f"layer={k}", *extra], 0, {"model": "smollm2", "layer": k})
        runner.run_point(p, "quick", tmp_path / "runs")
    frows = extras.functional_check("quick", tmp_path / "runs", extra=extra, layers=[0, 30], log=lambda s: None)
    assert [r["layer"] for r in frows] == [0, 30]
    for r in frows:
        assert r["zero_ablation_loss"] > r["clean_loss"] > 0
        assert r["reconstruction_loss"] > 0 and r["fraction_recovered"] == r["fraction_recovered"]
