"""End-to-end runs (compose, check, train, measure, write) on small synthetic problems with known answers: the
generator's own features recovered and measured, scale invariance under auto-λ, the generalization gap of a fresh
and of a small fixed sample, clustered standard errors on a cache."""

import json

import pytest
import torch

from sparse_coding.config.plan import resolve
from sparse_coding.dictionary import SparseDictionary
from sparse_coding.features import recovery
from sparse_coding.run import build_datamodule
from sparse_coding.solver import solve
from tests.helpers import compose, train

SMALL = ["data=sparse_linear", "data.dim=16", "data.active=4", "data.n=2048", "data.n_val=1024",
         "data.batch_size=256", "dictionary.mult=4"]


def small(data, dim=32, **extra):
    args = [f"data={data}", f"data.dim={dim}", "data.n=8192", "data.n_val=2048", "data.batch_size=512",
            "trainer.max_epochs=8", "dictionary.mult=8", "solver.max_steps=128"]
    return args + [f"{k}={v}" for k, v in extra.items()]


SPARSE = small("sparse_linear", dim=64, **{"data.active": 6})


@pytest.fixture(scope="module")
def sparse_and_gaussian(tmp_path_factory):
    """((result, run folder) of sparse-linear data, d=64, a=6; the same of Gaussian data)."""
    runs = []
    for name, overrides in (("sparse", SPARSE), ("gaussian", small("gaussian", dim=64))):
        out = tmp_path_factory.mktemp(name)
        runs.append((train(out, overrides), out))
    return runs


def true_features(dim: int, seed: int) -> torch.Tensor:
    """The sparse-linear generator's 4d features, built here as docs/method.md §7.1 states them: the unit columns of
    the generator's first draw from data.seed."""
    f = torch.randn(dim, 4 * dim, generator=torch.Generator().manual_seed(seed))
    return f / f.norm(dim=0, keepdim=True)


def auto_lambda(x, phi, lam: float, max_steps: int) -> float:
    """docs/method.md's auto-λ, stated here: the fixed point of λ = 0.1 · mean over rows of max α under Φ."""
    for _ in range(50):
        new = 0.1 * float(solve(x, phi, lam, max_steps=max_steps).row_max().double().mean())
        if abs(new - lam) <= 1e-4 * lam:
            return new
        lam = new
    raise AssertionError(f"auto-λ did not settle for the reference dictionary (last {lam})")


def test_sparse_linear_recovers_the_true_features_and_measures_like_them(sparse_and_gaussian):
    """Known answers: the generator's own 4d features are each found among the learned atoms, and the learned
    dictionary measures like the true one does on the same held-out rows, at the true one's own auto-λ (a wrong
    gradient, λ factor or sum would move the learned numbers, not the reference)."""
    (sparse, out), (gaussian, _) = sparse_and_gaussian
    assert sparse["truth"]["ground_truth"] == 3.0  # a / 2
    cfg = compose(SPARSE)
    features = true_features(64, cfg.data.seed)
    learned = SparseDictionary.load(out)
    found = recovery(features, learned.phi)
    assert found["true_features"] == 256 and found["recovered"] == 256  # every feature: an atom at cosine > 0.9
    assert found["max_cosine_quantiles"]["q0"] > 0.95  # measured 0.98
    data = build_datamodule(cfg, resolve(cfg))
    lam = auto_lambda(data.in_sample_x, features, sparse["lam"], max_steps=128)
    assert lam == pytest.approx(sparse["lam"], rel=0.05)  # measured 0.8 %
    reference = SparseDictionary(features, lam, max_steps=128, tol=learned.tol).measure(data.val_x)
    print("learned", sparse["normalized_loss"], sparse["avg_coef_norm"], "true features", reference["normalized_loss"],
          reference["avg_coef_norm"], "gaussian", gaussian["normalized_loss"])
    # the learned dictionary (2x overcomplete) codes a little better than the true one: measured 0.946
    assert 0.85 < sparse["normalized_loss"] / reference["normalized_loss"] < 1.05
    # S1 of the learned code against S1 of the generating coefficients (measured +8.6 %)
    assert sparse["avg_coef_norm"] == pytest.approx(sparse["truth"]["true_avg_coef_norm"], rel=0.15)
    assert gaussian["normalized_loss"] > 2.5 * sparse["normalized_loss"]  # a dense control is far from sparse
    assert sparse["explained_variance"] > 0.95  # measured 0.98
    assert sparse["capped_fraction"] < 0.01
    assert sparse["lam_converged"] and len(sparse["lam_history"]) >= 2


@pytest.mark.parametrize("scale", ["1e-6", "1e-3", "1e3", "1e6"])
def test_scale_invariance_over_the_allowed_range(tmp_path, scale):
    """S1 and L_norm do not depend on the data's scale under auto-lambda (SPEC §4), down as well as up:
    the reconstruction error is normalised by the data's power, so Adam's eps never matters."""
    fixed = SMALL + ["convergence.stop=false", "trainer.max_epochs=3"]
    base = train(tmp_path / "base", fixed)
    scaled = train(tmp_path / "scaled", fixed + [f"data.scale={scale}"])
    for key in ("normalized_loss", "avg_coef_norm"):
        assert scaled[key] == pytest.approx(base[key], rel=2e-3), key
    assert scaled["lam"] == pytest.approx(float(scale) * base["lam"], rel=2e-3)


def test_fresh_run_reports_a_small_gap_and_a_fixed_small_sample_a_large_one(tmp_path, capsys):
    base = ["data=sparse_linear", "data.dim=16", "data.active=4", "data.n_val=2048", "data.batch_size=256",
            "dictionary.mult=8", "convergence.max_samples=400000"]
    fresh = train(tmp_path / "fresh", base)
    assert fresh["data"]["fresh"] is True
    assert abs(fresh["generalization_gap"]) < 0.02 and fresh["sample_sufficient"] is True
    assert fresh["in_sample"]["n_samples"] == 2048
    fixed = train(tmp_path / "fixed", base + ["data.fresh=false", "data.n=512"])
    out = capsys.readouterr().out
    assert fixed["generalization_gap"] > 0.05 and fixed["sample_sufficient"] is False
    assert fixed["generalization_gap"] > 3 * fixed["generalization_gap_se"]
    assert fixed["in_sample"]["normalized_loss"] < fixed["normalized_loss"]
    assert "raise data.n" in out and "sample is too small" in out
    on_disk = json.loads((tmp_path / "fixed" / "metrics.json").read_text())
    assert on_disk["in_sample"] == pytest.approx(fixed["in_sample"]) and on_disk["sample_sufficient"] is False

    # SparseDictionary.measure reproduces both numbers on the same rows
    cfg = compose(base + ["data.fresh=false", "data.n=512"])
    dm = build_datamodule(cfg, resolve(cfg))
    d = SparseDictionary.load(tmp_path / "fixed")
    held, ins = d.measure(dm.val_x), d.measure(dm.in_sample_x)
    assert held["normalized_loss"] == pytest.approx(fixed["normalized_loss"], rel=1e-6)
    assert ins["normalized_loss"] == pytest.approx(fixed["in_sample"]["normalized_loss"], rel=1e-6)


def test_cache_run_reports_clustered_standard_errors_and_its_gap(tiny_gpt2_cache, tmp_path):
    tiny, path = tiny_gpt2_cache
    overrides = ["model=gpt2", f"model.path={tiny}", "data=cache", f"data.path={path}", "layer=1", "dictionary.mult=2", "data.batch_size=128",
                 "convergence.max_samples=20000", "data.val_fraction=0.2"]
    result = train(tmp_path, overrides)
    assert result["data"]["se_unit"] == "contexts of 16 rows"
    assert result["se_clusters"] < result["n_samples"]
    assert result["normalized_loss_se"] != result["normalized_loss_se_rows"]
    assert "generalization_gap" in result and result["sample_sufficient"] in (True, False)
    assert result["in_sample"]["se_clusters"] < result["in_sample"]["n_samples"]
