"""Issue 6, data: NaN/Inf, all-zero rows, constant columns, a single sample, d = 1, and a fuzzed solver.

Each case gives a clear error (DataError, one line) or a documented, tested behaviour
(docs/reliability.md). The solver is fuzzed with hypothesis: random shapes, scales 1e-6..1e6,
duplicate (and opposite) dictionary columns, zero rows; it must return finite, non-negative
coefficients, never raise the objective above ||x||^2 and stop within max_steps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reliability.helpers import error_lines, import_cache, run_py
from sparse_coding.data.cache_datamodule import CacheDataModule
from sparse_coding.data.synthetic import GENERATORS, generate
from sparse_coding.errors import DataError
from sparse_coding.solver import objective, solve, solve_reference

SOLVER_EXAMPLES = 300
GENERATOR_EXAMPLES = 40
QUIET = ["logger=none", "trainer.enable_progress_bar=false"]


def train(tmp_path, overrides):
    from sparse_coding.config.checks import validate
    from sparse_coding.config.compose import compose_config
    from sparse_coding.run import run

    cfg = compose_config(QUIET + overrides)
    validate(cfg)
    return run(cfg, tmp_path)


def saved_phi(out):
    from safetensors.torch import load_file

    return next(iter(load_file(str(out / "dictionary.safetensors")).values()))


def assert_good_phi(phi):
    assert torch.isfinite(phi).all()
    assert (phi.norm(dim=0) - 1).abs().max() < 1e-4


# --------------------------------------------------------------------------------------------
# The solver: fuzzed


@settings(max_examples=SOLVER_EXAMPLES, deadline=None, derandomize=True)
@given(n=st.integers(1, 8), d=st.integers(1, 12), m=st.integers(1, 24), log_scale=st.integers(-6, 6),
       lam_mode=st.sampled_from(["relative", "absolute"]), log_lam=st.floats(-3, 1), duplicates=st.integers(0, 4),
       zero_rows=st.integers(0, 3), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
@pytest.mark.timeout(300)
def test_solver_is_finite_and_terminates_on_any_finite_input(n, d, m, log_scale, lam_mode, log_lam, duplicates,
                                                             zero_rows, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0**log_scale
    x = (torch.randn(n, d, generator=gen, dtype=torch.float64) * scale).to(dtype)
    x[: min(zero_rows, n)] = 0
    phi = torch.randn(d, m, generator=gen, dtype=torch.float64)
    for j in range(min(duplicates, m - 1)):  # exact copies and opposite copies of other columns
        phi[:, m - 1 - j] = phi[:, j] * (1 if j % 2 == 0 else -1)
    phi = (phi / phi.norm(dim=0, keepdim=True)).to(dtype)
    lam = 10.0**log_lam * (scale if lam_mode == "relative" else 1.0)
    max_steps = 64
    result = solve(x, phi, lam, max_steps)
    a = result.alpha
    assert a.shape == (n, m) and torch.isfinite(a).all() and (a >= 0).all()
    assert (result.steps <= max_steps).all() and (result.steps >= 0).all()
    assert (a[: min(zero_rows, n)] == 0).all()  # a zero row gets no coefficients
    # descent: never worse than alpha = 0 (objective ||x||^2), up to rounding
    x64, phi64, a64 = x.double(), phi.double(), a.double()
    start = x64.pow(2).sum(1)
    tol = 1e-4 * start + 1e-12 * scale**2 + (1e-3 if dtype == torch.float32 else 1e-9) * lam * a64.sum(1)
    assert (objective(x64, phi64, a64, lam) <= start + tol).all()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(n=st.integers(1, 4), d=st.integers(1, 6), m=st.integers(1, 10), log_scale=st.integers(-6, 6),
       seed=st.integers(0, 2**16))
def test_fast_and_reference_solvers_agree_across_scales(n, d, m, log_scale, seed):
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0**log_scale
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * scale
    phi = torch.randn(d, m, generator=gen, dtype=torch.float64)
    phi /= phi.norm(dim=0, keepdim=True)
    lam = 0.1 * scale
    fast, ref = solve(x, phi, lam, 32), solve_reference(x, phi, lam, 32)
    obj_fast, obj_ref = objective(x, phi, fast.alpha, lam), objective(x, phi, ref.alpha, lam)
    assert torch.allclose(obj_fast, obj_ref, rtol=1e-6, atol=1e-9 * scale**2)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_solver_rejects_nonfinite_input_with_a_clear_error(bad):
    x = torch.randn(3, 4)
    phi = torch.nn.functional.normalize(torch.randn(4, 8), dim=0)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="must be finite"):
        solve(x, phi, 0.1)
    with pytest.raises(ValueError, match="lam must be a finite number > 0"):
        solve(torch.randn(3, 4), phi, bad)


# --------------------------------------------------------------------------------------------
# Generated data


@settings(max_examples=GENERATOR_EXAMPLES, deadline=None, derandomize=True)
@given(name=st.sampled_from(GENERATORS), dim=st.integers(1, 16), n=st.integers(1, 64), seed=st.integers(0, 2**32 - 1),
       active=st.floats(0.01, 4.0))
def test_generators_give_finite_data(name, dim, n, seed, active):
    try:
        data = generate(name, dim, n, seed, active=min(active, 4 * dim))
    except DataError as e:  # documented: all-zero samples (one centred sample, nothing active) are refused
        assert "generated samples are zero" in str(e) and "\n" not in str(e)
        return
    assert data.x.shape == (n, dim) and torch.isfinite(data.x).all() and data.x.any()
    for scale in (1e-6, 1e6):  # the ends of the data.scale range
        assert torch.isfinite(data.x * scale).all()


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


@pytest.mark.parametrize("kind", ["zero", "constant"])
def test_a_cache_with_nothing_to_code_is_refused(tmp_path, kind):
    arr = np.zeros((300, 8), np.float32) if kind == "zero" else np.tile(np.arange(8, dtype=np.float32), (300, 1))
    path = import_cache(tmp_path / "c", arr)
    with pytest.raises(DataError, match="nothing to code"):
        CacheDataModule(path)
    if kind == "constant":  # without centring the rows are not zero: training is allowed
        CacheDataModule(path, center=False)


def test_a_single_row_cache_is_refused(tmp_path):
    path = import_cache(tmp_path / "c", np.ones((1, 4), np.float32))
    with pytest.raises(DataError, match="too few to split"):
        CacheDataModule(path, center=False)


# --------------------------------------------------------------------------------------------
# Tiny synthetic problems


def test_one_centred_sample_is_refused_clearly():
    with pytest.raises(DataError, match="generated samples are zero"):
        generate("sparse_nonlinear", 4, 1, 0, active=2.0)  # centring one sample leaves zero


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
