"""Issue 6, data: NaN/Inf, all-zero rows, constant columns, a single sample, d = 1.

Each case gives a clear error (DataError, one line) or a documented, tested behaviour (docs/reliability.md). The
unit tests of the same hazards are beside their modules: the fuzzed solver (tests/test_solver.py), finite
generated data (tests/data/test_synthetic.py), caches with nothing to code or a single row
(tests/data/test_cache_datamodule.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparse_coding.data.cache_datamodule import CacheDataModule
from sparse_coding.errors import DataError
from tests.helpers import QUIET, error_lines, import_cache, train
from tests.reliability.helpers import run_py


def saved_phi(out):
    from safetensors.torch import load_file

    return next(iter(load_file(str(out / "dictionary.safetensors")).values()))


def assert_good_phi(phi):
    assert torch.isfinite(phi).all()
    assert (phi.norm(dim=0) - 1).abs().max() < 1e-4


# --------------------------------------------------------------------------------------------
# Caches with bad or degenerate rows


def test_nan_and_inf_in_a_cache_fail_with_the_file_and_row(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.standard_normal((300, 8)).astype(np.float32)
    arr[70, 3], arr[150, 0] = np.nan, np.inf
    path = import_cache(tmp_path / "c", arr)
    with pytest.raises(DataError, match=r"shard_00001\.npy: 2 rows hold NaN/Inf \(first: row 6\).*skip_nonfinite"):
        CacheDataModule(path)
    proc = run_py(["train.py", "data=cache", f"data.path={path}", *QUIET, f"hydra.run.dir={tmp_path / 'run'}"])
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and "NaN/Inf" in lines[0], proc.stderr


def test_zero_rows_constant_columns_and_skipped_nan_rows_train_to_a_finite_phi(tmp_path):
    """Documented behaviour: zero rows get alpha = 0; a constant column is removed by centring;
    with data.skip_nonfinite=true NaN/Inf rows are dropped and counted."""
    rng = np.random.default_rng(1)
    arr = rng.standard_normal((600, 8)).astype(np.float32)
    arr[:50] = 0  # all-zero rows
    arr[:, 5] = 3.0  # a constant column
    arr[100, 1] = np.nan
    arr[200, 2] = -np.inf
    path = import_cache(tmp_path / "c", arr)
    result = train(tmp_path / "run", ["data=cache", f"data.path={path}", "data.skip_nonfinite=true",
                                      "data.batch_size=128", "trainer.max_epochs=2", "dictionary.mult=2"])
    assert result["data"]["nonfinite_rows_skipped"] == 2
    assert result["data"]["train_rows"] + result["data"]["val_rows"] == 598
    assert math.isfinite(result["normalized_loss"]) and math.isfinite(result["loss"])
    phi = saved_phi(tmp_path / "run")
    assert_good_phi(phi)


# --------------------------------------------------------------------------------------------
# Tiny synthetic problems


def test_a_single_sample_trains(tmp_path):
    """n = 1 training and n_val = 2 held-out samples (the fewest fvu can be measured on): a finite, unit-norm Phi."""
    result = train(tmp_path, ["data=gaussian", "data.dim=4", "data.n=1", "data.n_val=2", "data.batch_size=1",
                              "trainer.max_epochs=2", "dictionary.mult=2"])
    assert_good_phi(saved_phi(tmp_path))
    assert math.isfinite(result["loss"]) and result["l0"] >= 0


def test_dimension_one_trains(tmp_path):
    """d = 1: the dictionary's columns are +-1; the run finishes with finite metrics."""
    result = train(tmp_path, ["data=sparse_linear", "data.dim=1", "data.active=1", "data.n=256", "data.n_val=64",
                              "data.batch_size=64", "trainer.max_epochs=2", "dictionary.mult=4"])
    phi = saved_phi(tmp_path)
    assert phi.shape == (1, 4)
    assert_good_phi(phi)
    assert math.isfinite(result["normalized_loss"])
