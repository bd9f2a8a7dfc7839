import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmodels.ops.attention import dot_product_attention
from jaxmodels.ops.linear_attention import (
    LinearAttentionState,
    diagonal_block_attention,
    linear_attention,
    linear_attention_init_state,
    linear_attention_step,
    norm_attention,
    norm_attention_step,
    orthogonal_random_features,
    performer_attention,
    performer_features,
)

NP_FEATURE_MAPS = {"elu": lambda x: np.where(x > 0, x + 1, np.exp(x)), "relu": lambda x: np.maximum(x, 0)}


def _qkv(seed, B, T, S, N, K, H, Hv, dtype=np.float32, std=1.0):
    rng = np.random.default_rng(seed)
    return tuple((std * rng.standard_normal(shape)).astype(dtype)
                 for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, Hv)))


def _np_kernel_attention(phi_q, phi_k, v, *, causal, normalise, eps=1e-6):
    """float64, one (batch, head, query) row at a time: Σ_j w_j v_j (/ (Σ_j w_j + eps) if normalise),
    w_j = φ(q_i)·φ(k_j) over the keys j the row may see."""
    phi_q, phi_k, v = (np.asarray(a, np.float64) for a in (phi_q, phi_k, v))
    B, T, N, _ = phi_q.shape
    S, K = phi_k.shape[1], phi_k.shape[2]
    out = np.zeros((B, T, N, v.shape[3]))
    for b in range(B):
        for n in range(N):
            kv_head = n // (N // K)
            for i in range(T):
                keys = range(i + 1) if causal else range(S)
                weights = [phi_q[b, i, n] @ phi_k[b, j, kv_head] for j in keys]
                out[b, i, n] = sum(w * v[b, j, kv_head] for w, j in zip(weights, keys))
                if normalise:
                    out[b, i, n] /= sum(weights) + eps
    return out


def _np_linear_attention(q, k, v, *, feature_map="elu", causal=False):
    phi = NP_FEATURE_MAPS[feature_map]
    return _np_kernel_attention(phi(np.float64(q)), phi(np.float64(k)), v, causal=causal, normalise=True)


def _np_norm_attention(q, k, v, *, causal=False, eps=1e-6):
    phi = NP_FEATURE_MAPS["elu"]
    out = _np_kernel_attention(phi(np.float64(q)), phi(np.float64(k)), v, causal=causal, normalise=False)
    return out / np.sqrt(np.mean(out**2, axis=-1, keepdims=True) + eps)


# (B, T, S, N, K, H, Hv): multi-head, grouped-query, multi-query, T != S (non-causal only).
DIMS = {
    "mha": (2, 6, 6, 2, 2, 4, 4),
    "gqa": (1, 7, 7, 4, 2, 4, 3),
    "mqa": (2, 5, 5, 3, 1, 4, 6),
    "t_ne_s": (2, 4, 6, 4, 2, 4, 5),
}


# ---------------------------------------------------------------------------------------------
# Linear attention (Katharopoulos et al. 2020)


def _cases(names, extra=()):
    """(name, *extra, causal, chunk_size) cases; causal ones only where T == S."""
    return [(name, *e, causal, chunk) for name in names for e in (extra or [()])
            for causal, chunk in [(False, None), (True, None), (True, 3)]
            if not causal or DIMS[name][1] == DIMS[name][2]]


@pytest.mark.parametrize("name,feature_map,causal,chunk_size",
                         [c for n, f in [("mha", "elu"), ("gqa", "relu"), ("mqa", "elu"), ("t_ne_s", "relu")]
                          for c in _cases([n], [(f,)])])
def test_linear_attention_matches_numpy(name, feature_map, causal, chunk_size):
    dims = DIMS[name]
    q, k, v = _qkv(zlib.crc32(f"{name}-{causal}-{feature_map}".encode()), *dims)
    out = linear_attention(q, k, v, feature_map=feature_map, causal=causal, chunk_size=chunk_size)
    assert out.shape == q.shape[:3] + v.shape[3:] and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _np_linear_attention(q, k, v, feature_map=feature_map, causal=causal),
                               atol=1e-5, rtol=1e-5)


def test_causal_forms_agree_with_masked_quadratic_form():
    q, k, v = _qkv(1, 2, 11, 11, 4, 2, 4, 3)
    expected = _np_linear_attention(q, k, v, causal=True)
    prefix = linear_attention(q, k, v, causal=True)
    np.testing.assert_allclose(prefix, expected, atol=1e-5, rtol=1e-5)
    chunked = jax.jit(linear_attention, static_argnames=("causal", "chunk_size"))
    for chunk_size in (1, 2, 3, 4, 5, 11, 16):  # dividing T, not dividing T, T, > T
        np.testing.assert_allclose(chunked(q, k, v, causal=True, chunk_size=chunk_size), prefix,
                                   atol=1e-5, rtol=1e-5, err_msg=f"chunk_size={chunk_size}")


def test_chunk_size_ignored_without_causal():
    q, k, v = _qkv(2, *DIMS["t_ne_s"])
    np.testing.assert_array_equal(linear_attention(q, k, v, chunk_size=2), linear_attention(q, k, v))


def test_callable_feature_map():
    """A callable may change the feature dim (here F = 2H)."""
    q, k, v = _qkv(3, *DIMS["gqa"])
    out = linear_attention(q, k, v, causal=True, chunk_size=2,
                           feature_map=lambda x: jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1))
    phi = lambda x: np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], axis=-1)
    np.testing.assert_allclose(out, _np_kernel_attention(phi(np.float64(q)), phi(np.float64(k)), v,
                                                         causal=True, normalise=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal,chunk_size", [(False, None), (True, None), (True, 4)])  # 4 does not divide T=7
def test_linear_attention_gradients_float64(causal, chunk_size):
    q, k, v = _qkv(4, *DIMS["gqa"], dtype=np.float64)
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(a) for a in (q, k, v))
        assert linear_attention(*args, causal=causal, chunk_size=chunk_size).dtype == jnp.float64
        check_grads(jax.jit(lambda *a: linear_attention(*a, causal=causal, chunk_size=chunk_size)), args,
                    order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def _decode(step, q, k, v, state):
    """Run a one-token step function over the sequence: outputs (B, T, N, Hv)."""
    def body(state, token):  # token: q (B, 1, N, H), k (B, 1, K, H), v (B, 1, K, Hv)
        out, state = step(state, *token)
        return state, out

    tokens = tuple(jnp.moveaxis(x, 1, 0)[:, :, None] for x in (q, k, v))  # (T, B, 1, heads, dim)
    _, outs = jax.lax.scan(body, state, tokens)                           # (T, B, 1, N, Hv)
    return jnp.moveaxis(outs[:, :, 0], 0, 1)


def test_recurrent_step_equals_causal_form():
    B, T, _, N, K, H, Hv = DIMS["gqa"]
    q, k, v = _qkv(5, *DIMS["gqa"])
    state = linear_attention_init_state(B, K, H, Hv)
    assert state.s.shape == (B, K, H, Hv) and state.z.shape == (B, K, H) and state.s.dtype == jnp.float32
    outs = _decode(linear_attention_step, q, k, v, state)
    np.testing.assert_allclose(outs, linear_attention(q, k, v, causal=True, chunk_size=3), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(outs, _np_linear_attention(q, k, v, causal=True), atol=1e-5, rtol=1e-5)


def test_norm_attention_step_equals_causal_form():
    B, T, _, N, K, H, Hv = DIMS["gqa"]
    q, k, v = _qkv(13, *DIMS["gqa"])
    outs = _decode(norm_attention_step, q, k, v, linear_attention_init_state(B, K, H, Hv))
    np.testing.assert_allclose(outs, norm_attention(q, k, v, causal=True, chunk_size=3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal,chunk_size", [(False, None), (True, None), (True, 3)])
def test_bfloat16(causal, chunk_size):
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _qkv(6, *DIMS["gqa"]))
    out = linear_attention(q, k, v, causal=causal, chunk_size=chunk_size)
    assert out.dtype == jnp.bfloat16
    expected = _np_linear_attention(*(np.asarray(a, np.float64) for a in (q, k, v)), causal=causal)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------------------------------------
# Performer, FAVOR+ (Choromanski et al. 2021)


def test_orthogonal_random_features_blocks_and_norms():
    H, m = 8, 4092  # 511 full blocks of 8 rows and a cut block of 4
    w = np.asarray(orthogonal_random_features(jax.random.key(0), m, H), np.float64)
    assert w.shape == (m, H)
    for block in (w[0:8], w[8:16], w[4088:]):
        gram = block @ block.T
        np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-4)
    assert np.abs(w[0] @ w[8]) > 1e-3  # rows of different blocks are independent, not orthogonal
    # Row norms are chi(H): E|w|² = H, Var|w|² = 2H, so the mean over m rows is within 4 sigma of H.
    assert abs(np.mean(np.sum(w**2, axis=-1)) - H) < 4 * math.sqrt(2 * H / m)
    assert not np.allclose(w, orthogonal_random_features(jax.random.key(1), m, H))


def test_performer_features_positive():
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 5, 3, 8)) * 3, jnp.float32)
    w = orthogonal_random_features(jax.random.key(0), 32, 8)
    for is_query in (True, False):
        phi = performer_features(x, w, is_query=is_query)
        assert phi.shape == (2, 5, 3, 32) and phi.dtype == jnp.float32
        assert np.all(np.asarray(phi) > 0) and np.all(np.asarray(phi) <= 1 / math.sqrt(32) + 1e-7)
    # Causal keys are not stabilised: φ(x) = exp(ωᵀx − |x|²/2) / sqrt(m) exactly.
    phi = performer_features(x, w, is_query=False, causal=True)
    x64 = np.float64(x)
    exponent = np.einsum("blnh,mh->blnm", x64, np.float64(w)) - 0.5 * np.sum(x64**2, -1)[..., None]
    np.testing.assert_allclose(phi, np.exp(exponent) / math.sqrt(32), rtol=1e-5, atol=1e-30)


def test_performer_kernel_estimate_is_unbiased():
    """E[φ(x)ᵀφ(y)] ∝ exp(xᵀy). A zero vector among the keys fixes the constant: with one key
    stabiliser c for all rows, φ(0)ᵀφ(0) = exp(-2c) exactly, so φ(x)ᵀφ(y) / φ(0)ᵀφ(0) estimates
    exp(xᵀy); its mean over many draws is within 4 standard errors."""
    H, m, draws = 8, 16, 4000
    x = np.random.default_rng(8).standard_normal((4, H)) * 0.5
    x = np.concatenate([np.zeros((1, H)), x]).astype(np.float32)[None, :, None, :]  # (1, 5, 1, H)

    def estimate(key):
        phi = performer_features(x, orthogonal_random_features(key, m, H), is_query=False)[0, :, 0]
        gram = phi @ phi.T
        return gram[1:, 1:] / gram[0, 0]

    estimates = np.asarray(jax.jit(jax.vmap(estimate))(jax.random.split(jax.random.key(0), draws)), np.float64)
    exact = np.exp(np.float64(x[0, 1:, 0]) @ np.float64(x[0, 1:, 0]).T)
    std_error = estimates.std(0) / math.sqrt(draws)
    assert np.all(np.abs(estimates.mean(0) - exact) < 4 * std_error + 1e-6)


def test_performer_approximates_softmax_better_with_more_features():
    """Mean |performer - softmax| over 3 draws, non-causal and causal, for m = 16, 256, 2048 features,
    falls about as 1/sqrt(m), i.e. by factors 4 and 2.8 (2.4 to 3 each over input seeds; asserted 1.8)."""
    B, T, N, K, H = 2, 16, 4, 2, 16
    q, k, v = _qkv(9, B, T, T, N, K, H, H, std=0.5)
    exact = jnp.stack([dot_product_attention(q, k, v, is_causal=causal) for causal in (False, True)])

    @functools.partial(jax.jit, static_argnums=0)
    def mean_errors(num_features):
        w = jax.vmap(lambda key: orthogonal_random_features(key, num_features, H))(
            jax.random.split(jax.random.key(num_features), 3))
        out = jnp.stack([jax.vmap(lambda w: performer_attention(q, k, v, w, causal=causal, chunk_size=4))(w)
                         for causal in (False, True)], axis=1)  # (draws, causal, B, T, N, H)
        return jnp.mean(jnp.abs(out - exact), axis=(0, 2, 3, 4, 5))

    errors = np.stack([mean_errors(m) for m in (16, 256, 2048)])  # (m, causal)
    assert np.all(errors[0] > 1.8 * errors[1]) and np.all(errors[1] > 1.8 * errors[2]), errors
    assert np.all(errors[2] < 0.015), errors  # 0.005 here


@pytest.mark.parametrize("name,causal,chunk_size", _cases(["mha", "gqa", "t_ne_s"]))
def test_performer_equals_quadratic_form_with_same_features(name, causal, chunk_size):
    dims = DIMS[name]
    q, k, v = _qkv(10, *dims)
    H, scale = dims[5], 0.3
    w = orthogonal_random_features(jax.random.key(3), 12, H)
    out = performer_attention(q, k, v, w, causal=causal, chunk_size=chunk_size, scale=scale)
    phi_q = performer_features(q * math.sqrt(scale), w, is_query=True)
    phi_k = performer_features(k * math.sqrt(scale), w, is_query=False, causal=causal)
    np.testing.assert_allclose(out, _np_kernel_attention(phi_q, phi_k, v, causal=causal, normalise=True),
                               atol=1e-5, rtol=1e-5)


def test_causal_performer_outputs_ignore_later_keys_exactly():
    """The causal key stabiliser is data-independent: later keys cannot move earlier outputs."""
    q, k, v = _qkv(12, 2, 10, 10, 4, 2, 8, 8)
    w = orthogonal_random_features(jax.random.key(5), 16, 8)
    k2 = k.copy()
    k2[:, 6:] *= 5.0
    a, b = (performer_attention(q, kk, v, w, causal=True, chunk_size=4) for kk in (k, k2))
    np.testing.assert_array_equal(a[:, :6], b[:, :6])


def test_performer_gradients_float64():
    """eps=0 makes the output exactly independent of the stabilisers, so the stop_gradient on them
    gives the true gradient that finite differences see."""
    q, k, v = _qkv(11, *DIMS["gqa"], dtype=np.float64)
    with jax.enable_x64(True):
        w = jnp.asarray(orthogonal_random_features(jax.random.key(0), 8, 4), jnp.float64)
        check_grads(jax.jit(lambda *a: performer_attention(*a, w, causal=True, chunk_size=3, eps=0.0)),
                    (q, k, v), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_performer_redraw_changes_output():
    q, k, v = _qkv(12, *DIMS["gqa"])
    H = q.shape[3]
    out_a = performer_attention(q, k, v, orthogonal_random_features(jax.random.key(0), 16, H))
    out_b = performer_attention(q, k, v, orthogonal_random_features(jax.random.key(1), 16, H))
    assert np.abs(out_a - out_b).max() > 1e-3


def test_performer_bfloat16():
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _qkv(13, *DIMS["gqa"]))
    w = orthogonal_random_features(jax.random.key(0), 16, q.shape[3])
    out = performer_attention(q, k, v, w, causal=True, chunk_size=2)
    assert out.dtype == jnp.bfloat16
    q, k, v = (jnp.asarray(a, jnp.float32) for a in (q, k, v))
    np.testing.assert_allclose(np.asarray(out, np.float32), performer_attention(q, k, v, w, causal=True),
                               atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------------------------------------
# TransNormer (Qin et al. 2022): NormAttention and DiagAttention


@pytest.mark.parametrize("causal,chunk_size", [(False, None), (True, None), (True, 2)])
@pytest.mark.parametrize("name", ["gqa", "mqa"])
def test_norm_attention_matches_numpy(name, causal, chunk_size):
    q, k, v = _qkv(14, *DIMS[name])
    out = norm_attention(q, k, v, causal=causal, chunk_size=chunk_size)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _np_norm_attention(q, k, v, causal=causal), atol=1e-5, rtol=1e-5)


def test_norm_attention_gradients_and_bfloat16():
    q, k, v = _qkv(15, *DIMS["gqa"], dtype=np.float64)
    with jax.enable_x64(True):
        check_grads(jax.jit(lambda *a: norm_attention(*a, causal=True, chunk_size=3)), (q, k, v), order=1,
                    modes=("rev",), atol=1e-6, rtol=1e-6)
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    out = norm_attention(q, k, v, causal=True)
    assert out.dtype == jnp.bfloat16
    expected = _np_norm_attention(*(np.asarray(a, np.float64) for a in (q, k, v)), causal=True)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=5e-2, rtol=5e-2)


def _block_diagonal_mask(length, block_size, causal):
    pos = np.arange(length)
    mask = pos[:, None] // block_size == pos[None, :] // block_size
    if causal:
        mask &= pos[None, :] <= pos[:, None]
    return jnp.asarray(mask)[None, None]  # (1, 1, T, T)


@pytest.mark.parametrize("length,block_size,causal", [
    (8, 4, False), (8, 4, True),  # T a multiple of the block
    (7, 3, False), (7, 3, True),  # padded last block
    (7, 1, True), (6, 6, False), (5, 8, True),  # one position per block; one block; block > T
])
def test_diagonal_block_attention_matches_masked_softmax(length, block_size, causal):
    q, k, v = _qkv(16, 2, length, length, 4, 2, 8, 8)
    mask = _block_diagonal_mask(length, block_size, causal)
    blockwise = lambda *a: diagonal_block_attention(*a, block_size=block_size, causal=causal)
    reference = lambda *a: dot_product_attention(*a, mask=mask, implementation="reference")

    @jax.jit
    def outputs_and_grads(q, k, v):  # both attentions and their gradients, in one compilation
        loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
        return [(f(q, k, v), jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v)) for f in (blockwise, reference)]

    (out, grads), (out_ref, grads_ref) = outputs_and_grads(q, k, v)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)


def test_diagonal_block_attention_bfloat16():
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _qkv(17, 1, 7, 7, 2, 1, 8, 8))
    out = diagonal_block_attention(q, k, v, block_size=3, causal=True)
    assert out.dtype == jnp.bfloat16
    expected = dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)),
                                     mask=_block_diagonal_mask(7, 3, True))
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------------------------------------
# Errors

_Q, _K, _V = (np.zeros(s, np.float32) for s in ((1, 4, 4, 8), (1, 4, 2, 8), (1, 4, 2, 8)))
_W = np.zeros((16, 8), np.float32)


@pytest.mark.parametrize("fn,args,kwargs,error,match", [
    (linear_attention, (_Q[0], _K, _V), {}, ValueError, "query must be 4-D"),
    (linear_attention, (_Q, _K, _V[:, :3]), {}, ValueError, "key and value must agree"),
    (linear_attention, (_Q, _K[..., :4], _V), {}, ValueError, "same head_dim"),
    (linear_attention, (_Q[:, :, :3], _K, _V), {}, ValueError, "multiple of key/value heads"),
    (linear_attention, (_Q[:, :3], _K, _V), {"causal": True}, ValueError, "T=3, S=4"),
    (linear_attention, (_Q, _K, _V), {"feature_map": "softmax"}, ValueError, r"\['elu', 'relu'\]"),
    (linear_attention, (_Q, _K, _V), {"feature_map": "identity"}, ValueError,
     r"feature_map='identity' is not valid; choose one of \['elu', 'relu'\]"),
    (linear_attention, (_Q, _K, _V), {"causal": True, "chunk_size": 0}, ValueError, "chunk_size must be a positive"),
    (linear_attention, (_Q, _K, _V), {"causal": True, "chunk_size": 2.0}, TypeError, "chunk_size"),
    (linear_attention, (_Q, _K, _V.astype(np.float16)), {}, TypeError, "one dtype"),
    (linear_attention, (_Q.astype(np.int32), _K.astype(np.int32), _V.astype(np.int32)), {}, TypeError,
     "floating point"),
    (linear_attention, (_Q, _K, _V), {"feature_map": lambda x: x[..., 0]}, ValueError, "feature_map must map"),
    (linear_attention_step, (linear_attention_init_state(1, 2, 8, 8), _Q, _K, _V), {}, ValueError, "one token"),
    (linear_attention_step, (linear_attention_init_state(1, 2, 8, 4), _Q[:, :1], _K[:, :1], _V[:, :1]), {},
     ValueError, "state must have"),
    (linear_attention_init_state, (1, 0, 8, 8), {}, ValueError, "num_kv_heads"),
    (orthogonal_random_features, (jax.random.key(0), 0, 8), {}, ValueError, "num_features"),
    (performer_features, (_Q, _W[:, :4]), {"is_query": True}, ValueError, "projection must have shape"),
    (performer_attention, (_Q, _K, _V, _W[:, :4]), {}, ValueError, "projection must have shape"),
    (performer_attention, (_Q, _K, _V, _W), {"causal": True, "chunk_size": -1}, ValueError, "chunk_size"),
    (norm_attention, (_Q, _K, _V), {"feature_map": "exp"}, ValueError, "feature_map='exp' is not valid"),
    (norm_attention, (_Q[:, :, :3], _K, _V), {}, ValueError, "multiple of key/value heads"),
    (diagonal_block_attention, (_Q, _K, _V), {"block_size": 0}, ValueError, "block_size"),
    (diagonal_block_attention, (_Q[:, :3], _K, _V), {"block_size": 2}, ValueError, "T=3, S=4"),
    (diagonal_block_attention, (_Q, _K, _V[..., :4]), {"block_size": 2}, ValueError, "value must have head_dim"),
])
def test_errors(fn, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fn(*args, **kwargs)


def test_init_state_is_a_pytree():
    state = linear_attention_init_state(2, 3, 4, 5)
    assert isinstance(state, LinearAttentionState)
    assert [x.shape for x in jax.tree.leaves(state)] == [(2, 3, 4, 5), (2, 3, 4)]
