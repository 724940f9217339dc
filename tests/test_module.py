"""A bank of dictionaries trained on shared batches equals the same dictionaries trained alone."""

import csv
import json

import pytest
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from conftest import ROOT
from sparse_coding.config.schema import register_configs
from sparse_coding.run import run

register_configs()

TINY = ["trainer.enable_progress_bar=false", "data=sparse_linear", "data.dim=16", "data.active=4", "data.n=2048",
        "data.n_val=1024", "data.batch_size=256", "trainer.max_epochs=3"]
METRICS = ("normalized_loss", "avg_coef_norm", "l0", "loss", "fvu", "lam", "dead_fraction", "capped_fraction")


def train(out, overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=TINY + overrides)
    return run(cfg, out)


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    out = tmp_path_factory.mktemp("bank")
    return out, train(out, ["logger=csv", "dictionary.mult=[2,4]", "dictionary.lam=[0.3,auto]"])


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
    alone = train(tmp_path, ["logger=none", f"dictionary.mult={mult}", f"dictionary.lam={lam}"])
    label = f"mult{mult}_lam{lam}"
    entry = next(e for e in result["dictionaries"] if e["label"] == label)
    for key in METRICS:
        assert entry[key] == pytest.approx(alone[key], rel=1e-6, abs=1e-9), key
    got = load_file(str(out / "dictionary.safetensors"))[label]
    want = load_file(str(tmp_path / "dictionary.safetensors"))[label]
    assert (got - want).abs().max() < 1e-6
