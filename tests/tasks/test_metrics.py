"""jaxmodels.tasks.metrics against independent formulas (SciPy's matrix square root) on random inputs."""

import numpy as np
import pytest
import scipy.linalg

from jaxmodels.tasks.metrics import frechet_distance


def _scipy_frechet(x, y):
    """|mu_x - mu_y|^2 + tr(C_x + C_y - 2 sqrtm(C_x C_y)) (Heusel et al. 2017, eq. 6), with SciPy's sqrtm."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    c_x, c_y = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    root = scipy.linalg.sqrtm(c_x @ c_y).real
    return np.sum((mu_x - mu_y) ** 2) + np.trace(c_x + c_y - 2 * root)


@pytest.mark.parametrize("d", [1, 3, 8])
def test_frechet_distance_against_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    x = rng.standard_normal((200, d)) @ rng.standard_normal((d, d))
    y = rng.standard_normal((150, d)) * 1.5 + 0.3
    np.testing.assert_allclose(frechet_distance(x, y), _scipy_frechet(x, y), rtol=1e-6, atol=1e-9)
    assert abs(frechet_distance(x, x)) < 1e-8
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(x, y[:, :1] if d > 1 else y[:1])


def test_frechet_distance_of_gaussians_with_known_moments():
    """For x ~ N(0, I) and y ~ N(m, s^2 I) in d dims the distance tends to |m|^2 + d (1 - s)^2."""
    rng = np.random.default_rng(0)
    d, m, s = 4, np.array([0.5, -1.0, 0.0, 2.0]), 2.0
    x, y = rng.standard_normal((200000, d)), m + s * rng.standard_normal((200000, d))
    np.testing.assert_allclose(frechet_distance(x, y), np.sum(m ** 2) + d * (1 - s) ** 2, rtol=0.01)
