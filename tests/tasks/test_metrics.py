"""jaxmodels.tasks.metrics against independent formulas (SciPy's matrix square root) and brute force on random
inputs."""

import numpy as np
import pytest
import scipy.linalg

from jaxmodels.tasks.metrics import (
    best_threshold,
    frechet_distance,
    roc_auc,
    verification_accuracy,
    verification_pairs,
)


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


def test_verification_pairs_are_balanced_valid_and_seeded():
    labels = np.array([0, 0, 1, 1, 1, 2, 3])
    pairs, same = verification_pairs(labels, 50, seed=3)
    assert pairs.shape == (100, 2) and same.sum() == 50 and same[:50].all()
    assert np.all(pairs[:, 0] != pairs[:, 1])
    np.testing.assert_array_equal(labels[pairs[:, 0]] == labels[pairs[:, 1]], same)
    assert {tuple(sorted(p)) for p in pairs[:50]} == {(0, 1), (2, 3), (2, 4), (3, 4)}  # every same-class pair drawn
    np.testing.assert_array_equal(verification_pairs(labels, 50, seed=3)[0], pairs)
    with pytest.raises(ValueError, match="at least 2 classes"):
        verification_pairs(np.zeros(5), 3, seed=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_accuracy_and_auc_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    same = rng.random(40) < 0.5
    scores = np.round(rng.normal(size=40) + same, 1)  # rounding makes ties
    accuracy = lambda t: np.mean((scores > t) == same)
    t = best_threshold(scores, same)
    grid = np.linspace(scores.min() - 1, scores.max() + 1, 20001)
    assert accuracy(t) == max(accuracy(g) for g in grid)
    assert verification_accuracy(scores, same, t) == accuracy(t)
    positive, negative = scores[same], scores[~same]
    pairs = [(p > n) + 0.5 * (p == n) for p in positive for n in negative]
    np.testing.assert_allclose(roc_auc(scores, same), np.mean(pairs), rtol=1e-12)
    assert roc_auc(np.r_[1.0, 2.0], np.r_[False, True]) == 1.0
