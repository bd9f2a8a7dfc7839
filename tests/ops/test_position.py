import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops.position import apply_rope, rope_frequencies, sinusoidal_embedding


def _np_rope(x, positions, base=10000.0, interleaved=False):
    """float64 RoPE: the 2x2 rotation R(m θ_i) applied to each pair of dims, one token at a time."""
    x = np.asarray(x, np.float64)
    B, L, N, H = x.shape
    positions = np.broadcast_to(positions, (B, L))
    pairs = [(2 * i, 2 * i + 1) if interleaved else (i, i + H // 2) for i in range(H // 2)]
    out = np.empty_like(x)
    for b in range(B):
        for m in range(L):
            for i, (a, c) in enumerate(pairs):
                angle = positions[b, m] * base ** (-2 * i / H)
                rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
                out[b, m, :, [a, c]] = rotation @ x[b, m, :, [a, c]]
    return out


def test_rope_frequencies():
    theta = rope_frequencies(8, base=100.0)
    assert theta.dtype == jnp.float32 and theta.shape == (4,)
    np.testing.assert_allclose(theta, [100.0 ** (-2 * i / 8) for i in range(4)], rtol=1e-7)
    np.testing.assert_allclose(rope_frequencies(128), 10000.0 ** (-np.arange(0, 128, 2) / 128), rtol=1e-7)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape, positions_shape, base", [
    ((2, 5, 3, 8), (2, 5), 10000.0),
    ((1, 4, 2, 16), (4,), 10000.0),
    ((3, 2, 1, 2), (3, 2), 500.0),
])
def test_rope_matches_rotation_matrices(shape, positions_shape, base, interleaved):
    rng = np.random.default_rng(shape[-1])
    x = rng.normal(size=shape).astype(np.float32)
    positions = rng.integers(0, 64, positions_shape)
    out = apply_rope(x, positions, base=base, interleaved=interleaved)
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _np_rope(x, positions, base, interleaved), atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_scores_depend_on_relative_position_only(interleaved):
    """<rope(q, m), rope(k, n)> = g(q, k, m - n) (Su et al. 2021, eq. 11)."""
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 1, 1, 1, 32)).astype(np.float32)
    m, n = 7, 3

    def score(m, n):
        return jnp.sum(apply_rope(q, jnp.array([m]), interleaved=interleaved)
                       * apply_rope(k, jnp.array([n]), interleaved=interleaved))

    for shift in (1, 5, 40, 250):
        np.testing.assert_allclose(score(m + shift, n + shift), score(m, n), rtol=1e-4, atol=1e-4)
    assert not np.isclose(score(m + 1, n), score(m, n), atol=1e-2)  # it does depend on m - n


def test_interleaved_and_rotate_half_differ_by_a_permutation():
    H = 8
    perm = np.stack([np.arange(H // 2), np.arange(H // 2) + H // 2], axis=-1).reshape(-1)  # [0, 4, 1, 5, ...]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 3, H)).astype(np.float32)
    positions = rng.integers(0, 100, (2, 6))
    np.testing.assert_allclose(apply_rope(x[..., perm], positions, interleaved=True),
                               apply_rope(x, positions)[..., perm], atol=1e-6)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_preserves_norm_and_position_zero_is_identity(interleaved):
    x = np.random.default_rng(2).normal(size=(2, 5, 4, 16)).astype(np.float32)
    out = apply_rope(x, jnp.arange(5) * 13, interleaved=interleaved)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_array_equal(apply_rope(x, jnp.zeros((2, 5), jnp.int32), interleaved=interleaved), x)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_rope_keeps_dtype_and_rotates_in_float32(dtype):
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 6, 2, 8)), dtype)
    positions = jnp.arange(6)
    out = apply_rope(x, positions)
    assert out.dtype == dtype
    expected = _np_rope(np.asarray(x.astype(jnp.float32)), np.asarray(positions))
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), expected, rtol=1e-2, atol=1e-2)
    np.testing.assert_array_equal(apply_rope(x, jnp.zeros(6, jnp.int32)), x)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_gradient_is_the_inverse_rotation(interleaved):
    """RoPE is x -> R x with R orthogonal, so d<w, R x>/dx = Rᵀ w = R⁻¹ w = rope(w, -positions)."""
    rng = np.random.default_rng(5)
    x, w = rng.normal(size=(2, 2, 3, 4, 8)).astype(np.float32)
    positions = rng.integers(0, 50, (2, 3))
    grad = jax.grad(lambda x: jnp.sum(w * apply_rope(x, positions, interleaved=interleaved)))(x)
    np.testing.assert_allclose(grad, apply_rope(w, -positions, interleaved=interleaved), atol=1e-5)


def test_rope_shared_positions_equal_per_batch_positions():
    x = np.random.default_rng(4).normal(size=(3, 4, 2, 8)).astype(np.float32)
    positions = jnp.array([5, 6, 7, 8])
    np.testing.assert_array_equal(apply_rope(x, positions), apply_rope(x, jnp.tile(positions, (3, 1))))


def test_rope_errors():
    with pytest.raises(ValueError, match="head_dim must be even .* got 7"):
        apply_rope(jnp.zeros((1, 2, 1, 7)), jnp.arange(2))
    with pytest.raises(ValueError, match=r"x must be 4-D .* got shape \(2, 8\)"):
        apply_rope(jnp.zeros((2, 8)), jnp.arange(2))
    with pytest.raises(ValueError, match=r"positions must have shape \(L,\) = \(3,\) or \(B, L\) = \(2, 3\), "
                                         r"got \(3, 2\)"):
        apply_rope(jnp.zeros((2, 3, 1, 8)), jnp.zeros((3, 2), jnp.int32))


def test_sinusoidal_embedding_matches_formula():
    positions = np.array([[0, 1, 7], [50, 123, 999]])
    dim, base = 10, 10000.0
    out = sinusoidal_embedding(positions, dim, base)
    assert out.shape == (2, 3, dim) and out.dtype == jnp.float32
    i = np.arange(dim // 2)
    angles = positions[..., None] / base ** (2 * i / dim)
    np.testing.assert_allclose(out, np.concatenate([np.sin(angles), np.cos(angles)], -1), atol=1e-4)
    # float positions (diffusion timesteps) and scalars
    np.testing.assert_allclose(sinusoidal_embedding(jnp.float32(2.5), 4),
                               [np.sin(2.5), np.sin(2.5 / 100), np.cos(2.5), np.cos(2.5 / 100)], rtol=1e-6)


def test_sinusoidal_embedding_errors():
    with pytest.raises(ValueError, match="dim must be even .* got 5"):
        sinusoidal_embedding(jnp.arange(3), 5)
