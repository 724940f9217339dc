"""The synthetic generators (sparse_coding.data.synthetic): fresh sources, the sparse non-linear control, and
finite data from every generator (hypothesis) or a clear refusal when nothing would be left to code."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_coding.data.synthetic import GENERATORS, SyntheticSource, generate
from sparse_coding.errors import DataError

GENERATOR_EXAMPLES = 40


def test_fresh_source_is_seeded_and_centred_on_the_population_mean():
    source = SyntheticSource("sparse_linear", 16, seed=3, active=4)
    a, b = source.draw(500, seed=7), source.draw(500, seed=7)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, source.draw(500, seed=8).x)
    # the population mean is subtracted: a large sample's mean is ~0 (noise-free part has E = 0)
    big = source.draw(200_000, seed=1).x.double()
    assert big.mean(0).abs().max() < 0.01 * big.std()
    # the same ground-truth features for every draw: the coefficients reproduce x up to noise
    d = source.draw(2000, seed=2)
    noise = d.x - (d.true_alpha @ source.features.T - source.mean)
    assert noise.std() == pytest.approx((4 * 0.1**2 / 16) ** 0.5, rel=0.05)


@pytest.mark.parametrize("name", ["gaussian", "rademacher", "heavy_tailed", "sparse_nonlinear"])
def test_fresh_controls_have_unit_power_per_coordinate(name):
    x = SyntheticSource(name, 32, seed=0, active=8).draw(20_000, seed=5).x.double()
    if name == "heavy_tailed":  # a Cauchy norm has no variance: only the calibration sample has power 1
        assert torch.isfinite(x).all()
    else:
        assert x.pow(2).sum(1).mean() / 32 == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("fresh", [False, True])
def test_sparse_nonlinear_control_is_really_nonlinear_by_default_and_not_with_fan_in_weights(fresh):
    def truth(preact_std):
        if fresh:
            return SyntheticSource("sparse_nonlinear", 64, 0, active=10, preact_std=preact_std).draw(4096, 1).truth
        return generate("sparse_nonlinear", 64, 4096, 0, active=10, preact_std=preact_std).truth

    real, old = truth(1.0), truth(0.0)
    assert real["preact_std"] == pytest.approx(1.0, rel=0.05)
    assert old["preact_std"] == pytest.approx((10 / (12 * 64)) ** 0.5, rel=0.1)  # sqrt(a / (3 * 4d))
    assert real["nonlinear_share"] > 0.2 > 0.05 > old["nonlinear_share"]


def test_nonlinear_share_of_a_linear_map_is_zero():
    from sparse_coding.data.synthetic import nonlinear_truth

    gen = torch.Generator().manual_seed(0)
    alpha = torch.rand(500, 16, generator=gen) * (torch.rand(500, 16, generator=gen) < 0.2)
    w1 = torch.randn(16, 16, generator=gen) * 1e-4  # GELU(z) = z/2 up to O(z^2) at this scale
    assert nonlinear_truth(alpha, w1, torch.randn(16, 4, generator=gen), 3.2)["nonlinear_share"] < 1e-6



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


def test_one_centred_sample_is_refused_clearly():
    with pytest.raises(DataError, match="generated samples are zero"):
        generate("sparse_nonlinear", 4, 1, 0, active=2.0)  # centring one sample leaves zero
