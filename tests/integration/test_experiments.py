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
    """minilm layers from a tiny cache, then the functional check: SmolLM2 on two hidden states (next-token loss),
    MiniLM on the one of them its curve trained (sentence embedding)."""
    extra = [f"cache_dir={tmp_path / 'cache'}", "corpus.max_tokens=512", "dictionary.mult=1", "trainer.max_epochs=1",
             "trainer.limit_train_batches=1", "solver.max_steps=32"]
    rows = runner.run_experiment("layers", "quick", tmp_path / "runs", extra=extra, limit=2, log=lambda s: None)
    assert [(r["model"], r["layer"]) for r in rows] == [("minilm", 0), ("minilm", 1)]
    for k in (0, 30):
        p = Point("layers", "layers", ["model=smollm2", f"layer={k}", *extra], 0, {"model": "smollm2", "layer": k})
        runner.run_point(p, "quick", tmp_path / "runs")
    logged = []
    # two held-out contexts: every path of the check, each forward pass on half the tokens of the quick scale's four
    frows = extras.functional_check("quick", tmp_path / "runs", extra=extra, layers=[0, 30], log=logged.append,
                                    contexts=2)
    assert [(r["model"], r["layer"]) for r in frows] == [("smollm2", 0), ("smollm2", 30), ("minilm", 0)]
    assert any("minilm layer 30" in s and "skipped" in s for s in logged)  # not a trained point: said, not a crash
    for r in frows:
        assert r["reconstruction_loss"] > 0 and r["fraction_recovered"] == r["fraction_recovered"]
        assert r["zero_ablation_loss"] > r["clean_loss"] and r["mean_ablation_loss"] > r["clean_loss"]
    smol, mini = frows[0], frows[2]
    assert smol["clean_loss"] > 0 and smol["retrieval_top1"] is None and "nats" in smol["measure"]
    # the clean encoder's embedding is its own reference: distance 0; retrieval is a share of the 2 contexts
    assert 0 <= mini["clean_loss"] <= 1e-6 and mini["zero_ablation_loss"] <= 2
    assert mini["retrieval_top1"] in (0, 0.5, 1) and mini["hook"] == "BertEmbeddings"
    assert smol["replaced_share"] == mini["replaced_share"] == 1 and smol["preprocess"] == "raw"
    # a remedy dictionary replaces only the rows it describes: position 0 (and any sink row) stays clean
    (remedy,) = [p for p in runner.points_of("layers_remedy", "quick", extra)
                 if p.x["model"] == "smollm2" and p.x["layer"] == 0 and p.seed == 0]
    runner.run_point(remedy, "quick", tmp_path / "runs")
    (rrow,) = extras.functional_check("quick", tmp_path / "runs", models_to_check=("smollm2",), extra=extra,
                                      layers=[0], log=lambda s: None, curve="layers_remedy", contexts=2)
    assert rrow["preprocess"] == "remedy" and rrow["run"] == remedy.key("quick")
    assert 0.5 < rrow["replaced_share"] <= 1 - 1 / 128 and rrow["clean_loss"] == smol["clean_loss"]
