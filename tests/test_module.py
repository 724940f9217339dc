"""The module (sparse_coding.module): a bank of dictionaries trained on shared batches equals each dictionary
trained alone, fixed λ, auto-λ's fixed point, and the history of evaluations carried through a resume."""

import csv
import json

import pytest
from safetensors.torch import load_file

from sparse_coding.data.synthetic_datamodule import SyntheticDataModule
from sparse_coding.solver import solve
from tests.helpers import train

SMALL = ["data=sparse_linear", "data.dim=16", "data.active=4", "data.n=2048", "data.n_val=1024", "data.batch_size=256",
         "dictionary.mult=4"]
METRICS = ("normalized_loss", "avg_coef_norm", "l0", "loss", "fvu", "lam", "dead_fraction", "capped_fraction")


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    out = tmp_path_factory.mktemp("bank")
    return out, train(out, [*SMALL, "trainer.max_epochs=3", "logger=csv", "dictionary.mult=[2,4]",
                            "dictionary.lam=[0.3,auto]"])


def test_bank_writes_one_entry_and_one_phi_per_dictionary(bank):
    out, result = bank
    labels = ["mult2_lam0.3", "mult2_lamauto", "mult4_lam0.3", "mult4_lamauto"]
    assert [e["label"] for e in result["dictionaries"]] == labels
    assert [(e["dict_mult"], e["lam_mode"]) for e in result["dictionaries"]] == [
        (2, "fixed"), (2, "auto"), (4, "fixed"), (4, "auto")]
    assert json.loads((out / "metrics.json").read_text())["dictionaries"] == result["dictionaries"]
    phis = load_file(str(out / "dictionary.safetensors"))
    assert {k: tuple(v.shape) for k, v in phis.items()} == {
        "mult2_lam0.3": (16, 32), "mult2_lamauto": (16, 32), "mult4_lam0.3": (16, 64), "mult4_lamauto": (16, 64)}
    header = next(csv.reader(open(next(out.glob("csv/*/metrics.csv")))))
    for label in labels:  # each dictionary logs under its own name
        assert f"val/normalized_loss/{label}" in header and f"train/loss/{label}" in header


@pytest.mark.parametrize("mult,lam", [(4, "0.3"), (2, "auto")])
def test_bank_member_equals_the_dictionary_trained_alone(bank, tmp_path, mult, lam):
    out, result = bank
    alone = train(tmp_path, [*SMALL, "trainer.max_epochs=3", f"dictionary.mult={mult}", f"dictionary.lam={lam}"])
    label = f"mult{mult}_lam{lam}"
    entry = next(e for e in result["dictionaries"] if e["label"] == label)
    for key in METRICS:
        assert entry[key] == pytest.approx(alone[key], rel=1e-6, abs=1e-9), key
    got = load_file(str(out / "dictionary.safetensors"))[label]
    want = load_file(str(tmp_path / "dictionary.safetensors"))[label]
    assert (got - want).abs().max() < 1e-6


def test_fixed_lambda(tmp_path):
    result = train(tmp_path, ["data=rademacher", "data.dim=16", "data.n=8192", "data.n_val=2048", "data.batch_size=512",
                              "trainer.max_epochs=1", "dictionary.mult=8", "solver.max_steps=128",
                              "dictionary.lam=0.5"])
    assert result["lam"] == 0.5 and result["lam_mode"] == "fixed"


def test_auto_lambda_is_the_fixed_point_of_a_tenth_of_mean_max(tmp_path):
    """After training, lambda = 0.1 * mean_i max(alpha_i) over the training data under the final Phi
    (to the auto-lambda tolerance): a different factor would fail this."""
    result = train(tmp_path, SMALL + ["dictionary.lam_tol=0.002", "convergence.tol=0.002"])
    assert result["lam_converged"]
    phi = load_file(str(tmp_path / "dictionary.safetensors"))["mult4_lamauto"]
    data = SyntheticDataModule("sparse_linear", 16, 2048, 1024, seed=0, active=4)
    codes = solve(data.train_x, phi, result["lam"], tol=1e-2)
    implied = 0.1 * float(codes.row_max().double().mean())
    assert implied == pytest.approx(result["lam"], rel=0.02)  # a factor of 0.2 would give implied = lam / 2


def test_history_survives_resume(tmp_path):
    first = train(tmp_path, SMALL + ["convergence.stop=false", "trainer.max_epochs=2", "convergence.eval_every=512"])
    resumed = train(tmp_path, SMALL + ["convergence.stop=false", "trainer.max_epochs=4", "convergence.eval_every=512",
                                       "ckpt_path=last"])
    seen = [h["samples_seen"] for h in resumed["history"]]
    assert seen[: len(first["history"])] == [h["samples_seen"] for h in first["history"]]
    assert resumed["samples_seen"] == 4 * 2048
