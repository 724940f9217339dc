"""The exact non-negative lasso (sparse_coding.exact_lasso), the reference the experiments and tests compare the
greedy solver with, against scikit-learn's coordinate descent."""

import pytest
import torch
from sklearn.linear_model import Lasso

from sparse_coding.exact_lasso import exact_lasso, kkt_violation


def test_exact_lasso_matches_scikit_learn():
    """The batched exact solver against scikit-learn's coordinate descent (alpha = lam / 2d), both in float64."""

    g = torch.Generator().manual_seed(0)
    for d, m, n, lam in ((24, 96, 40, 0.05), (16, 16, 30, 0.3), (32, 200, 25, 0.01)):
        phi = torch.nn.functional.normalize(torch.randn(d, m, generator=g, dtype=torch.float64), dim=0)
        codes = torch.rand(n, m, generator=g, dtype=torch.float64) * (torch.rand(n, m, generator=g) < 0.05)
        x = codes @ phi.T + 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64)
        a, viol = exact_lasso(x, phi, lam, tol=1e-8)
        assert a.dtype == torch.float64 and viol.shape == (n,) and float(viol.max()) <= 1e-8 and bool((a >= 0).all())
        ref = Lasso(alpha=lam / (2 * d), fit_intercept=False, positive=True, tol=1e-14, max_iter=1_000_000)
        b = torch.from_numpy(ref.fit(phi.numpy(), x.T.numpy()).coef_.reshape(n, m))
        assert float(kkt_violation(x, phi, b, lam).max()) / lam < 1e-6  # the reference is converged too

        def objective(c):
            return ((x - c @ phi.T) ** 2).sum(1) + lam * c.sum(1)

        assert torch.allclose(objective(a), objective(b), rtol=1e-9, atol=0)
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="lam"):
        exact_lasso(x, phi, 0.0)
