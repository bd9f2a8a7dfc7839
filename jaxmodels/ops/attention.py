"""Scaled dot-product attention (Vaswani et al. 2017, §3.2) with grouped-query heads and masking.

One entry point, `dot_product_attention`, with the arguments and semantics of
`jax.nn.dot_product_attention` plus `segment_ids` (packed sequences), and three interchangeable
implementations: a plain-jnp "reference", and jax.nn's "xla" and "cudnn" kernels.
"""

import functools
import numbers

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("reference", "xla", "cudnn")

# Score given to masked (query, key) pairs: finite, so that exp(masked - row_max) underflows to
# exactly 0 without inf - inf = nan; the same value jax.nn uses.
_MASKED_SCORE = -0.7 * float(np.finfo(np.float32).max)


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                          segment_ids=None, local_window_size=None, implementation=None) -> jax.Array:
    r"""Attention(Q, K, V) = softmax(Q Kᵀ · scale + bias) V  (Vaswani et al. 2017, eq. 1), per head.

    Shapes (letters as in `jax.nn.dot_product_attention`): B batch, T query length, S key/value
    length, N query heads, K key/value heads, H head dim.

    Args:
      query: (B, T, N, H) float array.
      key, value: (B, S, K, H), same dtype as `query`. N must be a multiple of K: query head n reads
        key/value head n // (N // K) -- multi-head (K = N), grouped-query (Ainslie et al. 2023) and
        multi-query (K = 1, Shazeer 2019) attention.
      bias: optional additive score bias, broadcastable to (B, N, T, S) (at most 4-D, each dim 1 or
        full, leading dims may be omitted).
      mask: optional boolean, broadcastable to (B, N, T, S) like `bias`; True = may attend.
        The KV-cache form (B, 1, T, S) (query positions vs cache slots) is broadcast over heads;
        "reference" never materialises it per head.
      scale: score multiplier, default 1/sqrt(H). The dot product of two vectors with H independent
        zero-mean unit-variance components has variance H; 1/sqrt(H) brings the logits back to unit
        variance so the softmax does not saturate into vanishing gradients (Vaswani et al. 2017,
        §3.2.1 and footnote 4).
      is_causal: query i attends to keys j <= i (query and key positions both start at 0, as in
        jax.nn; for T != S this is the top-left-aligned triangle).
      segment_ids: int (B, T) ids used for queries and keys (requires T == S), or a pair
        (query_segment_ids (B, T), kv_segment_ids (B, S)); query i attends key j only where the
        ids are equal (packed sequences).
      local_window_size: int w or (left, right), non-negative: query i attends keys j with
        i - left <= j <= i + right; w means (w, w).
      implementation: None, "reference", "xla" or "cudnn".
        "reference": plain jnp, below. "xla" / "cudnn": `jax.nn.dot_product_attention` with that
        implementation (segment ids become a boolean mask; "cudnn" needs an NVIDIA GPU, fp16/bf16
        inputs, and left-only windows unless causal). None: "cudnn" where cuDNN takes the inputs,
        else "xla" (see `_select_implementation`).

    Returns:
      (B, T, N, H) in `query`'s dtype.

    Numerics of "reference": scores Q Kᵀ accumulate in float32 (float64 for float64 inputs), bias
    and masks are applied and the softmax is taken in that precision; the probabilities are cast to
    `value`'s dtype for the PV product, which accumulates in float32 (float64 for float64 inputs);
    the result is cast to `query`'s dtype. This matches jax.nn's "xla" up to that last product,
    whose result jax.nn keeps in `value`'s dtype. Matmul precision follows
    `jax.default_matmul_precision` (relevant for float32 on GPU/TPU).

    Fully masked query rows (no key allowed by mask, causality, window and segments together):
      "reference" returns zeros there, with zero gradient.
      "xla" (jax.nn, checked on jax 0.10.2) gives every key of that row the same large negative
        score, so the softmax is uniform and the row is the mean of all S values (bias ignored);
        its gradients w.r.t. query, key and bias are zero there.
      "cudnn" adds a large negative bias instead of masking; its output there is
        implementation-defined.
      Rows with at least one allowed key agree across implementations.

    Raises:
      ValueError / TypeError (at trace time) for wrong ranks or shapes, mismatched dtypes,
      N not a multiple of K, a non-boolean mask, bad segment_ids or local_window_size, or an
      unknown implementation.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    _check_qkv(query, key, value)
    batch, q_len, num_heads, head_dim = query.shape
    kv_len = key.shape[1]
    scores_shape = (batch, num_heads, q_len, kv_len)
    if bias is not None:
        bias = _as_scores_operand(jnp.asarray(bias), scores_shape, "bias")
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask must be boolean (True = attend), got dtype {mask.dtype}; "
                            "pass additive masks as bias")
        mask = _as_scores_operand(mask, scores_shape, "mask")
    segment_ids = _split_segment_ids(segment_ids, batch, q_len, kv_len)
    local_window = _window(local_window_size)
    if implementation is None:
        implementation = _select_implementation(
            _platform(), query.dtype, head_dim, q_len, kv_len,
            masked_or_biased=bias is not None or mask is not None or segment_ids is not None,
            is_causal=is_causal, local_window=local_window)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")
    scale = head_dim**-0.5 if scale is None else scale

    if implementation == "reference":
        mask = _combine_masks(mask, q_len, kv_len, is_causal=is_causal, local_window=local_window,
                              segment_ids=segment_ids)
        return _reference_attention(query, key, value, bias, mask, scale)
    mask = _combine_masks(mask, q_len, kv_len, is_causal=False, local_window=None, segment_ids=segment_ids)
    if implementation == "cudnn":  # cuDNN wants the bias (mask included) full-size in T and S
        bias, mask = [None if x is None else jnp.broadcast_to(x, x.shape[:2] + (q_len, kv_len))
                      for x in (bias, mask)]
    return jax.nn.dot_product_attention(query, key, value, bias, mask, scale=scale, is_causal=is_causal,
                                        local_window_size=local_window, implementation=implementation)


def _reference_attention(query, key, value, bias, mask, scale):
    """softmax(Q Kᵀ · scale + bias) V with grouped heads, written out in jnp.

    query (B, T, N, H); key, value (B, S, K, H); bias, mask None or 4-D broadcastable to (B, N, T, S).
    Query heads are viewed as (K, G = N // K) so each key/value head serves its G query heads
    without being repeated.
    """
    batch, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    acc_dtype = jnp.promote_types(query.dtype, jnp.float32)
    q = query.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, key, preferred_element_type=acc_dtype)
    scores = scores * jnp.asarray(scale, acc_dtype)
    if bias is not None:
        scores = scores + _group_heads(bias, num_kv_heads).astype(acc_dtype)
    if mask is not None:
        mask = _group_heads(mask, num_kv_heads)
        scores = jnp.where(mask, scores, _MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1)
    if mask is not None:
        # A no-op on rows with an allowed key (exp(_MASKED_SCORE - row max) underflowed to exactly 0);
        # turns fully masked rows, which the softmax made uniform, into zeros.
        probs = jnp.where(mask, probs, 0.0)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(value.dtype), value, preferred_element_type=acc_dtype)
    return out.reshape(query.shape).astype(query.dtype)


def _group_heads(x, num_kv_heads):
    """(b, n, t, s) with n in {1, N} -> (b, K, G, t, s), or (b, 1, 1, t, s) when n == 1."""
    b, n, t, s = x.shape
    if n == 1:
        return x[:, :, None]
    return x.reshape(b, num_kv_heads, n // num_kv_heads, t, s)


def _combine_masks(mask, q_len, kv_len, *, is_causal, local_window, segment_ids):
    """AND of the given mask and the causal / local-window / segment masks, as one boolean array
    broadcastable to (B, N, T, S); None when nothing is masked."""
    q_pos = jnp.arange(q_len)[:, None]
    kv_pos = jnp.arange(kv_len)[None, :]
    masks = [] if mask is None else [mask]
    if is_causal:
        masks.append((kv_pos <= q_pos)[None, None])
    if local_window is not None:
        left, right = local_window
        masks.append(((q_pos - left <= kv_pos) & (kv_pos <= q_pos + right))[None, None])
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids
        masks.append(q_ids[:, None, :, None] == kv_ids[:, None, None, :])
    return functools.reduce(jnp.logical_and, masks) if masks else None


def _select_implementation(platform: str, dtype, head_dim: int, q_len: int, kv_len: int, *,
                           masked_or_biased: bool, is_causal: bool, local_window: tuple[int, int] | None) -> str:
    """"cudnn" where jax.nn's cuDNN flash attention accepts these inputs, else "xla".

    platform: "cuda", "rocm", "cpu", "tpu" (see `_platform`). cuDNN's conditions, from jax 0.10's
    `jax._src.cudnn.fused_attention_stablehlo` (`check_layout`, `check_is_flash_attention`) and
    `jax.nn.dot_product_attention`:
      - fp16 or bf16 inputs;
      - head_dim a multiple of 8 and <= 128 (256 is allowed on Hopper and later; not assumed here);
      - with a bias or mask (masks become an additive bias), the backward pass needs even T and S;
        we cannot know at trace time whether a gradient follows, so we ask for it always;
      - a local window with a right side only together with is_causal (which discards it).
    """
    supported = (
        platform == "cuda"
        and jnp.dtype(dtype) in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
        and head_dim % 8 == 0 and head_dim <= 128
        and (not masked_or_biased or (q_len % 2 == 0 and kv_len % 2 == 0))
        and (local_window is None or is_causal or local_window[1] == 0)
    )
    return "cudnn" if supported else "xla"


def _platform() -> str:
    """The default backend's platform, with "gpu" told apart into "cuda" / "rocm" (as jax's own
    cuDNN check does, from the backend's platform_version)."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    return "cuda" if "cuda" in jax.extend.backend.get_backend().platform_version.lower() else "rocm"


def _check_qkv(query, key, value):
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D (batch, length, heads, head_dim), got shape {x.shape}")
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape (B, S, K, H), got {key.shape} and {value.shape}")
    if query.shape[0] != key.shape[0]:
        raise ValueError(f"query and key must have the same batch size, got {query.shape} and {key.shape}")
    if query.shape[3] != key.shape[3]:
        raise ValueError(f"query and key must have the same head_dim, got {query.shape} and {key.shape}")
    if query.shape[2] % key.shape[2]:
        raise ValueError(f"number of query heads must be a multiple of key/value heads, "
                         f"got {query.shape[2]} query heads and {key.shape[2]} key/value heads")
    if not jnp.issubdtype(query.dtype, jnp.floating):
        raise TypeError(f"query, key and value must be floating point, got {query.dtype}")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"query, key and value must have one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")


def _as_scores_operand(x, scores_shape, name):
    """Check that x broadcasts to (B, N, T, S) dim by dim (each 1 or full) and return it 4-D."""
    if x.ndim > 4 or any(d not in (1, full) for d, full in zip(x.shape[::-1], scores_shape[::-1])):
        raise ValueError(f"{name} must be broadcastable to (B, N, T, S) = {scores_shape} "
                         f"(each dim 1 or full), got shape {x.shape}")
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _split_segment_ids(segment_ids, batch, q_len, kv_len):
    """None, (B, T) ids or a pair ((B, T), (B, S)) -> None or the pair, checked."""
    if segment_ids is None:
        return None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(f"segment_ids must be an array or a pair (query_ids, kv_ids), "
                             f"got a sequence of {len(segment_ids)}")
        q_ids, kv_ids = map(jnp.asarray, segment_ids)
    elif q_len != kv_len:
        raise ValueError(f"a single segment_ids array needs T == S, got T={q_len}, S={kv_len}; "
                         "pass (query_segment_ids, kv_segment_ids)")
    else:
        q_ids = kv_ids = jnp.asarray(segment_ids)
    for name, ids, length in (("query", q_ids, q_len), ("key/value", kv_ids, kv_len)):  # (B, T), (B, S)
        if ids.shape != (batch, length):
            raise ValueError(f"{name} segment_ids must have shape {(batch, length)}, got {ids.shape}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"segment_ids must be integers, got {ids.dtype}")
    return q_ids, kv_ids


def _window(local_window_size):
    """None, w or (left, right) with non-negative ints -> None or (left, right)."""
    if local_window_size is None:
        return None
    window = (local_window_size,) * 2 if isinstance(local_window_size, numbers.Integral) else local_window_size
    if not (isinstance(window, (tuple, list)) and len(window) == 2
            and all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 0 for w in window)):
        raise ValueError(f"local_window_size must be a non-negative int or a pair (left, right) of them, "
                         f"got {local_window_size!r}")
    return int(window[0]), int(window[1])
