"""The experiments end to end: the CLI (`python -m sparse_coding.experiments run`) from points to table, figure and
timing; the layers experiment and the functional check on real models (slow)."""

import json

import pytest

from sparse_coding.experiments import extras, runner
from sparse_coding.experiments.__main__ import main
from sparse_coding.experiments.grid import Point
from tests.helpers import TINY_POINT as TINY


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
