import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmodels.ops.attention import dot_product_attention
from jaxmodels.ops.position import (
    ROPE_SCALING_METHODS,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    apply_rope_2d,
    dynamic_ntk_frequencies,
    image_positions,
    log_n_scale,
    ntk_frequencies,
    position_interpolation_frequencies,
    rerope_attention,
    rope_frequencies,
    rope_inverse_frequencies,
    segment_positions,
    sine_position_encoding_2d,
    sinusoidal_embedding,
    t5_bias,
    t5_relative_position_bucket,
    yarn_frequencies,
    yarn_mscale,
)


def _np_rotate(v, position, theta, interleaved=False):
    """float64: the 2x2 rotation R(position·θ_i) applied to each pair of dims of one vector v (H,)."""
    H = v.shape[-1]
    pairs = [(2 * i, 2 * i + 1) if interleaved else (i, i + H // 2) for i in range(H // 2)]
    out = np.empty(H)
    for i, (a, c) in enumerate(pairs):
        angle = position * theta[i]
        out[[a, c]] = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ v[[a, c]]
    return out


def _np_theta(H, base):
    return base ** (-2 * np.arange(H // 2) / H)


def _np_rope(x, positions, base=10000.0, interleaved=False, theta=None):
    """float64 RoPE, one token and head at a time; frequencies θ_i = base^(-2i/H) unless given."""
    x = np.asarray(x, np.float64)
    B, L, N, H = x.shape
    theta = _np_theta(H, base) if theta is None else np.asarray(theta, np.float64)
    positions = np.broadcast_to(positions, (B, L))
    out = np.empty_like(x)
    for b, m, n in itertools.product(range(B), range(L), range(N)):
        out[b, m, n] = _np_rotate(x[b, m, n], positions[b, m], theta, interleaved)
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


# ---------------------------------------------------------------------------------------------
# inv_freq and the context-extension frequencies


def test_apply_rope_with_inv_freq():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = rng.integers(0, 300, (2, 5))
    np.testing.assert_array_equal(apply_rope(x, positions, inv_freq=rope_frequencies(8, 500.0)),
                                  apply_rope(x, positions, base=500.0))
    theta = rng.uniform(0.0, 1.0, 4).astype(np.float32)
    for interleaved in (False, True):
        np.testing.assert_allclose(apply_rope(x, positions, inv_freq=theta, interleaved=interleaved),
                                   _np_rope(x, positions, theta=theta, interleaved=interleaved), atol=1e-4)


def _scaling_kwargs(method, factor, length):
    return dict(method=method, factor=factor, train_length=64, length=length)


@pytest.mark.parametrize("method", ROPE_SCALING_METHODS)
@pytest.mark.parametrize("head_dim, base", [(8, 10000.0), (64, 500000.0)])
def test_every_method_is_plain_rope_at_factor_one(method, head_dim, base):
    scaling = rope_inverse_frequencies(head_dim, base=base, **_scaling_kwargs(method, 1.0, length=50))
    assert scaling.inv_freq.dtype == jnp.float32 and scaling.attention_scale == 1.0
    np.testing.assert_array_equal(scaling.inv_freq, rope_frequencies(head_dim, base))


@pytest.mark.parametrize("factor", [1.0, 4.0])
def test_dynamic_ntk_is_plain_rope_up_to_the_training_length(factor):
    for length in (1, 17, 64):
        np.testing.assert_array_equal(
            dynamic_ntk_frequencies(16, length=length, train_length=64, factor=factor), rope_frequencies(16))
    assert not np.allclose(dynamic_ntk_frequencies(16, length=65, train_length=64, factor=factor), rope_frequencies(16))


def test_linear_scaling_is_rope_at_positions_over_factor():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 6, 2, 16)).astype(np.float32)
    positions = rng.integers(0, 4096, (2, 6))
    for factor in (2.0, 4.0, 7.5):
        inv_freq = position_interpolation_frequencies(16, factor=factor)
        np.testing.assert_allclose(apply_rope(x, positions, inv_freq=inv_freq), apply_rope(x, positions / factor),
                                   atol=2e-4)
        np.testing.assert_allclose(apply_rope(x, positions, inv_freq=inv_freq),
                                   _np_rope(x, positions / factor), atol=2e-4)


@pytest.mark.parametrize("head_dim, base, factor", [(4, 10000.0, 2.0), (64, 10000.0, 8.0), (128, 500000.0, 3.3)])
def test_ntk_frequencies_match_the_larger_base(head_dim, base, factor):
    """θ'_i = b'^(-2i/d) with b' = b · s^(d/(d-2)): θ'_0 = 1 and the lowest frequency is divided by s."""
    base_ntk = base * factor ** (head_dim / (head_dim - 2))
    out = np.asarray(ntk_frequencies(head_dim, base, factor=factor))
    np.testing.assert_allclose(out, _np_theta(head_dim, base_ntk), rtol=1e-6)
    assert out[0] == 1.0
    np.testing.assert_allclose(out[-1], _np_theta(head_dim, base)[-1] / factor, rtol=1e-6)


def test_dynamic_ntk_matches_hugging_face_formula():
    """Hugging Face `_compute_dynamic_ntk_parameters`: b' = b · (factor·L'/L - (factor - 1))^(d/(d-2)) for L' > L."""
    d, base, train_length = 32, 10000.0, 128
    for factor, length in itertools.product((1.0, 2.0), (129, 300, 1000)):
        base_dyn = base * (factor * length / train_length - (factor - 1)) ** (d / (d - 2))
        np.testing.assert_allclose(dynamic_ntk_frequencies(d, base, length=length, train_length=train_length,
                                                           factor=factor), _np_theta(d, base_dyn), rtol=1e-6)
        np.testing.assert_array_equal(  # == NTK at factor s = max(1, L'/L) (factor 1)
            dynamic_ntk_frequencies(d, base, length=length, train_length=train_length),
            ntk_frequencies(d, base, factor=length / train_length))


def test_dynamic_ntk_takes_a_traced_length():
    fn = jax.jit(lambda length: rope_inverse_frequencies(16, method="dynamic_ntk", length=length,
                                                         train_length=64).inv_freq)
    for length in (10, 64, 100, 1000):
        np.testing.assert_allclose(fn(length), dynamic_ntk_frequencies(16, length=length, train_length=64),
                                   rtol=1e-6)


def _np_yarn(head_dim, base, factor, train_length, alpha, beta):
    """YaRN §3.2 as written: λ = 2π/θ, r = L/λ, ramp γ(r), h(θ) = (1 - γ)θ/s + γθ."""
    out = []
    for i in range(head_dim // 2):
        theta = base ** (-2 * i / head_dim)
        r = train_length / (2 * math.pi / theta)
        gamma = 0.0 if r < alpha else 1.0 if r > beta else (r - alpha) / (beta - alpha)
        out.append((1 - gamma) * theta / factor + gamma * theta)
    return np.array(out)


@pytest.mark.parametrize("head_dim, base, factor, train_length, alpha, beta", [
    (128, 10000.0, 8.0, 4096, 1.0, 32.0),
    (64, 500000.0, 4.0, 8192, 2.0, 16.0),
    (32, 10000.0, 2.5, 256, 1.0, 32.0),
])
def test_yarn_frequencies_match_the_paper(head_dim, base, factor, train_length, alpha, beta):
    out = np.asarray(yarn_frequencies(head_dim, base, factor=factor, train_length=train_length, alpha=alpha, beta=beta))
    expected = _np_yarn(head_dim, base, factor, train_length, alpha, beta)
    np.testing.assert_allclose(out, expected, rtol=2e-6)
    theta = _np_theta(head_dim, base)
    r = train_length * theta / (2 * math.pi)
    ramp = (r >= alpha) & (r <= beta)
    assert ramp.sum() >= 3  # the cases exercise all three parts
    np.testing.assert_allclose(out[r > beta], theta[r > beta], rtol=1e-6)  # extrapolated
    np.testing.assert_allclose(out[r < alpha], theta[r < alpha] / factor, rtol=1e-6)  # interpolated
    assert np.all((out[ramp] <= theta[ramp] * (1 + 1e-6)) & (out[ramp] >= theta[ramp] / factor * (1 - 1e-6)))


def test_yarn_attention_scale():
    assert yarn_mscale(1.0) == 1.0
    np.testing.assert_allclose(yarn_mscale(math.e ** 5), 1.5)
    np.testing.assert_allclose(yarn_mscale(16.0), 0.1 * np.log(16.0) + 1)
    scaling = rope_inverse_frequencies(64, method="yarn", factor=16.0, train_length=2048)
    np.testing.assert_allclose(scaling.attention_scale, (0.1 * np.log(16.0) + 1) ** 2)
    np.testing.assert_array_equal(scaling.inv_freq, yarn_frequencies(64, factor=16.0, train_length=2048))


@pytest.mark.parametrize("method", ROPE_SCALING_METHODS)
def test_relative_property_holds_for_every_method(method):
    rng = np.random.default_rng(12)
    q, k = rng.normal(size=(2, 1, 1, 1, 32)).astype(np.float32)
    inv_freq = rope_inverse_frequencies(32, **_scaling_kwargs(method, 4.0, length=200)).inv_freq

    def score(m, n):
        rope = functools.partial(apply_rope, inv_freq=inv_freq)
        return jnp.sum(rope(q, jnp.array([m])) * rope(k, jnp.array([n])))

    for shift in (1, 9, 100, 3000):
        np.testing.assert_allclose(score(7 + shift, 3 + shift), score(7, 3), rtol=1e-4, atol=1e-4)
    assert not np.isclose(score(8, 3), score(7, 3), atol=1e-3)


def test_scaling_errors():
    with pytest.raises(ValueError, match=r"method='ntk_by_parts' is not valid; "
                                         r"choose one of \['none', 'linear', 'ntk', 'dynamic_ntk', 'yarn'\]"):
        rope_inverse_frequencies(8, method="ntk_by_parts")
    with pytest.raises(ValueError, match=r"factor must be a number >= 1 .* got 0.5"):
        rope_inverse_frequencies(8, method="linear", factor=0.5)
    with pytest.raises(ValueError, match=r"factor must be a number >= 1 .* got '2'"):
        ntk_frequencies(8, factor="2")
    with pytest.raises(TypeError, match="train_length must be a positive int, got None"):
        rope_inverse_frequencies(8, method="yarn", factor=2.0)
    with pytest.raises(ValueError, match="method='dynamic_ntk' needs length"):
        rope_inverse_frequencies(8, method="dynamic_ntk", train_length=64)
    with pytest.raises(ValueError, match="NTK scaling needs head_dim >= 4 .* got 2"):
        ntk_frequencies(2, factor=2.0)
    with pytest.raises(ValueError, match="head_dim must be even .* got 7"):
        position_interpolation_frequencies(7, factor=2.0)
    with pytest.raises(ValueError, match="YaRN needs 0 <= alpha < beta, got alpha=32, beta=1"):
        yarn_frequencies(8, factor=2.0, train_length=64, alpha=32, beta=1)
    with pytest.raises(ValueError, match=r"inv_freq must have shape \(head_dim // 2,\) = \(4,\) .* "
                                         r"got inv_freq \(8,\)"):
        apply_rope(jnp.zeros((1, 2, 1, 8)), jnp.arange(2), inv_freq=jnp.ones(8))


def test_log_n_scale():
    n = np.array([[1, 5, 512], [513, 1024, 100000]])
    out = log_n_scale(n, 512)
    assert out.shape == (2, 3) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out[0], 1.0)  # exactly 1 up to the training length
    np.testing.assert_allclose(out[1], np.log(n[1]) / np.log(512), rtol=1e-6)
    assert out[1, 0] > 1.0
    np.testing.assert_array_equal(log_n_scale(jnp.arange(1, 65), 64), np.ones(64))
    with pytest.raises(ValueError, match="needs train_length >= 2"):
        log_n_scale(n, 1)
    with pytest.raises(TypeError, match="train_length must be a positive int, got 512.0"):
        log_n_scale(n, 512.0)


# ---------------------------------------------------------------------------------------------
# ReRoPE


def _clipped(r, window, leaky):
    """ReRoPE's relative position (Su 2023): r inside the window, else ±(w + (|r| - w)/k)."""
    if abs(r) < window:
        return r
    return np.sign(r) * (window + (0.0 if leaky is None else (abs(r) - window) / leaky))


def _np_rerope(q, k, v, window, leaky, is_causal, q_offset, base=10000.0):
    """float64, one (b, head, query) row at a time: score = <R(r'_ij) q_i, k_j> / sqrt(H), since
    <R(i) q, R(j) k> = <R(i - j) q, k> and ReRoPE replaces i - j by the clipped r'."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    theta = _np_theta(H, base)
    out = np.zeros_like(q)
    for b, n, t in itertools.product(range(B), range(N), range(T)):
        i, kv_head = q_offset + t, n // (N // K)
        keys = [j for j in range(S) if not is_causal or j <= i]
        logits = np.array([_np_rotate(q[b, t, n], _clipped(i - j, window, leaky), theta) @ k[b, j, kv_head]
                           for j in keys]) / np.sqrt(H)
        p = np.exp(logits - logits.max())
        out[b, t, n] = (p / p.sum()) @ v[b, keys, kv_head]
    return out


def _jnp_rerope(q, k, v, window, leaky, is_causal, q_offset, base=10000.0):
    """The same in jnp, differentiable: every query rotated by each clipped relative position."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    rel = np.array([[_clipped(q_offset + t - j, window, leaky) for j in range(S)] for t in range(T)])
    angles = rel[..., None] * _np_theta(H, base)  # (T, S, H/2)
    cos, sin = jnp.asarray(np.cos(angles), q.dtype), jnp.asarray(np.sin(angles), q.dtype)
    q1, q2 = q[:, :, None, :, :H // 2], q[:, :, None, :, H // 2:]  # (B, T, 1, N, H/2)
    cos, sin = cos[:, :, None], sin[:, :, None]  # (T, S, 1, H/2)
    q_rot = jnp.concatenate([q1 * cos - q2 * sin, q2 * cos + q1 * sin], -1)  # (B, T, S, N, H)
    k_full = jnp.repeat(k, N // K, axis=2)
    v_full = jnp.repeat(v, N // K, axis=2)
    logits = jnp.einsum("btsnh,bsnh->bnts", q_rot, k_full) / np.sqrt(H)
    allowed = (q_offset + np.arange(T))[:, None] >= np.arange(S)[None, :]
    if is_causal:
        logits = jnp.where(allowed, logits, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v_full)


def _rerope_inputs(B, T, S, N, K, H, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, N, H)).astype(dtype)
    k, v = rng.normal(size=(2, B, S, K, H)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("dims", [(2, 7, 7, 2, 2, 8), (1, 6, 6, 4, 2, 16)])
def test_rerope_with_a_large_window_is_rope_attention(dims, is_causal):
    q, k, v = _rerope_inputs(*dims, seed=20)

    @jax.jit
    def rope_attention(q, k, v):
        positions = jnp.arange(q.shape[1])
        return dot_product_attention(apply_rope(q, positions), apply_rope(k, positions), v, is_causal=is_causal,
                                     implementation="reference")

    for window, leaky in ((dims[1], None), (dims[1] + 5, 4.0)):
        rerope = jax.jit(functools.partial(rerope_attention, window=window, leaky=leaky, is_causal=is_causal))
        np.testing.assert_allclose(rerope(q, k, v), rope_attention(q, k, v), atol=1e-5)


RERROPE_CASES = {  # (B, T, S, N, K, H), window, leaky, is_causal, q_offset
    "causal": ((2, 9, 9, 2, 2, 8), 3, None, True, 0),
    "causal_leaky_gqa": ((1, 9, 9, 4, 2, 8), 4, 8.0, True, 0),
    "bidirectional": ((1, 8, 8, 2, 1, 8), 2, None, False, 0),
    "bidirectional_leaky": ((2, 7, 7, 2, 2, 16), 3, 2.0, False, 0),
    "decode": ((2, 3, 12, 2, 2, 8), 4, 16.0, True, 9),
    "window_one": ((1, 6, 6, 1, 1, 8), 1, None, True, 0),
}


@pytest.mark.parametrize("name", RERROPE_CASES)
def test_rerope_matches_numpy(name):
    dims, window, leaky, is_causal, q_offset = RERROPE_CASES[name]
    q, k, v = _rerope_inputs(*dims, seed=21)
    out = jax.jit(functools.partial(rerope_attention, window=window, leaky=leaky, is_causal=is_causal,
                                    q_offset=q_offset))(q, k, v)
    assert out.shape == q.shape and out.dtype == jnp.float32
    expected = _np_rerope(q, k, v, window, leaky, is_causal, q_offset)
    np.testing.assert_allclose(out, expected, atol=2e-5)
    np.testing.assert_allclose(jax.jit(_jnp_rerope, static_argnums=(3, 4, 5, 6))(q, k, v, window, leaky, is_causal,
                                                                                  q_offset), expected, atol=2e-5)
    # and it is not plain RoPE attention
    plain = _np_rerope(q, k, v, dims[2] + q_offset, None, is_causal, q_offset)
    assert not np.allclose(out, plain, atol=1e-3)


def test_rerope_keeps_dtype():
    q, k, v = _rerope_inputs(1, 6, 6, 2, 2, 8, seed=22)
    out = rerope_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), window=2, leaky=4.0)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), _np_rerope(q, k, v, 2, 4.0, True, 0), atol=5e-2)


@pytest.mark.parametrize("name", ["causal_leaky_gqa", "bidirectional_leaky", "decode"])
def test_rerope_gradients_match_reference(name):
    dims, window, leaky, is_causal, q_offset = RERROPE_CASES[name]
    q, k, v = _rerope_inputs(*dims, seed=23)
    w = np.random.default_rng(24).normal(size=q.shape).astype(np.float32)
    kw = dict(window=window, leaky=leaky, is_causal=is_causal, q_offset=q_offset)

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(w * fn(q, k, v)), argnums=(0, 1, 2)))(q, k, v)

    expected = grads(lambda q, k, v: _jnp_rerope(q, k, v, window, leaky, is_causal, q_offset))
    for g, e in zip(grads(functools.partial(rerope_attention, **kw)), expected):
        np.testing.assert_allclose(g, e, atol=5e-5)


def test_rerope_gradients_float64():
    dims, window, leaky, is_causal, q_offset = RERROPE_CASES["bidirectional_leaky"]
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(a, jnp.float64) for a in _rerope_inputs(*dims, seed=25))
        fn = jax.jit(functools.partial(rerope_attention, window=window, leaky=leaky, is_causal=is_causal))
        check_grads(fn, args, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_rerope_errors():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="window must be a positive int, got 0"):
        rerope_attention(q, q, q, window=0)
    with pytest.raises(ValueError, match="leaky must be None .* got -2"):
        rerope_attention(q, q, q, window=2, leaky=-2)
    with pytest.raises(ValueError, match="q_offset must be >= 0, got -1"):
        rerope_attention(q, q, q, window=2, q_offset=-1)
    with pytest.raises(ValueError, match="number of query heads must be a multiple"):
        rerope_attention(q, jnp.zeros((1, 4, 3, 8)), jnp.zeros((1, 4, 3, 8)), window=2)


# ---------------------------------------------------------------------------------------------
# ALiBi


def _paper_get_slopes(n):
    """Press et al.'s `get_slopes` (ofirpress/attention_with_linear_biases), verbatim."""
    def get_slopes_power_of_2(n):
        start = (2 ** (-2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio ** i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (get_slopes_power_of_2(closest_power_of_2)
            + _paper_get_slopes(2 * closest_power_of_2)[0::2][:n - closest_power_of_2])


def test_alibi_slopes():
    slopes = alibi_slopes(8)
    assert slopes.shape == (8,) and slopes.dtype == jnp.float32
    np.testing.assert_array_equal(slopes, 2.0 ** -np.arange(1, 9))
    np.testing.assert_allclose(alibi_slopes(12), 2.0 ** -np.array([1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5]),
                               rtol=1e-7)
    for n in range(1, 41):
        np.testing.assert_allclose(alibi_slopes(n), _paper_get_slopes(n), rtol=1e-7)
    with pytest.raises(ValueError, match="num_heads must be a positive int, got 0"):
        alibi_slopes(0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_heads, q_len, kv_len, q_offset", [(4, 5, 5, 0), (6, 3, 8, 5), (3, 1, 7, 6)])
def test_alibi_bias_matches_loops(num_heads, q_len, kv_len, q_offset, causal):
    bias = alibi_bias(num_heads, q_len, kv_len, causal=causal, q_offset=q_offset)
    assert bias.shape == (1, num_heads, q_len, kv_len) and bias.dtype == jnp.float32
    bias = np.asarray(bias)
    slopes = _paper_get_slopes(num_heads)
    for h, t, j in itertools.product(range(num_heads), range(q_len), range(kv_len)):
        i = q_offset + t
        if causal and j > i:
            assert bias[0, h, t, j] < -1e37  # masked
        else:
            np.testing.assert_allclose(bias[0, h, t, j], -slopes[h] * abs(i - j), rtol=1e-6)


def test_alibi_bias_in_attention():
    """The causal bias alone makes attention causal; a decode step (q_offset) is the last row of the prefill."""
    rng = np.random.default_rng(30)
    B, T, N, H = 2, 6, 4, 8
    q, k, v = rng.normal(size=(3, B, T, N, H)).astype(np.float32)
    slopes = _paper_get_slopes(N)
    expected = np.zeros((B, T, N, H))
    for b, i, n in itertools.product(range(B), range(T), range(N)):  # keys j <= i, logit q·k/√H - m_n (i - j)
        logits = np.array([q[b, i, n] @ k[b, j, n] / np.sqrt(H) - slopes[n] * (i - j) for j in range(i + 1)])
        p = np.exp(logits - logits.max())
        expected[b, i, n] = (p / p.sum()) @ v[b, :i + 1, n]
    attention = jax.jit(dot_product_attention, static_argnames=("is_causal", "implementation"))
    bias = alibi_bias(N, T, T)
    for implementation in ("reference", "xla"):
        np.testing.assert_allclose(attention(q, k, v, bias, implementation=implementation), expected, atol=1e-5)
    np.testing.assert_allclose(attention(q, k, v, bias, is_causal=True), expected, atol=1e-5)
    step = attention(q[:, T - 1:], k, v, alibi_bias(N, 1, T, q_offset=T - 1))
    np.testing.assert_allclose(step, expected[:, T - 1:], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# T5 relative buckets


def _t5_relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """mesh_tensorflow's `_relative_position_bucket` (T5), one Python int at a time, in float32 as its tf.to_float."""
    ret = 0
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += int(n < 0) * num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    log_ratio = np.log(np.float32(n) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
    val_if_large = max_exact + int(log_ratio * np.float32(num_buckets - max_exact))
    return ret + min(val_if_large, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (64, 256), (8, 20), (10, 30)])
def test_t5_buckets_match_t5(bidirectional, num_buckets, max_distance):
    rng = np.random.default_rng(num_buckets)
    values = np.concatenate([np.arange(-600, 601), rng.integers(-10**6, 10**6, 500)])
    out = t5_relative_position_bucket(values, bidirectional=bidirectional, num_buckets=num_buckets,
                                      max_distance=max_distance)
    assert out.dtype == jnp.int32 and out.shape == values.shape
    expected = [_t5_relative_position_bucket(int(r), bidirectional, num_buckets, max_distance) for r in values]
    np.testing.assert_array_equal(out, expected)


def test_t5_bias_gathers_the_table():
    rng = np.random.default_rng(31)
    table = rng.normal(size=(32, 3)).astype(np.float32)
    for bidirectional, q_len, kv_len, q_offset in ((True, 5, 7, 0), (False, 2, 150, 148)):
        bias = t5_bias(table, q_len, kv_len, bidirectional=bidirectional, q_offset=q_offset)
        assert bias.shape == (1, 3, q_len, kv_len) and bias.dtype == jnp.float32
        bias = np.asarray(bias)
        for h, t, j in itertools.product(range(3), range(q_len), range(kv_len)):
            assert bias[0, h, t, j] == table[_t5_relative_position_bucket(j - (q_offset + t), bidirectional), h]


def test_t5_errors():
    with pytest.raises(TypeError, match="relative_position must be integers, got float32"):
        t5_relative_position_bucket(jnp.zeros(3), bidirectional=True)
    with pytest.raises(ValueError, match="need num_buckets >= 4 .* got num_buckets=2"):
        t5_relative_position_bucket(jnp.arange(3), bidirectional=True, num_buckets=2)
    with pytest.raises(ValueError, match="max_distance > num_buckets // 2 .* max_distance=8"):
        t5_relative_position_bucket(jnp.arange(3), bidirectional=False, num_buckets=32, max_distance=8)
    with pytest.raises(ValueError, match=r"table must be 2-D \(num_buckets, num_heads\), got shape \(32,\)"):
        t5_bias(jnp.zeros(32), 2, 2, bidirectional=True)


# ---------------------------------------------------------------------------------------------
# 2D RoPE


def test_image_positions():
    np.testing.assert_array_equal(image_positions(2, 3), [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])
    assert image_positions(4, 5).dtype == jnp.int32 and image_positions(4, 5).shape == (20, 2)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_2d_matches_rotations_per_half(interleaved):
    rng = np.random.default_rng(40)
    x = rng.normal(size=(2, 6, 3, 16)).astype(np.float32)
    for positions in (image_positions(2, 3), rng.integers(0, 50, (2, 6, 2))):
        positions = np.asarray(positions)
        out = apply_rope_2d(x, positions, base=100.0, interleaved=interleaved)
        assert out.shape == x.shape and out.dtype == jnp.float32
        expected = np.concatenate([_np_rope(x[..., :8], positions[..., 0], 100.0, interleaved),
                                   _np_rope(x[..., 8:], positions[..., 1], 100.0, interleaved)], -1)
        np.testing.assert_allclose(out, expected, atol=1e-5)


def test_rope_2d_relative_in_each_axis():
    rng = np.random.default_rng(41)
    q, k = rng.normal(size=(2, 1, 1, 1, 32)).astype(np.float32)

    def score(pq, pk):
        return jnp.sum(apply_rope_2d(q, jnp.array([pq])) * apply_rope_2d(k, jnp.array([pk])))

    base_score = score((5, 2), (1, 7))
    for shift in ((1, 0), (0, 3), (13, 40), (100, 7)):
        shifted = score((5 + shift[0], 2 + shift[1]), (1 + shift[0], 7 + shift[1]))
        np.testing.assert_allclose(shifted, base_score, rtol=1e-4, atol=1e-4)
    assert not np.isclose(score((6, 2), (1, 7)), base_score, atol=1e-3)  # depends on Δrow
    assert not np.isclose(score((5, 3), (1, 7)), base_score, atol=1e-3)  # and on Δcol


def test_rope_2d_errors():
    with pytest.raises(ValueError, match="head_dim must be divisible by 4 .* got 6"):
        apply_rope_2d(jnp.zeros((1, 4, 1, 6)), image_positions(2, 2))
    with pytest.raises(ValueError, match=r"positions_hw must have shape \(L, 2\) = \(4, 2\) or \(B, L, 2\) = "
                                         r"\(1, 4, 2\), got \(4,\)"):
        apply_rope_2d(jnp.zeros((1, 4, 1, 8)), jnp.arange(4))
    with pytest.raises(ValueError, match=r"x must be 4-D .* got shape \(4, 8\)"):
        apply_rope_2d(jnp.zeros((4, 8)), image_positions(2, 2))


def _np_segment_positions(ids):
    """Loop reference: count up within a run of equal ids, restart at 0 where the id changes."""
    out = np.zeros(ids.shape, np.int64)
    for row in np.ndindex(ids.shape[:-1]):
        for t in range(1, ids.shape[-1]):
            out[row + (t,)] = out[row + (t - 1,)] + 1 if ids[row + (t,)] == ids[row + (t - 1,)] else 0
    return out


def test_segment_positions_restart_at_each_document():
    ids = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [1, 2, 3, 3, 3, 3, 3]], jnp.int32)
    np.testing.assert_array_equal(segment_positions(ids), [[0, 1, 2, 0, 1, 0, 1], [0, 0, 0, 1, 2, 3, 4]])
    assert segment_positions(ids).dtype == jnp.int32


@pytest.mark.parametrize("shape", [(1,), (3, 17), (2, 3, 9)])
def test_segment_positions_match_loops(shape):
    rng = np.random.default_rng(sum(shape))
    ids = np.cumsum(rng.random(shape) < 0.3, axis=-1) % 3  # runs of random length, ids reused
    np.testing.assert_array_equal(segment_positions(jnp.asarray(ids, jnp.int32)), _np_segment_positions(ids))
    one_segment = jnp.ones(shape, jnp.int32)
    np.testing.assert_array_equal(segment_positions(one_segment), np.broadcast_to(np.arange(shape[-1]), shape))


def test_segment_positions_errors():
    with pytest.raises(ValueError, match="integer ids"):
        segment_positions(jnp.ones((2, 3), jnp.float32))
    with pytest.raises(ValueError, match="integer ids"):
        segment_positions(jnp.int32(1))


def detr_position_embedding_sine(height, width, num_pos_feats, temperature, normalize, scale):
    """DETR's PositionEmbeddingSine.forward (models/position_encoding.py) in float64 NumPy, unpadded, channels-last."""
    not_mask = np.ones((1, height, width))
    y_embed, x_embed = not_mask.cumsum(1), not_mask.cumsum(2)
    if normalize:
        y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * scale
        x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * scale
    dim_t = temperature ** (2 * (np.arange(num_pos_feats) // 2) / num_pos_feats)
    pos_x, pos_y = x_embed[..., None] / dim_t, y_embed[..., None] / dim_t
    pos_x = np.stack([np.sin(pos_x[..., 0::2]), np.cos(pos_x[..., 1::2])], axis=4).reshape(1, height, width, -1)
    pos_y = np.stack([np.sin(pos_y[..., 0::2]), np.cos(pos_y[..., 1::2])], axis=4).reshape(1, height, width, -1)
    return np.concatenate([pos_y, pos_x], axis=3)[0]


@pytest.mark.parametrize("height,width,dim,normalize,temperature", [(3, 5, 8, True, 10000.0), (4, 4, 16, False, 20.0),
                                                                     (1, 6, 4, True, 100.0)])
def test_sine_position_encoding_2d_matches_detr(height, width, dim, normalize, temperature):
    out = sine_position_encoding_2d(height, width, dim, temperature=temperature, normalize=normalize)
    assert out.shape == (height, width, dim) and out.dtype == jnp.float32
    expected = detr_position_embedding_sine(height, width, dim // 2, temperature, normalize, 2 * np.pi)
    np.testing.assert_allclose(out, expected, atol=2e-5)
    with pytest.raises(ValueError, match="dim must be a positive multiple of 4"):
        sine_position_encoding_2d(height, width, 6)
