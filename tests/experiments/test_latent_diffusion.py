"""experiments/latent_diffusion.py's pieces: the edge map against loops, the random batches."""

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import latent_diffusion as ld


def _edge_map_reference(images: np.ndarray) -> np.ndarray:
    """Sobel magnitude by explicit loops in float64, borders replicated."""
    b, h, w, _ = images.shape
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)
    out = np.zeros((b, h, w, 1))
    for n in range(b):
        padded = np.pad(images[n, :, :, 0].astype(np.float64), 1, mode="edge")
        for i in range(h):
            for j in range(w):
                patch = padded[i:i + 3, j:j + 3]
                out[n, i, j, 0] = np.hypot(np.sum(kx * patch), np.sum(kx.T * patch)) / 8.0
    return out


def test_edge_map_matches_loops():
    images = np.random.default_rng(0).uniform(-1, 1, (3, 8, 6, 1)).astype(np.float32)
    np.testing.assert_allclose(ld.edge_map(jnp.asarray(images)), _edge_map_reference(images), rtol=1e-5, atol=1e-6)
    step = np.where(np.arange(8) < 4, -1.0, 1.0)[None, None, :, None] * np.ones((1, 8, 8, 1))
    assert float(jnp.max(ld.edge_map(jnp.asarray(step, jnp.float32)))) == pytest.approx(1.0)  # a -1 -> 1 step is 1
    with pytest.raises(ValueError, match="batch, height, width, 1"):
        ld.edge_map(jnp.zeros((2, 8, 8, 3)))


def test_random_batches_draw_rows_with_the_seed():
    arrays = {"a": np.arange(10), "b": np.arange(10) * 2}
    first, second = [b for _, b in zip(range(2), ld.random_batches(arrays, 4, seed=3))]
    rows = np.random.default_rng(3).integers(0, 10, 4)
    np.testing.assert_array_equal(first["a"], rows)
    np.testing.assert_array_equal(first["b"], 2 * rows)
    assert first["step"] == 0 and second["step"] == 1 and first["step"].dtype == np.int32
