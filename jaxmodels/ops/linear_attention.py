"""Linear-time attention: kernelised linear attention, Performer (FAVOR+) and TransNormer.

Shapes follow `jax.nn.dot_product_attention` and `jaxmodels.ops.attention`: B batch, T query
length, S key/value length, N query heads, K key/value heads (N a multiple of K: query head n
reads key/value head n // (N // K)), H query/key head dim, Hv value head dim, F feature dim.

All linear forms share one computation, `_kernel_attention`: Σ_j [j ≤ i if causal] (φ(q_i)·φ(k_j)) v_j
in one of three forms --

  form                                  memory (per batch and key/value head)
  non-causal: φ(Q) (φ(K)ᵀ V)             O(F·Hv) summary + O((T + S)·(F + Hv)) inputs/outputs
  causal, chunk_size=None: prefix sums   O(T·F·Hv): every prefix state is materialised; small sizes only
  causal, chunk_size=c: chunked          O(c²) scores per chunk + one O(F·Hv) state carried by lax.scan
                                         (reverse mode keeps the T/c chunk-boundary states: O(T/c·F·Hv))

-- and the softmax-normalised methods (linear attention, Performer) divide by the same sum over a
column of ones appended to V, while NormAttention (TransNormer) drops that denominator and
RMS-normalises instead. Features, states and sums are float32 (float64 for float64 inputs);
outputs come back in `query`'s dtype. Matmul precision follows `jax.default_matmul_precision`.
"""

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxmodels.ops.attention import dot_product_attention
from jaxmodels.ops.checks import check_qkv, one_of, positive_int

FEATURE_MAPS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # Katharopoulos et al. 2020, §3.2.1: elu(x) + 1 > 0, so every denominator is positive.
    "elu": lambda x: jax.nn.elu(x) + 1,
    # Non-negative; a query whose features are all zero gets a zero output (the eps guards 0 / 0).
    "relu": jax.nn.relu,
}
# "identity" is deliberately absent: φ(q)·Σ φ(k) can be zero or negative, so the normalised output
# is unbounded. A callable feature map is the way to pass anything else.


class LinearAttentionState(NamedTuple):
    """Recurrent state of causal linear attention (Katharopoulos et al. 2020, §3.4).

    s: (B, K, F, Hv) float32, s_i = Σ_{j ≤ i} φ(k_j) v_jᵀ.
    z: (B, K, F) float32, z_i = Σ_{j ≤ i} φ(k_j).
    """
    s: jax.Array
    z: jax.Array


def linear_attention(query, key, value, *, feature_map="elu", causal=False, chunk_size=None,
                     eps=1e-6) -> jax.Array:
    r"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs", §3.2-3.3).

    out_i = φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / (φ(q_i)ᵀ Σ_j φ(k_j) + eps), over j ≤ i if `causal`:
    softmax's exp(q·k) replaced by the kernel φ(q)·φ(k), so the key/value summary Σ_j φ(k_j) v_jᵀ is
    computed once and attention costs O(T·F·Hv) instead of O(T·S·Hv).

    Args:
      query: (B, T, N, H) float array.
      key: (B, S, K, H), value: (B, S, K, Hv), same dtype as `query`; N a multiple of K (grouped heads).
      feature_map: a name in FEATURE_MAPS ("elu": elu(x) + 1, the paper's choice; "relu"), or a
        callable mapping (B, L, heads, H) float32 to non-negative (B, L, heads, F), applied to query
        and key alike.
      causal: query i attends keys j <= i (needs T == S).
      chunk_size: causal form only (ignored when not causal). None: prefix sums of the (F, Hv)
        states, O(T·F·Hv) memory. c >= 1: chunked form, quadratic masked attention inside each chunk
        of c positions plus a state carried across chunks (T need not be a multiple of c).
      eps: added to the denominator.

    Returns:
      (B, T, N, Hv) in `query`'s dtype. All forms equal the masked quadratic form
      Σ_j [j ≤ i] (φ(q_i)·φ(k_j)) v_j / (Σ_j [j ≤ i] φ(q_i)·φ(k_j) + eps) up to rounding.

    Raises:
      ValueError / TypeError for wrong ranks or shapes, mismatched dtypes, N not a multiple of K,
      causal with T != S, an unknown feature map, or a chunk_size that is not a positive int.
    """
    query, key, value = _check_qkv(query, key, value, causal=causal)
    positive_int("chunk_size", chunk_size, allow_none=True)
    phi_q, phi_k = _features(feature_map, query, key)
    return _normalised_kernel_attention(phi_q, phi_k, value, causal, chunk_size, eps).astype(query.dtype)


def linear_attention_init_state(batch, num_kv_heads, head_dim, value_dim) -> LinearAttentionState:
    """Zero state for `linear_attention_step`: s (B, K, F, Hv) and z (B, K, F), float32.

    `head_dim` is the feature dimension F (= H for the element-wise maps in FEATURE_MAPS).
    """
    for name, n in (("batch", batch), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                    ("value_dim", value_dim)):
        positive_int(name, n)
    return LinearAttentionState(s=jnp.zeros((batch, num_kv_heads, head_dim, value_dim), jnp.float32),
                                z=jnp.zeros((batch, num_kv_heads, head_dim), jnp.float32))


def linear_attention_step(state, query, key, value, *, feature_map="elu",
                          eps=1e-6) -> tuple[jax.Array, LinearAttentionState]:
    r"""One decoding step of causal linear attention as an RNN (Katharopoulos et al. 2020, §3.4).

    s_i = s_{i-1} + φ(k_i) v_iᵀ,  z_i = z_{i-1} + φ(k_i),  out_i = φ(q_i)ᵀ s_i / (φ(q_i)ᵀ z_i + eps).
    Running it over a sequence from `linear_attention_init_state` gives causal `linear_attention`,
    at O(F·Hv) memory and time per token whatever the position.

    Args:
      state: LinearAttentionState with s (B, K, F, Hv), z (B, K, F) float32.
      query: (B, 1, N, H); key: (B, 1, K, H); value: (B, 1, K, Hv); one dtype, N a multiple of K.
      feature_map, eps: as in `linear_attention`.

    Returns:
      (out (B, 1, N, Hv) in `query`'s dtype, the new state).
    """
    numerator, denominator, state = _recurrent_step(state, query, key, value, feature_map, "linear_attention_step")
    out = numerator / (denominator[..., None] + eps)
    return out.reshape(query.shape[:3] + (value.shape[3],)).astype(query.dtype), state


def norm_attention_step(state, query, key, value, *, feature_map="elu",
                        eps=1e-6) -> tuple[jax.Array, LinearAttentionState]:
    r"""One decoding step of causal NormAttention (TransNormer, Qin et al. 2022) as an RNN:
    s_i = s_{i-1} + φ(k_i) v_iᵀ, out_i = RMSNorm(φ(q_i)ᵀ s_i). Running it over a sequence from
    `linear_attention_init_state` gives causal `norm_attention`. Shapes and arguments as
    `linear_attention_step` (the state's z is carried along, unused).
    """
    numerator, _, state = _recurrent_step(state, query, key, value, feature_map, "norm_attention_step")
    out = numerator * lax.rsqrt(jnp.mean(jnp.square(numerator), axis=-1, keepdims=True) + eps)
    return out.reshape(query.shape[:3] + (value.shape[3],)).astype(query.dtype), state


def _recurrent_step(state, query, key, value, feature_map, name):
    """The shared recurrence of the step functions: s += φ(k) vᵀ, z += φ(k); returns
    (φ(q)ᵀ s (B, K, G, Hv), φ(q)ᵀ z (B, K, G), new state)."""
    query, key, value = _check_qkv(query, key, value, causal=False)
    if query.shape[1] != 1 or key.shape[1] != 1:
        raise ValueError(f"{name} takes one token, got query length {query.shape[1]} "
                         f"and key length {key.shape[1]}")
    phi_q, phi_k = _features(feature_map, query, key)
    batch, _, num_kv_heads, features = phi_k.shape
    expected = ((batch, num_kv_heads, features, value.shape[3]), (batch, num_kv_heads, features))
    if (state.s.shape, state.z.shape) != expected:
        raise ValueError(f"state must have s {expected[0]} and z {expected[1]} (B, K, F, Hv) for these inputs, "
                         f"got s {state.s.shape} and z {state.z.shape}")
    phi_k, v = phi_k[:, 0], value[:, 0].astype(phi_k.dtype)                   # (B, K, F), (B, K, Hv)
    s = state.s + jnp.einsum("bkf,bkv->bkfv", phi_k, v).astype(state.s.dtype)  # the state keeps its dtype
    z = state.z + phi_k.astype(state.z.dtype)
    phi_q = _group(phi_q, num_kv_heads)[:, 0]                                  # (B, K, G, F)
    return (jnp.einsum("bkgf,bkfv->bkgv", phi_q, s), jnp.einsum("bkgf,bkf->bkg", phi_q, z),
            LinearAttentionState(s, z))


@functools.partial(jax.jit, static_argnames=("num_features", "head_dim"))
def orthogonal_random_features(key, num_features, head_dim) -> jax.Array:
    """Orthogonal random features ω_1..ω_m for FAVOR+ (Choromanski et al. 2021, "Rethinking
    Attention with Performers", §2.4, and `gaussian_orthogonal_random_matrix` in their code).

    Rows come in blocks of `head_dim` exactly orthogonal directions, each block the Q of a QR
    factorisation of a Gaussian matrix (with the signs of R's diagonal folded in, so that Q is Haar
    distributed; Mezzadri 2007); the last block is cut to fill `num_features`. Each row is then
    rescaled to the norm of an independent Gaussian vector (chi distribution with head_dim degrees
    of freedom), so every row is marginally N(0, I) -- which keeps the softmax-kernel estimate
    unbiased -- while rows within a block stay orthogonal, which lowers its variance.

    Args:
      key: a jax.random key.
      num_features: m >= 1, any value (need not be a multiple of head_dim).
      head_dim: H >= 1.

    Returns:
      (m, H) float32 projection. Drawing with a new key is the paper's feature redraw.
    """
    positive_int("num_features", num_features)
    positive_int("head_dim", head_dim)
    num_blocks = -(-num_features // head_dim)
    block_key, norm_key = jax.random.split(key)
    q, r = jnp.linalg.qr(jax.random.normal(block_key, (num_blocks, head_dim, head_dim), jnp.float32))
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    directions = jnp.swapaxes(q, -1, -2).reshape(num_blocks * head_dim, head_dim)[:num_features]
    norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, head_dim), jnp.float32), axis=-1)
    return directions * norms[:, None]


def performer_features(x, projection, *, is_query, causal=False) -> jax.Array:
    r"""Positive random features for the softmax kernel (Choromanski et al. 2021, FAVOR+, §2.3, Lemma 1).

    φ(x)_r = exp(ω_rᵀx − |x|²/2 − c) / sqrt(m), r = 1..m: every feature is positive, and without the
    stabiliser c, E[φ(x)ᵀφ(y)] = exp(xᵀy) for ω_r ~ N(0, I) (orthogonal rows keep this, with less variance).

    The stabiliser c is the maximum of the exponent ω_rᵀx − |x|²/2 -- per row (over r) for queries,
    and over all positions and features of each (batch, head) for keys, as the paper's code does
    (there the key maximum spans the whole array; here examples and heads do not interact, and
    |x|²/2 is inside the maximum so that the largest feature is exactly 1/sqrt(m)). A per-query
    constant cancels between the numerator and denominator of attention, and so does one constant
    shared by all keys; c is treated as a constant (stop_gradient). For causal attention a maximum
    over all keys would let later keys change earlier outputs in floating point (through underflow
    and the eps of the denominator), so with `causal` the keys get c = 0: strictly causal, and the
    exponent ω_rᵀx − |x|²/2 <= |ω_r|²/2 cannot overflow float32 while |ω_r|² < 176 (orthogonal
    features have |ω_r|² ~ H: fine for head dims up to ~128). The largest feature may then exceed 1/sqrt(m).

    Args:
      x: (B, L, heads, H) float array (already multiplied by scale^½ for attention).
      projection: (m, H), e.g. from `orthogonal_random_features`.
      is_query: choose the per-row (query) or shared (key) stabiliser.
      causal: keys only: no stabiliser (c = 0, see above).

    Returns:
      (B, L, heads, m) float32 (float64 for float64 inputs).
    """
    x = jnp.asarray(x)
    projection = jnp.asarray(projection)
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D (batch, length, heads, head_dim), got shape {x.shape}")
    if projection.ndim != 2 or projection.shape[1] != x.shape[3]:
        raise ValueError(f"projection must have shape (num_features, head_dim={x.shape[3]}), got {projection.shape}")
    acc_dtype = _acc_dtype(x)
    x = x.astype(acc_dtype)
    exponent = (jnp.einsum("blnh,mh->blnm", x, projection.astype(acc_dtype))
                - 0.5 * jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    if causal and not is_query:
        stabiliser = 0.0
    else:
        stabiliser = lax.stop_gradient(jnp.max(exponent, axis=-1 if is_query else (1, 3), keepdims=True))
    return jnp.exp(exponent - stabiliser) / math.sqrt(projection.shape[0])


def performer_attention(query, key, value, projection, *, causal=False, chunk_size=None, scale=None,
                        eps=1e-6) -> jax.Array:
    r"""Performer attention, FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers").

    Linear attention (see `linear_attention`) with the positive random features of
    `performer_features` applied to q·scale^½ and k·scale^½: since E[φ(q')ᵀφ(k')] ∝ exp(q·k·scale),
    the result approximates softmax(Q Kᵀ · scale) V, the better the more features m (error
    O(1/sqrt(m))), and equals exactly the masked quadratic form with the same features.

    Feature redraw (used in the paper's experiments, §4): the projection is an argument, so a layer
    redraws its features by drawing a new projection, `orthogonal_random_features(new_key, m, H)`
    (e.g. from `jax.random.fold_in(key, step // redraw_interval)`), and passing it here.

    Args:
      query: (B, T, N, H); key: (B, S, K, H); value: (B, S, K, Hv); one float dtype, N a multiple of K.
      projection: (m, H) random features, e.g. `orthogonal_random_features(key, m, H)`.
      causal, chunk_size, eps: as in `linear_attention` (the same shared machinery).
      scale: softmax temperature, default 1/sqrt(H).

    Returns:
      (B, T, N, Hv) in `query`'s dtype.
    """
    query, key, value = _check_qkv(query, key, value, causal=causal)
    positive_int("chunk_size", chunk_size, allow_none=True)
    acc_dtype = _acc_dtype(query)
    root_scale = math.sqrt(query.shape[3] ** -0.5 if scale is None else scale)
    phi_q = performer_features(query.astype(acc_dtype) * root_scale, projection, is_query=True)
    phi_k = performer_features(key.astype(acc_dtype) * root_scale, projection, is_query=False, causal=causal)
    return _normalised_kernel_attention(phi_q, phi_k, value, causal, chunk_size, eps).astype(query.dtype)


def norm_attention(query, key, value, *, causal=False, chunk_size=None, feature_map="elu",
                   eps=1e-6) -> jax.Array:
    r"""NormAttention of TransNormer (Qin et al. 2022, "The Devil in Linear Transformer").

    out_i = RMSNorm(Σ_j φ(q_i)·φ(k_j) v_j), over j ≤ i if `causal`: linear attention without the
    denominator φ(q_i)·Σ_j φ(k_j), whose gradients the paper shows to be unbounded; a normalisation
    of the output over the value dim bounds the scale instead. RMSNorm(x) = x / sqrt(mean(x²) + eps),
    per query head, parameter-free here (the layer applies its learned gain).

    Args:
      query: (B, T, N, H); key: (B, S, K, H); value: (B, S, K, Hv); one float dtype, N a multiple of K.
      causal, chunk_size, feature_map: as in `linear_attention` (the same shared machinery).
      eps: inside the RMSNorm's square root.

    Returns:
      (B, T, N, Hv) in `query`'s dtype.
    """
    query, key, value = _check_qkv(query, key, value, causal=causal)
    positive_int("chunk_size", chunk_size, allow_none=True)
    phi_q, phi_k = _features(feature_map, query, key)
    out = _kernel_attention(phi_q, phi_k, value.astype(phi_q.dtype), causal, chunk_size)
    out = out * lax.rsqrt(jnp.mean(jnp.square(out), axis=-1, keepdims=True) + eps)
    return out.astype(query.dtype)


def diagonal_block_attention(query, key, value, *, block_size, causal=False) -> jax.Array:
    r"""DiagAttention of TransNormer (Qin et al. 2022, "The Devil in Linear Transformer").

    Softmax attention restricted to non-overlapping diagonal blocks: position i attends position j
    only if i // block_size == j // block_size (and j <= i if `causal`) -- the local attention that
    TransNormer's lower layers use against attention dilution. Computed blockwise: the sequence is
    reshaped into T / block_size blocks, each attended with `jaxmodels.ops.attention.dot_product_attention`,
    so memory is O(T · block_size) per head, never O(T²). A T that is not a multiple of block_size is
    zero-padded and the padded keys are masked out.

    Args:
      query: (B, T, N, H); key, value: (B, T, K, H); one float dtype, N a multiple of K.
      block_size: positive int.
      causal: also mask keys after the query inside each block.

    Returns:
      (B, T, N, H) in `query`'s dtype, with scale 1/sqrt(H).
    """
    query, key, value = _check_qkv(query, key, value, causal=False)
    positive_int("block_size", block_size)
    batch, length, num_heads, head_dim = query.shape
    if key.shape[1] != length:
        raise ValueError(f"diagonal blocks pair query and key positions: query and key must have one length, "
                         f"got T={length}, S={key.shape[1]}")
    if value.shape[3] != head_dim:
        raise ValueError(f"value must have head_dim {head_dim} like query and key, got shape {value.shape}")
    pad = -length % block_size
    num_blocks = (length + pad) // block_size

    def to_blocks(x):  # (B, T, h, H) -> (B * num_blocks, block_size, h, H)
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape((batch * num_blocks, block_size) + x.shape[2:])

    mask = None
    if pad:
        key_is_real = (jnp.arange(num_blocks * block_size) < length).reshape(1, num_blocks, 1, 1, block_size)
        mask = jnp.broadcast_to(key_is_real, (batch,) + key_is_real.shape[1:])
        mask = mask.reshape(batch * num_blocks, 1, 1, block_size)  # (B * blocks, 1, 1, block): padded keys False
    out = dot_product_attention(to_blocks(query), to_blocks(key), to_blocks(value), mask=mask, is_causal=causal)
    return out.reshape(batch, num_blocks * block_size, num_heads, head_dim)[:, :length]


def _normalised_kernel_attention(phi_q, phi_k, value, causal, chunk_size, eps):
    """Σ_j φq_i·φk_j v_j / (Σ_j φq_i·φk_j + eps): the denominator rides along as a column of ones
    appended to V, so one pass of `_kernel_attention` gives both. Returns (B, T, N, Hv) float32."""
    v = value.astype(phi_q.dtype)
    v = jnp.concatenate([v, jnp.ones(v.shape[:3] + (1,), v.dtype)], axis=-1)
    out = _kernel_attention(phi_q, phi_k, v, causal, chunk_size)
    return out[..., :-1] / (out[..., -1:] + eps)


def _kernel_attention(phi_q, phi_k, v, causal, chunk_size):
    """Σ_j [j ≤ i if causal] (φq_i·φk_j) v_j with grouped heads.

    phi_q (B, T, N, F), phi_k (B, S, K, F), v (B, S, K, D), one float dtype -> (B, T, N, D).
    """
    batch, length, num_heads, _ = phi_q.shape
    num_kv_heads = phi_k.shape[2]
    phi_q = _group(phi_q, num_kv_heads)                                        # (B, T, K, G, F)
    if not causal:
        out = jnp.einsum("btkgf,bkfd->btkgd", phi_q, jnp.einsum("bskf,bskd->bkfd", phi_k, v))
    elif chunk_size is None:
        prefix_states = jnp.cumsum(jnp.einsum("bskf,bskd->bskfd", phi_k, v), axis=1)  # (B, T, K, F, D)
        out = jnp.einsum("btkgf,btkfd->btkgd", phi_q, prefix_states)
    else:
        out = _chunked_causal(phi_q, phi_k, v, min(chunk_size, length))
    return out.reshape(batch, length, num_heads, v.shape[-1])


def _chunked_causal(phi_q, phi_k, v, chunk_size):
    """Causal Σ_{j ≤ i} (φq_i·φk_j) v_j, chunk by chunk: within a chunk the masked quadratic form,
    across chunks the state Σ φk vᵀ of all earlier chunks, carried by `lax.scan`.

    phi_q (B, T, K, G, F), phi_k (B, T, K, F), v (B, T, K, D) -> (B, T, K, G, D). T is zero-padded to
    a multiple of chunk_size; padded keys have zero features and values, so they add nothing.
    """
    length = phi_q.shape[1]
    pad = -length % chunk_size
    num_chunks = (length + pad) // chunk_size

    def to_chunks(x):  # (B, T, ...) -> (num_chunks, B, chunk_size, ...)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((x.shape[0], num_chunks, chunk_size) + x.shape[2:]), 1, 0)

    causal_mask = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))

    def chunk_step(state, chunk):  # state (B, K, F, D): Σ φk vᵀ over the earlier chunks
        q_c, k_c, v_c = chunk
        scores = jnp.where(causal_mask, jnp.einsum("bikgf,bjkf->bkgij", q_c, k_c), 0)
        out = jnp.einsum("bkgij,bjkd->bikgd", scores, v_c) + jnp.einsum("bikgf,bkfd->bikgd", q_c, state)
        return state + jnp.einsum("bjkf,bjkd->bkfd", k_c, v_c), out

    batch, _, num_kv_heads, features = phi_k.shape
    state = jnp.zeros((batch, num_kv_heads, features, v.shape[-1]), v.dtype)
    _, out = lax.scan(chunk_step, state, (to_chunks(phi_q), to_chunks(phi_k), to_chunks(v)))
    out = jnp.moveaxis(out, 0, 1)                                              # (B, num_chunks, c, K, G, D)
    return out.reshape((out.shape[0], num_chunks * chunk_size) + out.shape[3:])[:, :length]


def _group(x, num_kv_heads):
    """(B, L, N, F) -> (B, L, K, G = N // K, F): query head n = k * G + g reads key/value head k."""
    b, l, n, f = x.shape
    return x.reshape(b, l, num_kv_heads, n // num_kv_heads, f)


def _acc_dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)


def _features(feature_map, query, key):
    """φ(query) (B, T, N, F), φ(key) (B, S, K, F) in float32 (float64 for float64 inputs), for a
    name in FEATURE_MAPS or a callable; a callable must keep (B, L, heads) and give one F."""
    if not callable(feature_map):
        feature_map = FEATURE_MAPS[one_of("feature_map", feature_map, sorted(FEATURE_MAPS))]
    acc_dtype = _acc_dtype(query)
    phi_q, phi_k = feature_map(query.astype(acc_dtype)), feature_map(key.astype(acc_dtype))
    if (phi_q.ndim != 4 or phi_k.ndim != 4 or (phi_q.shape[:3], phi_k.shape[:3]) != (query.shape[:3], key.shape[:3])
            or phi_q.shape[3] != phi_k.shape[3]):
        raise ValueError(f"feature_map must map (B, L, heads, H) to (B, L, heads, F) with one F for query and key, "
                         f"got {query.shape} -> {phi_q.shape} and {key.shape} -> {phi_k.shape}")
    return phi_q, phi_k


def _check_qkv(query, key, value, *, causal):
    """Check query (B, T, N, H), key (B, S, K, H), value (B, S, K, Hv) (`checks.check_qkv` with any Hv) and,
    when causal, T == S; return them as arrays."""
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    check_qkv(query, key, value, value_head_dim_free=True)
    if causal and query.shape[1] != key.shape[1]:
        raise ValueError(f"causal attention needs query and key of one length, "
                         f"got T={query.shape[1]}, S={key.shape[1]}")
    return query, key, value

