"""The massive-activation analysis (sparse_coding.experiments.massive): an outlier position and dimension found in
made-up rows, and the analysis of a real (tiny GPT-2) cache. (The remedies: tests/data/test_preprocess.py.)"""

import numpy as np
import pytest

from sparse_coding.cache import store
from sparse_coding.experiments.massive import analyse_cache, analyse_layer, format_report


def test_massive_analysis_finds_an_outlier_position_and_dimension():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((640, 16))
    pos = np.arange(640) % 32
    x[pos == 0, 5] += 100.0  # an attention-sink-like first token, massive in dimension 5
    r = analyse_layer(x, pos)
    assert r["first_over_rest"] > 20 and r["first_variance_share"] > 0.9 and r["dims"]["dims"][0] == 5
    assert r["drop_first"]["top_centred_share"] < 0.5  # without position 0 no dimension dominates


def test_massive_analysis_on_the_gpt2_path(tiny_gpt2_cache):
    _, path = tiny_gpt2_cache
    res = analyse_cache(path)
    m = store.read_manifest(path)
    assert set(res["layers"]) == set(m["shards"]) and res["keep_positions_first"] == [0]
    assert all(r["rows"] == m["n_rows"] and r["first_row_share"] == pytest.approx(1 / 16) for r in res["layers"].values())
    assert "first pos" in format_report(res)
