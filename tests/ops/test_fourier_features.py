"""Random Fourier features of 2-D positions (Segment Anything's PositionEmbeddingRandom) against the NumPy formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmodels.ops.position import fourier_feature_matrix, grid_fourier_features, random_fourier_features


def _reference(coords, matrix):
    """γ(v) = [sin(2π (2v - 1) B), cos(2π (2v - 1) B)] in float64, one point at a time."""
    flat = coords.reshape(-1, 2).astype(np.float64)
    out = []
    for v in flat:
        angles = [2 * np.pi * sum((2 * v[d] - 1) * matrix[d, f] for d in range(2)) for f in range(matrix.shape[1])]
        out.append(np.concatenate([np.sin(angles), np.cos(angles)]))
    return np.array(out).reshape(*coords.shape[:-1], -1)


def test_features_match_the_formula_with_gradient():
    matrix = np.asarray(fourier_feature_matrix(6, scale=1.0, seed=3), np.float64)
    coords = np.random.default_rng(0).uniform(size=(2, 5, 2))
    out = random_fourier_features(jnp.asarray(coords, jnp.float32), jnp.asarray(matrix, jnp.float32))
    assert out.shape == (2, 5, 12) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _reference(coords, matrix), atol=2e-5)
    check_grads(lambda c: random_fourier_features(c, jnp.asarray(matrix, jnp.float32)),
                (jnp.asarray(coords, jnp.float32),), order=1, modes=("rev",), atol=5e-2, rtol=5e-2)


def test_grid_features_are_those_of_the_cell_centres():
    matrix = fourier_feature_matrix(4, scale=2.0, seed=1)
    grid = grid_fourier_features(3, 5, matrix)
    centres = np.array([[[(j + 0.5) / 5, (i + 0.5) / 3] for j in range(5)] for i in range(3)])  # (x, y)
    np.testing.assert_allclose(grid, _reference(centres, np.asarray(matrix, np.float64)), atol=2e-5)


def test_matrix_is_a_fixed_function_of_its_arguments_with_the_given_scale():
    a, b = fourier_feature_matrix(2000, 3.0, 7), fourier_feature_matrix(2000, 3.0, 7)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 2000) and a.dtype == jnp.float32
    assert abs(float(jnp.std(a)) - 3.0) < 0.15 and not np.array_equal(a, fourier_feature_matrix(2000, 3.0, 8))


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="coords must have shape"):
        random_fourier_features(jnp.zeros((4, 3)), fourier_feature_matrix(2))
    with pytest.raises(ValueError, match="matrix must have shape"):
        random_fourier_features(jnp.zeros((4, 2)), jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="scale"):
        fourier_feature_matrix(2, scale=0.0)
    with pytest.raises(ValueError, match="num_features"):
        fourier_feature_matrix(0)
    assert jax.jit(random_fourier_features)(jnp.zeros((1, 2)), fourier_feature_matrix(2)).shape == (1, 4)
