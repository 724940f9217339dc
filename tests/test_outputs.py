"""A run's outputs (sparse_coding.outputs): metrics.json, the dictionary files and the plots written, each
independently of the others, as strict JSON (a non-finite number is null and named), where only a held-out
metric can fail the run."""

import json

import pytest
from safetensors.torch import load_file

from sparse_coding.errors import StorageError, TrainingError
from sparse_coding.outputs import is_in_sample_path, nonfinite_paths, write_outputs
from tests.helpers import one_line, train


def test_outputs_written(tmp_path):
    result = train(tmp_path, ["data=sparse_linear", "data.dim=16", "data.n=1024", "data.n_val=2048",
                              "data.batch_size=512", "trainer.max_epochs=1", "dictionary.mult=8", "solver.max_steps=128"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("normalized_loss", "avg_coef_norm", "l0", "loss", "fvu", "dead_fraction", "capped_fraction", "lam",
                "dim", "dict_size", "truth"):
        assert key in metrics, key
    assert metrics["dict_size"] == 8 * 16 and metrics["dim"] == 16
    assert metrics["truth"]["true_l0"] > 0
    assert metrics == json.loads(json.dumps(result))
    phi = load_file(str(tmp_path / "dictionary.safetensors"))["mult8_lamauto"]
    assert phi.shape == (16, 128)
    assert (phi.norm(dim=0) - 1).abs().max() < 1e-5
    assert json.loads((tmp_path / "dictionary.json").read_text())["dictionaries"][0]["lam"] == metrics["lam"]
    assert (tmp_path / "plots" / "metrics.png").stat().st_size > 0


def test_an_undefined_in_sample_error_is_written_as_null_without_failing_the_run():
    result = {"normalized_loss": 7.0, "in_sample": {"normalized_loss_se": float("nan")}, "generalization_gap_se": float("nan"),
              "dictionaries": [{"in_sample": {"l0": float("inf")}, "generalization_gap": float("nan"), "loss": float("nan")}]}
    paths = nonfinite_paths(result)
    assert [p for p in paths if not is_in_sample_path(p)] == ["dictionaries[0].loss"]  # only a held-out metric fails


def test_outputs_are_independent_and_never_hold_nonfinite_numbers(finished_run, tmp_path):
    cfg, _, module = finished_run
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "metrics.json").mkdir()  # metrics.json cannot be written
    with pytest.raises(StorageError, match="could not write metrics.json.*written: dictionary.safetensors") as e:
        write_outputs(blocked, cfg, module, {"normalized_loss": 1.0, "label": "x", "dim": 8})
    one_line(e.value)
    assert (blocked / "dictionary.safetensors").is_file()
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(TrainingError, match="fvu.*not finite"):
        write_outputs(bad, cfg, module, {"normalized_loss": 1.0, "fvu": float("inf"), "x": [float("nan")], "dim": 8})
    metrics = json.loads((bad / "metrics.json").read_text())  # strict JSON: no NaN/Infinity tokens
    assert metrics["fvu"] is None and metrics["not_finite"] == ["fvu", "x[0]"]
