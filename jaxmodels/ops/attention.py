"""Scaled dot-product attention (Vaswani et al. 2017, §3.2) with grouped-query heads and masking.

One entry point, `dot_product_attention`, with the arguments and semantics of
`jax.nn.dot_product_attention` plus `segment_ids` (packed sequences), ALiBi slopes and logit
soft-capping, and five interchangeable implementations: a plain-jnp "reference", jax.nn's "xla" and
"cudnn" kernels, "flash", the blockwise FlashAttention algorithm in pure JAX (also callable directly
as `flash_attention`, with its block sizes), and "pallas", FlashAttention-2 as Pallas Triton kernels
(`jaxmodels.ops.kernels.flash_attention`; callable directly as `pallas_attention`, with its blocks and
block-sparse layouts).
"""

import functools
import numbers
from typing import NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmodels.ops.checks import MASKED_SCORE, as_scores_operand, check_qkv, positive_int, real_in_range
from jaxmodels.ops.dispatch import backend_platform, check_implementation, fall_back
from jaxmodels.ops.kernels import flash_attention as pallas_kernels
from jaxmodels.ops.position import alibi_distance_bias

IMPLEMENTATIONS = ("reference", "xla", "cudnn", "flash", "pallas")


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                          segment_ids=None, local_window_size=None, alibi_slopes=None, logit_soft_cap=None,
                          implementation=None) -> jax.Array:
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
      alibi_slopes: optional (N,) float, ALiBi (Press et al. 2022): head n adds -alibi_slopes[n] · |i - j| to
        its scores (with is_causal this is the paper's -m·(i - j)); "pallas" computes it in the kernel, the
        others add it to `bias` as a (1, N, T, S) array. Not differentiated.
      logit_soft_cap: optional real c > 0: scores c · tanh(scale · q·k / c) before bias and ALiBi are added
        (Gemma 2, Team et al. 2024). "reference" and "pallas" only: the others fall back to "reference" with a
        one-time warning.
      implementation: None, "reference", "xla", "cudnn", "flash" or "pallas".
        "reference": plain jnp, below. "xla" / "cudnn": `jax.nn.dot_product_attention` with that
        implementation (segment ids become a boolean mask; "cudnn" needs an NVIDIA GPU, fp16/bf16
        inputs, and left-only windows unless causal). "flash": `flash_attention` with its default
        blocks (FLASH_BLOCK_Q x FLASH_BLOCK_K): blockwise, memory O((T + S)·H) per (batch, head)
        instead of O(T·S), numerics as "reference". None: `select_implementation`, measured: on an NVIDIA GPU
        "pallas" where the kernels run the case and it has a soft cap, or cuDNN would take it only through a
        dense bias (segment ids, ALiBi, a bias or mask broadcast in T or S), or it is long (T·S >= 2048²) and
        cuDNN cannot take it; "cudnn" where cuDNN takes the inputs; else "flash" for long sequences, else "xla",
        "reference" for a soft cap off the GPU and for float16 on the CPU. "cudnn" off an NVIDIA GPU or with
        inputs that are not fp16/bf16 falls back to None's choice with a one-time warning; its other limits
        (shapes, windows) are jax.nn's to report. "xla" with float16 on the CPU (whose compiled dot_general
        rejects it) falls back to "reference" with a one-time warning.
        "flash" needs T >= 1 and S >= 1 ("reference" and "xla" take empty sequences).
        "pallas": `pallas_attention` with the default blocks for the head dim (interpreted off the GPU); where
        its kernels cannot run the case (`kernels.flash_attention.supports`: head_dim not a power of two in
        [16, 256], float64, a traced scale, an empty sequence) it falls back to "flash" ("reference" with a soft
        cap) with a one-time warning.

    Returns:
      (B, T, N, H) in `query`'s dtype.

    Numerics of "reference": scores Q Kᵀ accumulate in float32 (float64 for float64 inputs), bias
    and masks are applied and the softmax is taken in that precision; the probabilities are cast to
    `value`'s dtype for the PV product, which accumulates in float32 (float64 for float64 inputs);
    the result is cast to `query`'s dtype. This matches jax.nn's "xla" up to that last product,
    whose result jax.nn keeps in `value`'s dtype. "flash" follows "reference", block by block
    (see `flash_attention`). Matmul precision follows
    `jax.default_matmul_precision` (relevant for float32 on GPU/TPU).

    Fully masked query rows (no key allowed by mask, causality, window and segments together):
      "reference", "flash" and "pallas" return zeros there, with zero gradient.
      "xla" (jax.nn; tests/ops/test_attention.py checks it) gives every key of that row the same large
        negative score, so the softmax is uniform and the row is the mean of all S values (bias ignored);
        its gradients w.r.t. query, key and bias are zero there.
      "cudnn" adds a large negative bias instead of masking; its output there is
        implementation-defined.
      Rows with at least one allowed key agree across implementations.

    Raises:
      ValueError / TypeError (at trace time) for wrong ranks or shapes, mismatched dtypes, no heads,
      head_dim 0, N not a multiple of K, an empty sequence with "flash", a non-boolean mask, bad
      segment_ids or local_window_size, or an unknown implementation.
    """
    check_implementation(implementation, IMPLEMENTATIONS)
    query, key, value, bias, mask, segment_ids, local_window = _checked_inputs(
        query, key, value, bias, mask, segment_ids, local_window_size)
    alibi_slopes, logit_soft_cap = _checked_score_options(alibi_slopes, logit_soft_cap, query.shape[2])
    q_len, head_dim, kv_len = query.shape[1], query.shape[3], key.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    platform = backend_platform()
    pallas_reason = pallas_kernels.supports(query, key, value, scale=scale, logit_soft_cap=logit_soft_cap)
    if logit_soft_cap is not None and implementation in ("xla", "cudnn", "flash"):
        implementation = fall_back("dot_product_attention", implementation, "logit soft-capping", "reference")
    cudnn_reason = _cudnn_unsupported(platform, query.dtype) if implementation == "cudnn" else None
    if implementation is None or cudnn_reason:
        fastest = select_implementation(
            platform, query.dtype, head_dim, q_len, kv_len, is_causal=is_causal, local_window=local_window,
            bias_shape=None if bias is None else bias.shape, mask_shape=None if mask is None else mask.shape,
            segment_ids=segment_ids is not None, alibi=alibi_slopes is not None,
            soft_cap=logit_soft_cap is not None, pallas_runs=pallas_reason is None)
        implementation = fall_back("dot_product_attention", "cudnn", cudnn_reason, fastest) if cudnn_reason else fastest
    if implementation == "pallas":
        if pallas_reason is None:
            return pallas_kernels.flash_attention(
                query, key, value, bias, mask, segment_ids, scale=scale, is_causal=is_causal,
                local_window=local_window, alibi_slopes=alibi_slopes, logit_soft_cap=logit_soft_cap)
        portable = "flash" if logit_soft_cap is None and min(q_len, kv_len) >= 1 else "reference"
        implementation = fall_back("dot_product_attention", "pallas", pallas_reason, portable)
    xla_reason = _xla_unsupported(platform, query.dtype) if implementation == "xla" else None
    if xla_reason:
        implementation = fall_back("dot_product_attention", "xla", xla_reason, "reference")
    if alibi_slopes is not None:  # as a (1, N, T, S) bias for the implementations that take no slopes
        alibi = alibi_distance_bias(alibi_slopes, q_len, kv_len)
        bias = alibi if bias is None else bias + alibi

    if implementation == "flash":
        return _flash_attention(query, key, value, bias, mask, segment_ids, scale=scale, is_causal=is_causal,
                                local_window=local_window, block_q=FLASH_BLOCK_Q, block_k=FLASH_BLOCK_K)
    q_pos, kv_pos = jnp.arange(q_len), jnp.arange(kv_len)
    if implementation == "reference":
        mask = _combine_masks(mask, q_pos, kv_pos, is_causal=is_causal, local_window=local_window,
                              segment_ids=segment_ids)
        return _reference_attention(query, key, value, bias, mask, scale, logit_soft_cap)
    mask = _combine_masks(mask, q_pos, kv_pos, is_causal=False, local_window=None, segment_ids=segment_ids)
    if implementation == "cudnn":  # cuDNN wants the bias (mask included) full-size in T and S
        bias, mask = [None if x is None else jnp.broadcast_to(x, x.shape[:2] + (q_len, kv_len))
                      for x in (bias, mask)]
    return jax.nn.dot_product_attention(query, key, value, bias, mask, scale=scale, is_causal=is_causal,
                                        local_window_size=local_window, implementation=implementation)


# Default block sizes of "flash" (each capped at its sequence length). In pure JAX every step of the
# key loop is a handful of XLA kernels with a fixed cost each, so larger blocks amortise it; the
# price is the score block, B·N·512·512 float32 (1 MiB per (batch, head)), and a coarser skip of
# masked blocks.
FLASH_BLOCK_Q = 512
FLASH_BLOCK_K = 512


def flash_attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False, segment_ids=None,
                    local_window_size=None, block_q: int = FLASH_BLOCK_Q, block_k: int = FLASH_BLOCK_K) -> jax.Array:
    r"""softmax(Q Kᵀ · scale + bias) V by FlashAttention (Dao et al. 2022, Alg. 1), in FlashAttention-2's
    loop order (Dao 2023, Alg. 1 forward, Alg. 2 backward), in pure JAX: `dot_product_attention`'s
    implementation "flash", with explicit block sizes.

    Arguments, shapes, masking semantics, dtypes and the result are those of `dot_product_attention`
    (query (B, T, N, H); key, value (B, S, K, H); result (B, T, N, H) in `query`'s dtype; fully
    masked query rows give zeros with zero gradient, as "reference"), plus:
      block_q, block_k: positive ints, the query and key block sizes (B_r and B_c in the papers),
        each capped at T and S. T and S need not be multiples: they are zero-padded inside, padded
        keys masked out, padded queries dropped.
      scale: as in `dot_product_attention` (a float or a scalar array, differentiable).

    Algorithm. For each query block Q_i (sequentially, `lax.map`), a loop over key blocks keeps the
    running row max m, the running sum l of exp(S_ij - m), and the unnormalised output O, rescaled
    by exp(m_old - m_new) whenever m grows (the online softmax); O / l and the log-sum-exp
    L = m + log l are formed once at the end (FlashAttention-2). Scores, m, l, O and all gradient
    accumulators are float32 (float64 for float64 inputs); P is cast to `value`'s dtype for P V.
    The backward pass (a `jax.custom_vjp`) saves only (O, L), loops over key blocks K_j, V_j and
    inside over query blocks, recomputes S_ij and P_ij = exp(S_ij - L_i), and accumulates dV_j, dK_j,
    dQ (a float32 (B, T, N, H) carry) with D_i = rowsum(dO_i ∘ O_i); d bias is dS summed down to
    bias's broadcast shape, d scale = Σ dS ∘ Q Kᵀ.

    Memory per (batch, head): O(T·H + S·H + block_q·block_k), never O(T·S): causal, window, segment
    and key-padding masks are built per block from positions and ids. A bias or mask given as a
    (.., T, S) array is O(T·S) already; it is read (and d bias written) one block at a time.

    Skipped blocks: with is_causal and/or local_window_size, each loop runs only over the blocks that
    hold an allowed (query, key) pair -- the forward's key loop and the backward's query loop are
    `lax.fori_loop`s whose bounds are computed per block from the band lo <= j - i <= hi (see
    `_block_range`), so blocks past the diagonal or outside the window cost nothing. Blocks masked
    only by `mask`, `bias` or `segment_ids` (data, not positions) are computed and masked.

    Differentiable once in reverse mode (jax.grad, jax.vjp); not in forward mode (jax.jvp), and the
    backward pass is not itself differentiable (its loops have dynamic trip counts).

    Raises:
      `checks.positive_int`'s errors for block_q and block_k; otherwise as `dot_product_attention`.
    """
    query, key, value, bias, mask, segment_ids, local_window = _checked_inputs(
        query, key, value, bias, mask, segment_ids, local_window_size)
    positive_int("block_q", block_q)
    positive_int("block_k", block_k)
    scale = query.shape[3]**-0.5 if scale is None else scale
    return _flash_attention(query, key, value, bias, mask, segment_ids, scale=scale, is_causal=is_causal,
                            local_window=local_window, block_q=int(block_q), block_k=int(block_k))


def pallas_attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False, segment_ids=None,
                     local_window_size=None, alibi_slopes=None, logit_soft_cap=None, layout=None,
                     layout_block_size=None, config=None, interpret=None) -> jax.Array:
    r"""softmax(Q Kᵀ · scale + bias) V by the Pallas FlashAttention-2 kernels
    (`jaxmodels.ops.kernels.flash_attention`; Dao 2023): `dot_product_attention`'s implementation "pallas",
    with explicit blocks and an optional block-sparse layout.

    Arguments, shapes, masking semantics, dtypes and the result are those of `dot_product_attention`
    (query (B, T, N, H); key, value (B, S, K, H); result (B, T, N, H) in `query`'s dtype; fully masked query
    rows give zeros with zero gradient), plus:
      layout, layout_block_size: a concrete (T/b, S/b) boolean block layout and its block b (e.g. from
        `sparse_attention.strided_layout`): only the blocks it marks are computed, and the result is that
        of `mask & repeat(layout, b)` (Child et al. 2019's block-sparse attention).
      config: `kernels.flash_attention.Config`, the blocks and launch options of the forward, dQ and dK/dV
        kernels (default: `default_config(H)`).
      interpret: run the Pallas interpreter (default: off the GPU).
    Differentiable in query, key, value and bias (reverse mode); not in scale or alibi_slopes.

    Raises:
      As `dot_product_attention`; ValueError/TypeError for what the kernels cannot run
      (`kernels.flash_attention.supports`) and for a layout of the wrong shape or blocks that are not powers
      of two >= 16.
    """
    query, key, value, bias, mask, segment_ids, local_window = _checked_inputs(
        query, key, value, bias, mask, segment_ids, local_window_size)
    alibi_slopes, logit_soft_cap = _checked_score_options(alibi_slopes, logit_soft_cap, query.shape[2])
    scale = query.shape[3]**-0.5 if scale is None else scale
    if layout is not None:
        positive_int("layout_block_size", layout_block_size)
        layout = np.asarray(layout)
        expected = (query.shape[1] // layout_block_size, key.shape[1] // layout_block_size)
        if layout.dtype != np.bool_ or layout.shape != expected:
            raise ValueError(f"layout must be a boolean (T/b, S/b) = {expected} array, got {layout.dtype} of "
                             f"shape {layout.shape}")
    reason = pallas_kernels.supports(query, key, value, scale=scale, logit_soft_cap=logit_soft_cap, layout=layout,
                                     layout_block_size=layout_block_size)
    if reason:
        raise (TypeError if reason.startswith("dtypes") else ValueError)(
            f"pallas_attention does not cover these inputs: {reason}")
    return pallas_kernels.flash_attention(
        query, key, value, bias, mask, segment_ids, scale=scale, is_causal=is_causal, local_window=local_window,
        alibi_slopes=alibi_slopes, logit_soft_cap=logit_soft_cap, layout=layout, layout_block_size=layout_block_size,
        config=config, interpret=interpret)


def _reference_attention(query, key, value, bias, mask, scale, logit_soft_cap=None):
    """softmax(Q Kᵀ · scale (soft-capped) + bias) V with grouped heads, written out in jnp.

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
    if logit_soft_cap is not None:
        scores = logit_soft_cap * jnp.tanh(scores / logit_soft_cap)
    if bias is not None:
        scores = scores + _group_heads(bias, num_kv_heads).astype(acc_dtype)
    if mask is not None:
        mask = _group_heads(mask, num_kv_heads)
        scores = jnp.where(mask, scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1)
    if mask is not None:
        # A no-op on rows with an allowed key (exp(MASKED_SCORE - row max) underflowed to exactly 0);
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


def _combine_masks(mask, q_pos, kv_pos, *, is_causal, local_window, segment_ids):
    """AND of the given mask and the causal / local-window / segment masks, as one boolean array
    broadcastable to (B, N, t, s); None when nothing is masked.

    q_pos (t,), kv_pos (s,): the positions of the queries and keys in question (all of them, or one
    block's); mask None or 4-D and segment_ids None or ((B, t), (B, s)) over those same positions.
    """
    q_pos = q_pos[:, None]
    kv_pos = kv_pos[None, :]
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


class _Grid(NamedTuple):
    """The static block layout of "flash" (hashable: the custom_vjp's non-differentiable argument)."""
    block_q: int  # B_r, <= q_len
    block_k: int  # B_c, <= kv_len
    q_len: int  # T, before padding to a multiple of block_q
    kv_len: int  # S, before padding to a multiple of block_k
    is_causal: bool
    local_window: tuple[int, int] | None

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_k)


def _flash_attention(query, key, value, bias, mask, segment_ids, *, scale, is_causal, local_window, block_q, block_k):
    """`flash_attention` on checked inputs (see `_checked_inputs`): pads T and S up to multiples of
    the blocks, runs the custom-VJP core `_flash`, and drops the padded query rows. Autodiff of the
    padding and of the scale's dtype cast carries the core's gradients back to the inputs."""
    if query.shape[1] < 1 or key.shape[1] < 1:
        raise ValueError(f"implementation 'flash' needs query length T >= 1 and key length S >= 1, got "
                         f"T={query.shape[1]}, S={key.shape[1]}; use 'reference' for empty sequences")
    batch, q_len, num_heads, head_dim = query.shape
    kv_len = key.shape[1]
    grid = _Grid(min(block_q, q_len), min(block_k, kv_len), q_len, kv_len, is_causal, local_window)
    t_pad, s_pad = grid.num_q_blocks * grid.block_q, grid.num_kv_blocks * grid.block_k
    query = _pad_to(query, (batch, t_pad, num_heads, head_dim))
    key, value = (_pad_to(x, (batch, s_pad) + x.shape[2:]) for x in (key, value))
    bias, mask = (None if x is None else _pad_to(x, x.shape[:2] + (1 if x.shape[2] == 1 else t_pad,
                                                                     1 if x.shape[3] == 1 else s_pad))
                  for x in (bias, mask))
    if segment_ids is not None:
        segment_ids = (_pad_to(segment_ids[0], (batch, t_pad)), _pad_to(segment_ids[1], (batch, s_pad)))
    scale = jnp.asarray(scale, jnp.promote_types(query.dtype, jnp.float32))
    return _flash(grid, query, key, value, bias, scale, mask, segment_ids)[:, :q_len]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(grid, query, key, value, bias, scale, mask, segment_ids):
    """Attention of block-aligned inputs: query (B, T', N, H), key, value (B, S', K, H) with T', S'
    multiples of grid's blocks; bias, mask None or (b, n, 1 or T', 1 or S'); scale a scalar in the
    accumulation dtype; segment_ids None or ((B, T'), (B, S')). Returns (B, T', N, H)."""
    return _flash_forward(grid, query, key, value, bias, scale, mask, segment_ids)[0]


def _flash_forward(grid, query, key, value, bias, scale, mask, segment_ids):
    """FlashAttention-2's forward pass (Dao 2023, Alg. 1) over `_flash`'s inputs.

    Returns O (B, T', N, H) in query's dtype and the log-sum-exp L = m + log l (B, K, G, T') in
    scale's dtype, G = N // K; L = +inf on fully masked rows (l = 0), whose O is 0.
    """
    batch, t_pad, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    q = query.reshape(batch, t_pad, num_kv_heads, num_heads // num_kv_heads, head_dim)
    acc_dtype = scale.dtype
    stats_shape = (batch, num_kv_heads, num_heads // num_kv_heads, grid.block_q)  # (B, K, G, B_r)

    def query_block(i):
        q_i = _rows(q, i, grid.block_q)

        def kv_step(j, carry):
            o, m, l = carry
            s = _block_scores(grid, q_i, _rows(key, j, grid.block_k), i, j, bias, scale, mask, segment_ids)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgqc,bckh->bkgqh", p.astype(value.dtype), _rows(value, j, grid.block_k),
                            preferred_element_type=acc_dtype)
            return alpha[..., None] * o + pv, m_new, alpha * l + p.sum(axis=-1)

        # m starts above every masked score and below every real one: masked pairs then add
        # exp(MASKED_SCORE - m) = 0 even to rows that have seen no allowed key yet, whose l stays 0.
        init = (jnp.zeros(stats_shape + (head_dim,), acc_dtype), jnp.full(stats_shape, MASKED_SCORE / 2, acc_dtype),
                jnp.zeros(stats_shape, acc_dtype))
        o, m, l = lax.fori_loop(*_kv_block_range(grid, i), kv_step, init)
        o = o / jnp.where(l == 0, 1, l)[..., None]
        logsumexp = jnp.where(l == 0, jnp.inf, m + jnp.log(l))
        return jnp.einsum("bkgqh->bqkgh", o).astype(query.dtype), logsumexp

    # (T'/B_r, B, B_r, K, G, H) and (T'/B_r, B, K, G, B_r)
    o, logsumexp = lax.map(query_block, jnp.arange(grid.num_q_blocks))
    o = jnp.moveaxis(o, 0, 1).reshape(query.shape)
    logsumexp = jnp.moveaxis(logsumexp, 0, 3).reshape(stats_shape[:3] + (t_pad,))
    return o, logsumexp


def _flash_fwd(grid, query, key, value, bias, scale, mask, segment_ids):
    out, logsumexp = _flash_forward(grid, query, key, value, bias, scale, mask, segment_ids)
    return out, (query, key, value, bias, scale, mask, segment_ids, out, logsumexp)


def _flash_bwd(grid, residuals, d_out):
    """FlashAttention-2's backward pass (Dao 2023, Alg. 2): gradients w.r.t. query, key, value, bias
    (summed to bias's shape) and scale, from the saved O and L; none for mask and segment ids."""
    query, key, value, bias, scale, mask, segment_ids, out, logsumexp = residuals
    batch, t_pad, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    grouped = (batch, t_pad, num_kv_heads, num_heads // num_kv_heads, head_dim)
    q, d_o = query.reshape(grouped), d_out.reshape(grouped)
    acc_dtype = scale.dtype
    # D_i = rowsum(dO_i ∘ O_i) = Σ_j P_ij dP_ij, (B, K, G, T')
    d = jnp.einsum("bqkgh,bqkgh->bkgq", d_o, out.reshape(grouped), preferred_element_type=acc_dtype)

    def kv_block(carry, j):
        k_j, v_j = _rows(key, j, grid.block_k), _rows(value, j, grid.block_k)

        def q_step(i, carry):
            d_q, d_bias, d_k, d_v = carry
            q_i, d_o_i = _rows(q, i, grid.block_q), _rows(d_o, i, grid.block_q)
            s = _block_scores(grid, q_i, k_j, i, j, bias, scale, mask, segment_ids)
            p = jnp.exp(s - _rows(logsumexp, i, grid.block_q, axis=3)[..., None])  # 0 where masked
            d_v = d_v + jnp.einsum("bkgqc,bqkgh->bckh", p.astype(d_o.dtype), d_o_i,
                                   preferred_element_type=acc_dtype)
            d_p = jnp.einsum("bqkgh,bckh->bkgqc", d_o_i, v_j, preferred_element_type=acc_dtype)
            d_s = p * (d_p - _rows(d, i, grid.block_q, axis=3)[..., None])  # dL/dS_ij
            d_q_i = jnp.einsum("bkgqc,bckh->bqkgh", d_s.astype(key.dtype), k_j, preferred_element_type=acc_dtype)
            d_q = lax.dynamic_update_slice_in_dim(d_q, _rows(d_q, i, grid.block_q) + d_q_i, i * grid.block_q, axis=1)
            d_k = d_k + jnp.einsum("bkgqc,bqkgh->bckh", d_s.astype(query.dtype), q_i,
                                   preferred_element_type=acc_dtype)
            if bias is not None:
                d_bias = _add_to_block(d_bias, d_s.reshape(batch, num_heads, grid.block_q, grid.block_k), i, j, grid)
            return d_q, d_bias, d_k, d_v

        zeros = jnp.zeros(k_j.shape, acc_dtype)
        d_q, d_bias, d_k, d_v = lax.fori_loop(*_q_block_range(grid, j), q_step, carry + (zeros, zeros))
        return (d_q, d_bias), (d_k, d_v)

    init = (jnp.zeros(grouped, acc_dtype), None if bias is None else jnp.zeros(bias.shape, acc_dtype))
    (d_q, d_bias), (d_k, d_v) = lax.scan(kv_block, init, jnp.arange(grid.num_kv_blocks))
    # d_q, d_k so far are dL/d(Q Kᵀ) K and dL/d(Q Kᵀ)ᵀ Q, without the scale.
    d_scale = jnp.sum(d_q * q.astype(acc_dtype))
    d_key, d_value = (jnp.moveaxis(x, 0, 1).reshape(key.shape) for x in (d_k * scale, d_v))
    return ((d_q * scale).reshape(query.shape).astype(query.dtype), d_key.astype(key.dtype),
            d_value.astype(value.dtype), None if bias is None else d_bias.astype(bias.dtype),
            d_scale, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _block_scores(grid, q_i, k_j, i, j, bias, scale, mask, segment_ids):
    """S_ij = Q_i K_jᵀ · scale + bias_ij for query block i and key block j, masked pairs (causal,
    window, segments, mask, padded keys) set to MASKED_SCORE.

    q_i (B, B_r, K, G, H), k_j (B, B_c, K, H) -> (B, K, G, B_r, B_c) in scale's dtype.
    """
    num_kv_heads = k_j.shape[2]
    s = jnp.einsum("bqkgh,bckh->bkgqc", q_i, k_j, preferred_element_type=scale.dtype) * scale
    if bias is not None:
        s = s + _group_heads(lax.dynamic_slice(bias, *_block_index(bias.shape, i, j, grid)),
                             num_kv_heads).astype(scale.dtype)
    q_pos = i * grid.block_q + jnp.arange(grid.block_q)
    kv_pos = j * grid.block_k + jnp.arange(grid.block_k)
    mask_ij = None if mask is None else lax.dynamic_slice(mask, *_block_index(mask.shape, i, j, grid))
    if grid.kv_len % grid.block_k:  # the last key block holds padding
        key_exists = (kv_pos < grid.kv_len)[None, None, None, :]
        mask_ij = key_exists if mask_ij is None else mask_ij & key_exists
    if segment_ids is not None:
        segment_ids = (_rows(segment_ids[0], i, grid.block_q), _rows(segment_ids[1], j, grid.block_k))
    allowed = _combine_masks(mask_ij, q_pos, kv_pos, is_causal=grid.is_causal, local_window=grid.local_window,
                             segment_ids=segment_ids)
    return s if allowed is None else jnp.where(_group_heads(allowed, num_kv_heads), s, MASKED_SCORE)


def _rows(x, block, size, axis=1):
    """Block number `block` of length `size` along `axis`."""
    return lax.dynamic_slice_in_dim(x, block * size, size, axis=axis)


def _block_index(shape, i, j, grid):
    """(start, size) of block (i, j) in a (b, n, t, s) bias or mask whose t and s are 1 (broadcast)
    or the padded T and S."""
    b, n, t, s = shape
    start = (0, 0, 0 if t == 1 else i * grid.block_q, 0 if s == 1 else j * grid.block_k)
    return start, (b, n, 1 if t == 1 else grid.block_q, 1 if s == 1 else grid.block_k)


def _add_to_block(acc, x, i, j, grid):
    """acc (b, n, t, s) with x (B, N, B_r, B_c) added to block (i, j), summed over the axes where
    acc broadcasts."""
    start, size = _block_index(acc.shape, i, j, grid)
    x = x.sum(axis=tuple(a for a in range(4) if size[a] == 1 and x.shape[a] != 1), keepdims=True)
    return lax.dynamic_update_slice(acc, lax.dynamic_slice(acc, start, size) + x, start)


def _pad_to(x, shape):
    """x padded at the end of each axis up to `shape`, with zeros (False for booleans)."""
    return jnp.pad(x, [(0, n - d) for n, d in zip(shape, x.shape)])


def _band(grid):
    """(lo, hi) with query i allowed to see key j only if lo <= j - i <= hi, from causality and the
    local window; None = unbounded."""
    lo, hi = (None, None) if grid.local_window is None else (-grid.local_window[0], grid.local_window[1])
    if grid.is_causal:
        hi = 0 if hi is None else min(hi, 0)
    return lo, hi


def _kv_block_range(grid, i):
    """Key blocks [first, stop) that query block i sees under causality and window."""
    lo, hi = _band(grid)
    return _block_range(i, grid.block_q, grid.q_len, grid.block_k, grid.num_kv_blocks, lo, hi)


def _q_block_range(grid, j):
    """Query blocks [first, stop) that see key block j under causality and window."""
    lo, hi = _band(grid)
    return _block_range(j, grid.block_k, grid.kv_len, grid.block_q, grid.num_q_blocks,
                        None if hi is None else -hi, None if lo is None else -lo)


def _block_range(block, size, length, other_size, num_other, lo, hi):
    """Blocks [first, stop) along the other axis (blocks of other_size, num_other of them) that hold
    a position p + d for some position p < length of block `block` (of `size`) and lo <= d <= hi
    (None = unbounded). Python ints when unbounded, else traced int scalars; first >= stop when no
    block qualifies."""
    start = block * size
    last = jnp.minimum(start + size, length) - 1  # the last real (unpadded) position of the block
    first = 0 if lo is None else jnp.maximum(0, (start + lo) // other_size)
    stop = num_other if hi is None else jnp.minimum(num_other, (last + hi) // other_size + 1)
    return first, stop


# The automatic choice takes "flash" over "xla" from this many scores T·S per (batch, head) on: a
# 2048 x 2048 float32 score matrix (16 MiB per batch-head, and as much again for its softmax kept
# for the backward pass), which "flash" never materialises. On an NVIDIA GPU "pallas" takes these cases.
_FLASH_MIN_SCORES = 2048 * 2048


def select_implementation(platform: str, dtype, head_dim: int, q_len: int, kv_len: int, *, is_causal: bool,
                          local_window: tuple[int, int] | None, bias_shape: tuple | None = None,
                          mask_shape: tuple | None = None, segment_ids: bool = False, alibi: bool = False,
                          soft_cap: bool = False, pallas_runs: bool) -> str:
    r"""`dot_product_attention`'s implementation=None: the fastest implementation measured for the case.

    platform: "cuda", "rocm", "cpu", "tpu" (`dispatch.backend_platform`); dtype, head_dim H, q_len T, kv_len S:
    the inputs'; is_causal, local_window (None or (left, right)): as normalised by `dot_product_attention`;
    bias_shape, mask_shape: None or the 4-D (b, n, t, s) shape of the bias / boolean mask operand; segment_ids,
    alibi, soft_cap: whether those are given; pallas_runs: the Pallas kernels take the case
    (`kernels.flash_attention.supports` is None).

    cuDNN takes the inputs where jax.nn's cuDNN flash attention accepts them; its conditions,
    those of jax's `jax._src.cudnn.fused_attention_stablehlo` (`check_layout`, `check_is_flash_attention`) and
    `jax.nn.dot_product_attention`, taken at their strictest across the jax versions in use:
      - an NVIDIA GPU and fp16 or bf16 inputs (`_cudnn_unsupported`);
      - H a multiple of 8 and <= 128 (Hopper allows 256; not assumed here);
      - even T and S: with a bias or mask the backward pass needs them, and some cuDNN versions reject odd
        lengths even without; we cannot know at trace time whether a gradient follows, so we ask for it always;
      - a local window with a right side only together with is_causal (which discards it).
    cuDNN masks natively only causality and a left window; everything else reaches it as one dense
    (b, n, T, S) bias: a mask, segment ids (jax.nn has none), ALiBi (`alibi_distance_bias`), and a bias or mask
    broadcast in T or S (cuDNN's `check_layout` wants them full-size, so `dot_product_attention` broadcasts them).

    The rule, first match wins ("long": T·S >= 2048², `_FLASH_MIN_SCORES`; "pallas" on cuda only where
    pallas_runs, else the "elsewhere" column):

      case                                               cuda     elsewhere   evidence
      soft cap                                           pallas   reference   [a]
      cuDNN takes the inputs, with segment ids, ALiBi,   pallas   --          [b]
        or a bias or mask broadcast in T or S
      cuDNN takes the inputs                             cudnn    --          [c]
      long                                               pallas   flash       [d]
      otherwise                                          xla      xla         [e]

    Evidence: one H200, bf16, forward + backward, benchmarks/results/flash_attention_h200.json ("summary"; from
    `python -m benchmarks.flash_attention`):
      [a] the only kernels with a soft cap; "reference" on cuda where they cannot run the case.
      [b] cuDNN given a dense (1, 1, T, S) bias, all T·S pairs, took 62 ms at B=2, T=16k, N=16, H=128 (rows
          "cudnn_dense_mask"): per score pair 1.4x the kernels' dense causal time at that size (22 ms for half
          the pairs), and 10.1-11.5x the kernels on block-sparse layouts of 8-12% density (segment ids skip
          blocks as a layout does). ALiBi, segment ids and broadcast operands cost the kernels no (T, S) read.
      [c] the kernels / cuDNN: dense causal 0.80-0.85x at H=64, 0.66-0.71x at H=128; causal window of 4k
          at T=32k 0.72x.
      [d] the kernels / pure-JAX "flash": dense causal 4.5-7.4x; causal window of 4k at T=32k 8.7x.
      [e] short sequences: the kernels are not measured against "xla".
    "xla" becomes "reference" where XLA cannot run it (`_xla_unsupported`: float16 on the CPU). ROCm never takes
    "pallas" (the kernels are not measured there). `sparse_attention.select_block_sparse_implementation` is the
    same rule for block-sparse layouts (the kernels 5.0-7.4x `block_sparse_attention`'s "gather").
    """
    cuda_pallas = platform == "cuda" and pallas_runs
    if soft_cap:
        return "pallas" if cuda_pallas else "reference"
    cudnn_ok = (
        _cudnn_unsupported(platform, dtype) is None
        and head_dim % 8 == 0 and head_dim <= 128
        and q_len % 2 == 0 and kv_len % 2 == 0
        and (local_window is None or is_causal or local_window[1] == 0)
    )
    long = q_len * kv_len >= _FLASH_MIN_SCORES
    if cudnn_ok:
        broadcast = any(shape is not None and tuple(shape[2:]) != (q_len, kv_len) for shape in (bias_shape, mask_shape))
        return "pallas" if cuda_pallas and (segment_ids or alibi or broadcast) else "cudnn"
    if long:
        return "pallas" if cuda_pallas else "flash"
    return "reference" if _xla_unsupported(platform, dtype) else "xla"


def _xla_unsupported(platform: str, dtype) -> str | None:
    """Why jax.nn's "xla" attention cannot run here for this dtype, or None: compiled for the CPU, its float16
    score matmul asks for float32 accumulation, which XLA's CPU dot_general rejects."""
    if platform == "cpu" and jnp.dtype(dtype) == jnp.dtype(jnp.float16):
        return "XLA's CPU dot_general takes no float16 operands with float32 accumulation"
    return None


def _cudnn_unsupported(platform: str, dtype) -> str | None:
    """Why jax.nn's cuDNN attention cannot run on this platform for this dtype whatever the shapes, or None."""
    if platform != "cuda":
        return f"cuDNN attention needs an NVIDIA GPU, the platform is {platform!r}"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        return f"cuDNN attention takes float16 or bfloat16 inputs, got {jnp.dtype(dtype)}"
    return None


def _checked_inputs(query, key, value, bias, mask, segment_ids, local_window_size):
    """dot_product_attention's array arguments, checked (see its Raises) and normalised: q, k, v as
    arrays, bias and mask None or 4-D, segment_ids None or (q_ids (B, T), kv_ids (B, S)),
    local_window None or (left, right)."""
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    check_qkv(query, key, value)
    batch, q_len, num_heads, _ = query.shape
    kv_len = key.shape[1]
    scores_shape = (batch, num_heads, q_len, kv_len)
    if bias is not None:
        bias = as_scores_operand(jnp.asarray(bias), scores_shape, "bias")
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask must be boolean (True = attend), got dtype {mask.dtype}; "
                            "pass additive masks as bias")
        mask = as_scores_operand(mask, scores_shape, "mask")
    segment_ids = _split_segment_ids(segment_ids, batch, q_len, kv_len)
    return query, key, value, bias, mask, segment_ids, _window(local_window_size)


def _checked_score_options(alibi_slopes, logit_soft_cap, num_heads):
    """(alibi_slopes as a (N,) float array or None, logit_soft_cap as a float > 0 or None), checked; a traced
    soft cap stays as it is."""
    if alibi_slopes is not None:
        alibi_slopes = jnp.asarray(alibi_slopes)
        if alibi_slopes.shape != (num_heads,) or not jnp.issubdtype(alibi_slopes.dtype, jnp.floating):
            raise ValueError(f"alibi_slopes must be a float array of shape (N,) = ({num_heads},), got "
                             f"{alibi_slopes.dtype} of shape {alibi_slopes.shape}")
    if isinstance(logit_soft_cap, (jax.Array, np.ndarray)) and not isinstance(logit_soft_cap, jax.core.Tracer):
        logit_soft_cap = logit_soft_cap.item() if logit_soft_cap.ndim == 0 else logit_soft_cap
    if logit_soft_cap is not None and not isinstance(logit_soft_cap, jax.core.Tracer):
        logit_soft_cap = real_in_range("logit_soft_cap", logit_soft_cap, 0, include_low=False)
    return alibi_slopes, logit_soft_cap


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
