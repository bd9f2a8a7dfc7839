"""Attention of the Gated Attention Unit and FLASH (Hua et al. 2022, "Transformer Quality in Linear Time").

GAU attention is single-headed, so its arrays are channels-last: queries/keys (B, T, s) with the
small shared dim s, values (B, S, E) with the expanded dim E. Two score functions:

  "relu2"   A = relu(Q Kᵀ · scale + bias)²  with scale = 1/n, n the sequence length (the paper's
            squared-ReLU attention, §2, with a relative position bias in its pseudocode);
  "softmax" A = softmax(Q Kᵀ · scale + bias) with scale = 1/sqrt(s), the usual softmax attention
            the paper compares relu² with.

`mixed_chunk_attention` is FLASH's linear-time approximation (§3.2): relu² attention inside chunks
of c tokens plus linear attention across chunks.
"""


import jax
import jax.numpy as jnp

from jaxmodels.ops.checks import MASKED_SCORE, one_of, positive_int

SCORES = ("relu2", "softmax")


def gau_attention(q, k, v, *, scores: str = "relu2", causal: bool = False, mask=None, bias=None,
                  scale=None) -> jax.Array:
    r"""O = A V with A = relu²(Q Kᵀ · scale + bias) or softmax(Q Kᵀ · scale + bias) (Hua et al. 2022, §2).

    Args:
      q, k: (B, T, s) and (B, S, s) float, one dtype with `v`.
      v: (B, S, E).
      scores: "relu2" (the paper's squared ReLU) or "softmax".
      causal: query i attends keys j <= i (positions start at 0 for both, as in
        `jaxmodels.ops.attention.dot_product_attention`).
      mask: optional boolean broadcastable to (B, T, S) (each dim 1 or full); True = may attend.
      bias: optional additive score bias broadcastable to (B, T, S), e.g. a relative position bias.
      scale: score multiplier. Default for "relu2": 1/S, the paper's 1/n with n the sequence length.
        With `causal` (or a mask) this is the paper's choice too: the same 1/n for every row rather
        than 1/(i + 1) for the i + 1 keys row i sees. Masking only zeroes A after the relu², so a
        causal row is the non-causal row with its future terms removed, and the scale does not
        depend on the position. Default for "softmax": 1/sqrt(s) (Vaswani et al. 2017).

    Returns:
      (B, T, E) in `v`'s dtype. Scores and A are float32 (float64 for float64 inputs); A is cast
      to `v`'s dtype for the A V product, which accumulates in float32. Masked entries have A = 0;
      a query row with no allowed key returns zeros (for both score functions).
    """
    q, k, v = _check_qkv(q, k, v)
    shape = (q.shape[0], q.shape[1], k.shape[1])
    mask, bias = _as_operand(mask, shape, "mask"), _as_operand(bias, shape, "bias")
    if mask is not None and mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be boolean (True = attend), got dtype {mask.dtype}; pass additive masks as bias")
    weights = _weights(q, k, scores=scores, causal=causal, mask=mask, bias=bias, scale=scale)
    return _weighted_sum(weights, v).astype(v.dtype)


def relu2_attention(q, k, v, *, causal: bool = False, mask=None, bias=None, scale=None) -> jax.Array:
    """`gau_attention` with the paper's squared-ReLU scores: relu²(Q Kᵀ / n + bias) V. Shapes as there."""
    return gau_attention(q, k, v, scores="relu2", causal=causal, mask=mask, bias=bias, scale=scale)


def mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, *, chunk_size: int, causal: bool = False,
                          bias=None) -> jax.Array:
    r"""FLASH mixed chunk attention (Hua et al. 2022, §3.2).

    The sequence is split into G = ceil(T / c) chunks of c = `chunk_size` tokens. For query i in
    chunk g:

      out_i = Σ_{j in chunk g}  relu²(q_quad_i · k_quad_j / c + bias_{ij}) v_j        (local, quadratic)
            + Σ_{j in chunks h} (q_lin_i · k_lin_j / T) v_j                            (global, linear)

    with h ranging over all chunks when not causal (q_lin_i (Σ_j k_lin_jᵀ v_j) / T, one global sum)
    and over the previous chunks h < g only when causal (an exclusive cumulative sum of the
    per-chunk k_linᵀ v, so no chunk sees itself or the future through the linear term; within its
    own chunk a causal query sees keys j <= i through the quadratic term). Scales: 1/c is GAU's 1/n
    for the c keys of a chunk; the linear term is divided by the sequence length T in both modes
    (for causal, the same fixed-n choice as `gau_attention`). Cost O(T·c·(s + E) + T·s·E).

    A T that is not a multiple of c is padded with zero values to G·c: a zero value adds nothing
    to either term, so no mask is needed, and the padded rows are dropped.

    Args:
      q_quad, k_quad, q_lin, k_lin: (B, T, s) float, one dtype with `v`.
      v: (B, T, E).
      chunk_size: c >= 1.
      causal: as above.
      bias: optional additive bias of the within-chunk scores, broadcastable to (B, G, c, c)
        (e.g. a (c, c) relative position bias shared by all chunks).

    Returns:
      (B, T, E) in `v`'s dtype; both terms accumulate in float32 and are cast once.
    """
    q_quad, k_quad, v = _check_qkv(q_quad, k_quad, v)
    q_lin, k_lin, _ = _check_qkv(q_lin, k_lin, v)
    if not q_quad.shape == k_quad.shape == q_lin.shape == k_lin.shape:
        raise ValueError(f"q_quad, k_quad, q_lin, k_lin must have one shape (B, T, s), got "
                         f"{q_quad.shape}, {k_quad.shape}, {q_lin.shape}, {k_lin.shape}")
    chunk_size = int(positive_int("chunk_size", chunk_size))
    batch, length, _ = v.shape
    num_chunks = -(-length // chunk_size)
    bias = _as_operand(bias, (batch, num_chunks, chunk_size, chunk_size), "bias")

    def chunked(x):  # (B, T, d) -> (B, G, c, d), zero-padded
        x = jnp.pad(x, ((0, 0), (0, num_chunks * chunk_size - length), (0, 0)))
        return x.reshape(batch, num_chunks, chunk_size, x.shape[-1])

    q_quad, k_quad, q_lin, k_lin, v = map(chunked, (q_quad, k_quad, q_lin, k_lin, v))
    weights = _weights(q_quad, k_quad, scores="relu2", causal=causal, mask=None, bias=bias, scale=1 / chunk_size)
    quadratic = _weighted_sum(weights, v)  # (B, G, c, E)

    acc_dtype = weights.dtype
    kv = jnp.einsum("bgjs,bgje->bgse", k_lin, v, preferred_element_type=acc_dtype) / length  # per chunk
    if causal:  # exclusive prefix sum over chunks: chunk g sees chunks 0 .. g-1
        kv = jnp.cumsum(jnp.concatenate([jnp.zeros_like(kv[:, :1]), kv[:, :-1]], axis=1), axis=1)
    else:
        kv = jnp.sum(kv, axis=1, keepdims=True)
    linear = jnp.einsum("bgis,bgse->bgie", q_lin.astype(acc_dtype), kv)

    out = (quadratic + linear).reshape(batch, num_chunks * chunk_size, -1)[:, :length]
    return out.astype(v.dtype)


def _weights(q, k, *, scores, causal, mask, bias, scale):
    """A (..., T, S) in float32 (float64 for float64 inputs) from q (..., T, s), k (..., S, s);
    mask / bias broadcastable to A. Masked entries (and causal future) are exactly 0."""
    one_of("scores", scores, SCORES)
    q_len, kv_len, dim = q.shape[-2], k.shape[-2], q.shape[-1]
    if scale is None:
        scale = 1 / kv_len if scores == "relu2" else dim**-0.5
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("...ts,...us->...tu", q, k, preferred_element_type=acc_dtype)
    logits = logits * jnp.asarray(scale, acc_dtype)
    if bias is not None:
        logits = logits + bias.astype(acc_dtype)
    if causal:
        causal_mask = jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None]
        mask = causal_mask if mask is None else mask & causal_mask
    if scores == "relu2":
        weights = jnp.square(jax.nn.relu(logits))
    else:
        weights = jax.nn.softmax(logits if mask is None else jnp.where(mask, logits, MASKED_SCORE), axis=-1)
    # relu²: zeroes masked entries. softmax: a no-op on rows with an allowed key (their masked
    # entries underflowed to 0), zeroes fully masked rows, which the softmax made uniform.
    return weights if mask is None else jnp.where(mask, weights, 0.0)


def _weighted_sum(weights, v):
    """weights (..., T, S) float32, v (..., S, E) -> (..., T, E) in weights' dtype, the product in v's dtype."""
    return jnp.einsum("...tu,...ue->...te", weights.astype(v.dtype), v, preferred_element_type=weights.dtype)


def _check_qkv(q, k, v):
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 3:
            raise ValueError(f"{name} must be 3-D (batch, length, dim), got shape {x.shape}")
    if q.shape[0] != k.shape[0] or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"q (B, T, s), k (B, S, s), v (B, S, E) must agree in B and S, "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same last dim s, got {q.shape} and {k.shape}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q, k and v must be floating point, got {q.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return q, k, v


def _as_operand(x, shape, name):
    """x as an array broadcastable to `shape` dim by dim (each 1 or full); None stays None."""
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.ndim > len(shape) or any(d not in (1, full) for d, full in zip(x.shape[::-1], shape[::-1])):
        raise ValueError(f"{name} must be broadcastable to {shape} (each dim 1 or full), got shape {x.shape}")
    return x
