import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmodels.ops.gau import gau_attention, mixed_chunk_attention, relu2_attention


def _np_gau(q, k, v, *, scores="relu2", causal=False, mask=None, bias=None, scale=None):
    """float64 GAU attention, one (batch, query) row at a time over the keys it may see."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, s = q.shape
    S = k.shape[1]
    scale = (1 / S if scores == "relu2" else 1 / np.sqrt(s)) if scale is None else scale
    bias = np.broadcast_to(0.0 if bias is None else np.asarray(bias, np.float64), (B, T, S))
    mask = np.broadcast_to(True if mask is None else np.asarray(mask), (B, T, S))
    out = np.zeros((B, T, v.shape[2]))
    for b, i in itertools.product(range(B), range(T)):
        keys = [j for j in range(S) if mask[b, i, j] and (not causal or j <= i)]
        if not keys:
            continue
        logits = np.array([q[b, i] @ k[b, j] * scale + bias[b, i, j] for j in keys])
        if scores == "relu2":
            a = np.maximum(logits, 0) ** 2
        else:
            a = np.exp(logits - logits.max())
            a /= a.sum()
        out[b, i] = sum(a_j * v[b, j] for a_j, j in zip(a, keys))
    return out


def _np_mixed_chunk(q_quad, k_quad, q_lin, k_lin, v, *, chunk_size, causal, bias=None):
    """float64 FLASH mixed chunk attention from its definition (Hua et al. 2022, §3.2), per query."""
    q_quad, k_quad, q_lin, k_lin, v = (np.asarray(a, np.float64) for a in (q_quad, k_quad, q_lin, k_lin, v))
    B, T, _ = q_quad.shape
    c = chunk_size
    bias = np.zeros((c, c)) if bias is None else np.asarray(bias, np.float64)
    out = np.zeros((B, T, v.shape[2]))
    for b, i in itertools.product(range(B), range(T)):
        g = i // c
        for j in range(T):
            if j // c == g and (not causal or j <= i):  # local: relu² within the chunk
                out[b, i] += max(q_quad[b, i] @ k_quad[b, j] / c + bias[i % c, j % c], 0) ** 2 * v[b, j]
            if (j // c < g) if causal else True:  # global: linear, all chunks / previous chunks
                out[b, i] += q_lin[b, i] @ k_lin[b, j] / T * v[b, j]
    return out


def _normal(rng, *shapes, dtype=np.float32):
    return [rng.normal(size=shape).astype(dtype) for shape in shapes]


# (B, T, S, s, E), mask / bias shapes to draw (or None)
GAU_CASES = {
    "plain": ((2, 5, 5, 4, 6), None, None),
    "cross_t_ne_s": ((2, 3, 6, 4, 5), None, None),
    "mask_bias": ((2, 6, 6, 8, 3), (2, 1, 6), (6, 6)),
    "full_mask_bias": ((1, 4, 7, 4, 4), (1, 4, 7), (1, 4, 7)),
}


@pytest.mark.parametrize("scores", ["relu2", "softmax"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(GAU_CASES))
def test_gau_attention_matches_numpy(name, causal, scores):
    (B, T, S, s, E), mask_shape, bias_shape = GAU_CASES[name]
    rng = np.random.default_rng([list(GAU_CASES).index(name), causal, scores == "softmax"])
    q, k, v = _normal(rng, (B, T, s), (B, S, s), (B, S, E))
    q, k = 2 * q, 2 * k  # most relu² logits away from 0
    kw = dict(mask=None if mask_shape is None else rng.random(mask_shape) < 0.7,
              bias=None if bias_shape is None else rng.normal(size=bias_shape).astype(np.float32) * 0.1)
    out = jax.jit(functools.partial(gau_attention, scores=scores, causal=causal))(q, k, v, **kw)
    assert out.shape == (B, T, E) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _np_gau(q, k, v, scores=scores, causal=causal, **kw), rtol=1e-5, atol=1e-6)


def test_relu2_attention_is_gau_attention_with_relu2_scores():
    q, k, v = _normal(np.random.default_rng(0), (2, 4, 4), (2, 4, 4), (2, 4, 3))
    np.testing.assert_array_equal(relu2_attention(q, k, v, causal=True),
                                  gau_attention(q, k, v, scores="relu2", causal=True))


def _np_relu2_grads(q, k, v, bias, w, *, causal, scale):
    """d/d(q, k, v, bias) of sum(w * relu²(q kᵀ scale + bias) v), by hand in float64."""
    q, k, v, bias, w = (np.asarray(a, np.float64) for a in (q, k, v, bias, w))
    logits = np.einsum("bts,bus->btu", q, k) * scale + bias
    keep = np.tril(np.ones(logits.shape[1:])) if causal else 1.0
    a = np.maximum(logits, 0) ** 2 * keep
    d_a = np.einsum("bte,bue->btu", w, v)
    d_logits = d_a * 2 * np.maximum(logits, 0) * keep
    return (np.einsum("btu,bus->bts", d_logits, k) * scale, np.einsum("btu,bts->bus", d_logits, q) * scale,
            np.einsum("btu,bte->bue", a, w), d_logits.sum(0))


@pytest.mark.parametrize("causal", [False, True])
def test_relu2_gradients_match_numpy(causal):
    rng = np.random.default_rng(1 + causal)
    B, T, s, E = 2, 6, 4, 3
    q, k, v, bias, w = _normal(rng, (B, T, s), (B, T, s), (B, T, E), (T, T), (B, T, E))
    scale = 0.4

    def loss(q, k, v, bias):
        return jnp.sum(w * relu2_attention(q, k, v, causal=causal, bias=bias, scale=scale))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
    for g, expected in zip(grads, _np_relu2_grads(q, k, v, bias, w, causal=causal, scale=scale)):
        np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scores", ["relu2", "softmax"])
def test_gradients_float64(scores):
    rng = np.random.default_rng(3)
    q, k, v, bias = _normal(rng, (1, 4, 4), (1, 5, 4), (1, 5, 3), (4, 5), dtype=np.float64)
    mask = rng.random((1, 4, 5)) < 0.7
    with jax.enable_x64(True):
        fn = jax.jit(lambda q, k, v, bias: gau_attention(q, k, v, scores=scores, mask=mask, bias=bias))
        check_grads(fn, tuple(map(jnp.asarray, (q, k, v, bias))), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scores", ["relu2", "softmax"])
def test_fully_masked_rows_are_zero(scores):
    q, k, v = _normal(np.random.default_rng(4), (1, 3, 4), (1, 5, 4), (1, 5, 2))
    mask = np.ones((3, 5), bool)
    mask[1] = False
    out = gau_attention(q, k, v, scores=scores, mask=mask)
    np.testing.assert_array_equal(out[:, 1], 0.0)
    np.testing.assert_allclose(out, _np_gau(q, k, v, scores=scores, mask=mask), rtol=1e-5, atol=1e-6)


def test_bfloat16_policy():
    q, k, v = _normal(np.random.default_rng(5), (2, 8, 8), (2, 8, 8), (2, 8, 6))
    out = gau_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), causal=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), _np_gau(q, k, v, causal=True), rtol=5e-2, atol=5e-2)


def _chunk_inputs(seed, B, T, s, E):
    rng = np.random.default_rng(seed)
    return _normal(rng, *[(B, T, s)] * 4, (B, T, E))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T, chunk_size", [(12, 4), (10, 4), (5, 8), (7, 1)])
def test_mixed_chunk_matches_numpy(T, chunk_size, causal):
    args = _chunk_inputs(T + chunk_size + causal, 2, T, 4, 3)
    bias = np.random.default_rng(T).normal(size=(chunk_size, chunk_size)).astype(np.float32) * 0.1
    fn = jax.jit(functools.partial(mixed_chunk_attention, chunk_size=chunk_size, causal=causal))
    out = fn(*args, bias=bias)
    assert out.shape == (2, T, 3) and out.dtype == jnp.float32
    expected = _np_mixed_chunk(*args, chunk_size=chunk_size, causal=causal, bias=bias)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_mixed_chunk_gradients_float64(causal):
    args = _chunk_inputs(6, 1, 7, 2, 2)
    with jax.enable_x64(True):
        fn = jax.jit(functools.partial(mixed_chunk_attention, chunk_size=3, causal=causal))
        check_grads(fn, tuple(jnp.asarray(a, jnp.float64) for a in args), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("T, chunk_size", [(12, 4), (11, 4)])
def test_causal_mixed_chunk_does_not_leak(T, chunk_size):
    """Changing every input at positions > t leaves outputs at positions <= t unchanged."""
    args = _chunk_inputs(7, 2, T, 4, 3)
    fn = jax.jit(functools.partial(mixed_chunk_attention, chunk_size=chunk_size, causal=True))
    out = fn(*args)
    rng = np.random.default_rng(8)
    for t in (0, chunk_size - 1, chunk_size, T - 2):
        changed = [a.copy() for a in args]
        for a in changed:
            a[:, t + 1:] = rng.normal(size=a[:, t + 1:].shape) * 10
        out2 = fn(*changed)
        np.testing.assert_allclose(out2[:, :t + 1], out[:, :t + 1], rtol=1e-6, atol=1e-6)
        assert not np.allclose(out2[:, t + 1:], out[:, t + 1:])


def test_one_chunk_is_gau_attention():
    """With c = T: causal FLASH is causal relu² GAU (no previous chunks); non-causal adds
    q_lin (k_linᵀ v) / T."""
    q, k, ql, kl, v = _chunk_inputs(9, 2, 6, 4, 3)
    np.testing.assert_allclose(mixed_chunk_attention(q, k, ql, kl, v, chunk_size=6, causal=True),
                               relu2_attention(q, k, v, causal=True), rtol=1e-6, atol=1e-6)
    linear = np.einsum("bts,bus,bue->bte", ql, kl, v) / 6
    np.testing.assert_allclose(mixed_chunk_attention(q, k, ql, kl, v, chunk_size=6),
                               relu2_attention(q, k, v) + linear, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, error, match", [
    (lambda q, v: gau_attention(q[0], q, v), ValueError, r"q must be 3-D"),
    (lambda q, v: gau_attention(q, q, v[:, :3]), ValueError, "agree in B and S"),
    (lambda q, v: gau_attention(q, q[..., :2], v), ValueError, "same last dim s"),
    (lambda q, v: gau_attention(q, q, v.astype(jnp.bfloat16)), TypeError, "one dtype"),
    (lambda q, v: gau_attention(q, q, v, scores="sigmoid"), ValueError,
     r"scores='sigmoid' is not valid; choose one of \['relu2', 'softmax'\]"),
    (lambda q, v: gau_attention(q, q, v, mask=np.ones((4, 4))), TypeError, "mask must be boolean"),
    (lambda q, v: gau_attention(q, q, v, bias=np.ones((3, 4, 4))), ValueError,
     r"bias must be broadcastable to \(2, 4, 4\)"),
    (lambda q, v: mixed_chunk_attention(q, q, q, q, v, chunk_size=0), ValueError, "chunk_size must be a positive int"),
    (lambda q, v: mixed_chunk_attention(q, q, q[:, :3], q, v, chunk_size=2), ValueError, "one shape"),
    (lambda q, v: mixed_chunk_attention(q, q, q, q, v, chunk_size=2, bias=np.ones((3, 3))), ValueError,
     r"bias must be broadcastable to \(2, 2, 2, 2\)"),
])
def test_errors(call, error, match):
    q, v = jnp.ones((2, 4, 4)), jnp.ones((2, 4, 3))
    with pytest.raises(error, match=match):
        call(q, v)
