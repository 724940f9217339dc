"""The Python API (sparse_coding.api): `measure(overrides)` runs and measures like `train.py` and raises a bad
config as one ConfigError line; the loaded dictionary reproduces its metrics.json."""

from __future__ import annotations

import json

import pytest

import sparse_coding
from sparse_coding import SparseDictionary
from sparse_coding.api import measure
from sparse_coding.data.synthetic_datamodule import FreshSyntheticDataModule
from sparse_coding.errors import ConfigError
from tests.helpers import assert_same_metrics

TINY = ["data=sparse_linear", "data.dim=8", "data.active=3", "data.n=256", "data.n_val=96", "data.batch_size=64",
        "trainer.max_epochs=1", "dictionary.mult=2", "trainer.enable_progress_bar=false"]


def test_measure_raises_one_line_config_errors():
    for bad in (["dictionary.mutl=4"], ["data.dim=abc"], [1, 2], "data.dim=3"):
        with pytest.raises(ConfigError) as e:
            measure(bad)
        assert "\n" not in str(e.value) and str(e.value).strip(), bad


def test_measure_api_and_the_loaded_dictionary_reproduce_metrics_json(tmp_path):
    out = tmp_path / "run"
    result = sparse_coding.measure([*TINY, "logger=none", f"out_dir={out}"])
    written = json.loads((out / "metrics.json").read_text())
    assert result["normalized_loss"] == written["normalized_loss"] > 0
    d = SparseDictionary.load(out)
    assert (d.dim, d.dict_size, d.lam, d.mean) == (8, 16, written["lam"], None)
    data = FreshSyntheticDataModule("sparse_linear", 8, 256, 96, seed=0, active=3, batch_size=64)  # data.fresh=true
    val_x = data.val_x
    assert_same_metrics(d.measure(val_x), written)
    in_sample = d.measure(data.in_sample_x)  # and the in-sample numbers, on the training rows metrics.json used
    assert {k: in_sample[k] for k in written["in_sample"]} == written["in_sample"]
    alpha = d.encode(val_x)
    assert alpha.shape == (96, 16) and (alpha >= 0).all()
    assert d.decode(alpha).shape == (96, 8)
    with pytest.raises(ConfigError, match="data.dim"):
        sparse_coding.measure(["data.dim=0"])  # a bad config raises (one line), it does not exit
