"""Position encodings and length extrapolation.

Rotary (RoFormer, Su et al. 2021) with the context-extension rescalings of its frequencies
(position interpolation, NTK-aware, dynamic NTK, YaRN), axial 2D RoPE for images, ReRoPE,
log-n attention scaling, ALiBi (Press et al. 2022), T5 relative position buckets (Raffel et al.
2020), sinusoidal embeddings (Vaswani et al. 2017) and random Fourier features of 2-D coordinates
(Tancik et al. 2020; Segment Anything's point and image positions).

Every RoPE variant here is a choice of inverse frequencies θ_i fed to the one rotation routine,
`apply_rope(x, positions, inv_freq=...)`: the rotation angle of dim pair i at position m is m·θ_i,
so scaling positions (m -> m / s) and scaling frequencies (θ_i -> θ_i / s) are the same map, and
every variant keeps RoPE's relative property. `rope_inverse_frequencies` is the single entry point
that turns config values (method, factor, training length) into (inv_freq, attention_scale).
"""

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.ops.checks import MASKED_SCORE, check_qkv, one_of, positive_int, real_in_range


def rope_frequencies(head_dim: int, base: float = 10000.0) -> jax.Array:
    """Inverse frequencies θ_i = base^(-2i/d), i = 0 .. d/2 - 1 (Su et al. 2021, eq. 15, 0-indexed).

    Returns (head_dim // 2,) float32, computed in float64 and rounded once.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (dims are rotated in pairs), got {head_dim}")
    return jnp.asarray(base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim), jnp.float32)


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10000.0, interleaved: bool = False,
               inv_freq: jax.Array | None = None) -> jax.Array:
    """Rotary position embedding (Su et al. 2021, eq. 34): rotate each pair of dims of the token at
    position m by the angle m·θ_i, so that <rope(q, m), rope(k, n)> depends on m - n only.

    x: (B, L, N, H) with H even; positions: (B, L) or (L,) integer (or float) positions.
    inv_freq: optional (H/2,) inverse frequencies θ_i, e.g. from `rope_inverse_frequencies` (a
    context-extension method); default `rope_frequencies(H, base)`. When given, `base` is unused.
    Pairs: by default rotate-half, (i, i + H/2) (GPT-NeoX / LLaMA); with `interleaved=True`,
    (2i, 2i + 1) (the RoFormer paper / GPT-J). The two are the same map up to a fixed permutation
    of the head dim, but weights trained with one need that permutation to be used with the other.
    Angles and the rotation are computed in float32 (the rotation in float64 for float64 x);
    returns x's shape and dtype.
    """
    x = jnp.asarray(x)
    positions = jnp.asarray(positions)
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D (batch, length, heads, head_dim), got shape {x.shape}")
    if positions.shape not in ((x.shape[1],), x.shape[:2]):
        raise ValueError(f"positions must have shape (L,) = {x.shape[1:2]} or (B, L) = {x.shape[:2]}, "
                         f"got {positions.shape}")
    if inv_freq is None:
        theta = rope_frequencies(x.shape[-1], base)
    else:
        theta = jnp.asarray(inv_freq, jnp.float32)
        if theta.shape != (x.shape[-1] // 2,) or x.shape[-1] % 2:
            raise ValueError(f"inv_freq must have shape (head_dim // 2,) = ({x.shape[-1] // 2},) with an even "
                             f"head_dim, got inv_freq {theta.shape} for head_dim {x.shape[-1]}")
    angles = positions.astype(jnp.float32)[..., None, None] * theta  # ([B,] L, 1, H/2)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    else:
        x1, x2 = jnp.split(xf, 2, axis=-1)
        rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# RoPE context extension: inverse-frequency transforms. s = `factor` = L' / L, the ratio of the
# target context length L' to the training length L. Each returns (head_dim // 2,) float32 and
# equals `rope_frequencies(head_dim, base)` exactly at s = 1.


def position_interpolation_frequencies(head_dim: int, base: float = 10000.0, *, factor: float) -> jax.Array:
    """Position interpolation ("linear" scaling; Chen et al. 2023, "Extending Context Window of Large
    Language Models via Positional Interpolation", §2.2): f'(x, m) = f(x, m / s), i.e. positions are
    squeezed into the trained range. Returned as θ_i / s, the same angles m·θ_i / s.

    Returns (head_dim // 2,) float32.
    """
    _check_factor(factor)
    return rope_frequencies(head_dim, base) / jnp.float32(factor)


def ntk_frequencies(head_dim: int, base: float = 10000.0, *, factor: float | jax.Array) -> jax.Array:
    """NTK-aware scaling (bloc97 2023; YaRN paper §3.1): a larger base, b' = b · s^(d/(d-2)), so the
    highest frequency θ_0 = 1 is kept and the lowest, θ_{d/2-1}, is divided by exactly s.

    θ'_i = b'^(-2i/d) = θ_i · s^(-2i/(d-2)), computed in that product form in float32 (so `factor`
    may be a traced scalar, as in `dynamic_ntk_frequencies`). Needs head_dim >= 4.
    Returns (head_dim // 2,) float32.
    """
    if not isinstance(factor, jax.Array):  # a traced factor cannot be checked
        _check_factor(factor)
    if head_dim < 4:
        raise ValueError(f"NTK scaling needs head_dim >= 4 (b' = b·s^(d/(d-2))), got {head_dim}")
    exponent = -np.arange(0, head_dim, 2, dtype=np.float64) / (head_dim - 2)
    return rope_frequencies(head_dim, base) * jnp.asarray(factor, jnp.float32) ** jnp.asarray(exponent, jnp.float32)


def dynamic_ntk_frequencies(head_dim: int, base: float = 10000.0, *, length: int | jax.Array, train_length: int,
                            factor: float = 1.0) -> jax.Array:
    """Dynamic NTK scaling (emozilla 2023; YaRN paper §3.3; Hugging Face's rope_type "dynamic"):
    NTK-aware scaling with a factor that follows the current sequence length L' = `length`:

        s = max(1, factor · L' / L - (factor - 1)),   L = train_length,

    which is max(1, L' / L) for the default factor 1, so up to the training length it is plain RoPE.
    `length` may be a traced integer scalar (e.g. the filled KV-cache length while decoding),
    `factor` a Python float >= 1.
    (Qwen-7B's variant rounds the ratio up to a power of two, α = 2^ceil(log2(L'/L) + 1) - 1;
    not this one.) Returns (head_dim // 2,) float32.
    """
    _check_factor(factor)
    _check_train_length(train_length)
    scale = jnp.maximum(1.0, factor * jnp.asarray(length, jnp.float32) / train_length - (factor - 1.0))
    return ntk_frequencies(head_dim, base, factor=scale)


def yarn_frequencies(head_dim: int, base: float = 10000.0, *, factor: float, train_length: int,
                     alpha: float = 1.0, beta: float = 32.0) -> jax.Array:
    """YaRN's "NTK-by-parts" interpolation (Peng et al. 2023, "YaRN: Efficient Context Window
    Extension of Large Language Models", §3.2), with the paper's formulas:

        λ_i = 2π / θ_i                      wavelength of dim pair i
        r_i = L / λ_i                       rotations of pair i over the training length L
        γ(r) = 0 if r < α, 1 if r > β, (r - α) / (β - α) otherwise
        h(θ_i) = (1 - γ(r_i)) · θ_i / s + γ(r_i) · θ_i

    Pairs that turn many times within L (r > β) keep their frequency (extrapolation); pairs that
    turn less than α times are interpolated like `position_interpolation_frequencies`; a linear ramp
    in r in between. The paper's LLaMA values are α = 1, β = 32 (Hugging Face calls them
    beta_slow and beta_fast). Note: the YaRN reference code and Hugging Face's implementation ramp
    linearly in the pair index i between floor/ceil of the pairs where r = β and r = α, not linearly
    in r; in the transition band their frequencies differ from these.
    Computed as θ_i · (1/s + γ(r_i) · (1 - 1/s)) in float32 (the same h, exactly θ_i at s = 1).
    Pair with `yarn_mscale(factor)`. Returns (head_dim // 2,) float32.
    """
    _check_factor(factor)
    _check_train_length(train_length)
    if not 0 <= alpha < beta:
        raise ValueError(f"YaRN needs 0 <= alpha < beta, got alpha={alpha}, beta={beta}")
    theta = rope_frequencies(head_dim, base)
    r = train_length * theta / (2 * math.pi)
    gamma = jnp.clip((r - alpha) / (beta - alpha), 0.0, 1.0)
    return theta * (1.0 / factor + gamma * (1.0 - 1.0 / factor))


def yarn_mscale(factor: float) -> float:
    """YaRN's attention temperature (Peng et al. 2023, §3.4): softmax(qᵀk / (t·√d)) with
    √(1/t) = 0.1 · ln(s) + 1.

    Returns √(1/t) as a Python float: the factor to multiply *both* q and k by (what the YaRN code
    and Hugging Face fold into cos/sin). The attention logits are multiplied by its square, 1/t;
    `rope_inverse_frequencies` returns that square as `attention_scale`.
    """
    _check_factor(factor)
    return 0.1 * math.log(factor) + 1.0


ROPE_SCALING_METHODS = ("none", "linear", "ntk", "dynamic_ntk", "yarn")


class RopeScaling(NamedTuple):
    """inv_freq: (head_dim // 2,) float32, for `apply_rope(..., inv_freq=inv_freq)` on q and k.
    attention_scale: Python float multiplying the attention logits, i.e. pass
    `scale=attention_scale / sqrt(head_dim)` to `dot_product_attention` (1.0 except for YaRN)."""
    inv_freq: jax.Array
    attention_scale: float


def rope_inverse_frequencies(head_dim: int, *, base: float = 10000.0, method: str = "none", factor: float = 1.0,
                             train_length: int | None = None, length: int | jax.Array | None = None,
                             alpha: float = 1.0, beta: float = 32.0) -> RopeScaling:
    """RoPE frequencies for a context-extension method, from config values.

    method:
      "none":        `rope_frequencies(head_dim, base)`.
      "linear":      position interpolation, `position_interpolation_frequencies` (uses factor).
      "ntk":         NTK-aware, `ntk_frequencies` (uses factor).
      "dynamic_ntk": `dynamic_ntk_frequencies` (uses length, train_length and factor).
      "yarn":        `yarn_frequencies` and attention_scale = `yarn_mscale(factor)`² (uses factor,
                     train_length, alpha, beta).
    Arguments a method does not use are ignored, so a layer can pass all its config values.
    Returns RopeScaling(inv_freq (head_dim // 2,) float32, attention_scale float).
    """
    one_of("method", method, ROPE_SCALING_METHODS)
    if method == "none":
        return RopeScaling(rope_frequencies(head_dim, base), 1.0)
    if method == "linear":
        return RopeScaling(position_interpolation_frequencies(head_dim, base, factor=factor), 1.0)
    if method == "ntk":
        return RopeScaling(ntk_frequencies(head_dim, base, factor=factor), 1.0)
    if method == "dynamic_ntk":
        if length is None:
            raise ValueError("method='dynamic_ntk' needs length (the current sequence length)")
        return RopeScaling(dynamic_ntk_frequencies(head_dim, base, length=length, train_length=train_length,
                                                   factor=factor), 1.0)
    return RopeScaling(yarn_frequencies(head_dim, base, factor=factor, train_length=train_length,  # "yarn"
                                        alpha=alpha, beta=beta), yarn_mscale(factor) ** 2)


def _check_factor(factor):
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not factor >= 1:
        raise ValueError(f"factor must be a number >= 1 (s = target length / training length), got {factor!r}")


def _check_train_length(train_length):
    positive_int("train_length", train_length)


def log_n_scale(n: jax.Array, train_length: int) -> jax.Array:
    """log-n attention scaling (Chiang & Cholak 2022, "Overcoming a Theoretical Limitation of
    Self-Attention", §5; Su 2021 "entropy invariance"; Qwen's logn_attn):

        κ(n) = log(n) / log(L)  for n > L = train_length,   1 otherwise,

    to multiply the logits (equivalently q) of a query that attends to n keys, keeping the softmax
    entropy near its trained value when n exceeds the training length. For a causal LM the query at
    0-indexed position m sees n = m + 1 keys; a bidirectional one sees the whole length.
    n: (...) integer or float, >= 1. Returns (...) float32, exactly 1 where n <= train_length.
    Use: q * log_n_scale(positions + 1, L)[..., None, None] for q (B, T, N, H), positions (B, T).
    """
    _check_train_length(train_length)
    if train_length < 2:
        raise ValueError(f"log_n_scale needs train_length >= 2 (log(train_length) > 0), got {train_length}")
    n = jnp.asarray(n, jnp.float32)
    return jnp.where(n > train_length, jnp.log(n) / math.log(train_length), 1.0)


# ----------------------------------------------------------------------------------------------
# ReRoPE


def rerope_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, window: int, leaky: float | None = None,
                     base: float = 10000.0, is_causal: bool = True, scale: float | None = None,
                     q_offset: int = 0) -> jax.Array:
    """Softmax attention with ReRoPE (Su 2023, "Rectified Rotary Position Embeddings"): RoPE whose
    relative position r = i - j (query i, key j) is clipped at the window w,

        r' = r                          if |r| < w
        r' = sign(r) · (w + (|r| - w) / k)   otherwise  ("Leaky ReRoPE", k = `leaky` > 0;
                                          leaky=None is k = ∞: r' = ±w, plain ReRoPE).

    A clipped relative position is not a difference of two absolute ones, so the scores are built
    from separate score matrices picked per (i, j) before the softmax:
      near  (|r| < w):  <rope(q_i, i), rope(k_j, j)>
      far   (r >= w):   <rope(q_i, i/k + w(1 - 1/k)), rope(k_j, j/k)>    (relative position r')
      far   (r <= -w):  <rope(q_i, i/k - w(1 - 1/k)), rope(k_j, j/k)>    (only if not is_causal)
    so it costs two (causal) or three full T×S score matrices per head: quadratic time and memory,
    no flash tiling; fine for one decode step (T = 1), expensive for long prefills.

    query: (B, T, N, H); key, value: (B, S, K, H), N a multiple of K (grouped-query heads as in
    `dot_product_attention`), one float dtype. Query i sits at absolute position q_offset + i
    (q_offset >= 0, e.g. the KV-cache fill for decoding), key j at j. is_causal: keys j <= q_offset + i.
    window: int >= 1. scale: logit multiplier, default 1/sqrt(H). RoPE is rotate-half with `base`.
    Numerics as `dot_product_attention`'s "reference": scores and softmax in float32 (float64 for
    float64 inputs), returns (B, T, N, H) in query's dtype.
    With w >= max |i - j| + 1 every pair is "near" and this is plain RoPE attention.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    check_qkv(query, key, value)
    positive_int("window", window)
    if leaky is not None and not leaky > 0:
        raise ValueError(f"leaky must be None (plain ReRoPE) or a positive slope divisor k, got {leaky!r}")
    if isinstance(q_offset, numbers.Integral) and q_offset < 0:
        raise ValueError(f"q_offset must be >= 0, got {q_offset}")
    batch, q_len, num_heads, head_dim = query.shape
    kv_len, num_kv_heads = key.shape[1], key.shape[2]
    acc_dtype = jnp.promote_types(query.dtype, jnp.float32)
    inv_k = 0.0 if leaky is None else 1.0 / leaky
    q_pos = q_offset + jnp.arange(q_len)
    k_pos = jnp.arange(kv_len)

    def scores(q_positions, k_positions):  # (B, K, G, T, S)
        q = apply_rope(query, q_positions, base=base)
        k = apply_rope(key, k_positions, base=base)
        q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
        return jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=acc_dtype)

    rel = q_pos[:, None] - k_pos[None, :]  # (T, S)
    far_keys = k_pos * inv_k
    logits = jnp.where(jnp.abs(rel) < window, scores(q_pos, k_pos),
                       scores(q_pos * inv_k + window * (1 - inv_k), far_keys))
    if not is_causal:
        logits = jnp.where(rel <= -window, scores(q_pos * inv_k - window * (1 - inv_k), far_keys), logits)
    logits = logits * jnp.asarray(head_dim**-0.5 if scale is None else scale, acc_dtype)
    probs = jax.nn.softmax(logits, axis=-1, where=rel >= 0 if is_causal else None)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(value.dtype), value, preferred_element_type=acc_dtype)
    return out.reshape(query.shape).astype(query.dtype)


# ----------------------------------------------------------------------------------------------
# Additive attention biases: ALiBi and T5 relative buckets, (1, N, T, S) for dot_product_attention.


def alibi_slopes(num_heads: int) -> jax.Array:
    """ALiBi head slopes (Press et al. 2022, "Train Short, Test Long", §3 and their `get_slopes`).

    For n a power of two: the geometric sequence m_h = 2^(-8(h+1)/n), h = 0 .. n-1 (8 heads:
    1/2, 1/4, ..., 1/256). Otherwise, with p the largest power of two below n: the p slopes for p
    heads, then every other slope of the 2p-head sequence, its first n - p (2^(-4/p·(2h+1))).
    Returns (num_heads,) float32, computed in float64.
    """
    positive_int("num_heads", num_heads)

    def geometric(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    p = 1 << (int(num_heads).bit_length() - 1)
    return jnp.asarray(geometric(p) + geometric(2 * p)[0::2][:num_heads - p], jnp.float32)


def alibi_bias(num_heads: int, q_len: int, kv_len: int, *, causal: bool = True, q_offset: int = 0) -> jax.Array:
    """ALiBi attention bias (Press et al. 2022, eq. in §3 / Fig. 3): head h adds -m_h · (i - j) to the
    logit of query i and key j (m_h from `alibi_slopes`); no position embeddings are added.

    Query t sits at absolute position i = q_offset + t (KV-cache decoding), key s at j = s.
    causal=True: -m_h · (i - j) for j <= i and a large negative finite score (the masked value of
    `dot_product_attention`) for j > i, so the bias alone also applies the causal mask.
    causal=False: -m_h · |i - j|, the symmetric form used for bidirectional encoders.
    Returns (1, num_heads, q_len, kv_len) float32 for `dot_product_attention(bias=...)`.
    """
    bias = alibi_distance_bias(alibi_slopes(num_heads), q_len, kv_len, q_offset=q_offset)
    if causal:
        rel = (q_offset + jnp.arange(q_len))[:, None] - jnp.arange(kv_len)[None, :]  # i - j, (T, S)
        bias = jnp.where(rel >= 0, bias, MASKED_SCORE)
    return bias


def alibi_distance_bias(slopes, q_len: int, kv_len: int, *, q_offset: int = 0) -> jax.Array:
    """-m_h · |i - j| for head h's slope m_h = slopes[h], query t at position i = q_offset + t and key j:
    ALiBi's bias (Press et al. 2022) in its symmetric form, which equals the causal form -m_h · (i - j) on
    every pair a causal mask allows. slopes (N,) float -> (1, N, q_len, kv_len) float32."""
    rel = (q_offset + jnp.arange(q_len))[:, None] - jnp.arange(kv_len)[None, :]
    return (-jnp.asarray(slopes, jnp.float32)[:, None, None] * jnp.abs(rel).astype(jnp.float32))[None]


def t5_relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int = 32,
                                max_distance: int = 128) -> jax.Array:
    """T5's relative position buckets (Raffel et al. 2020, §2.1; `_relative_position_bucket` of
    mesh_tensorflow / Hugging Face T5), with the same float32 arithmetic.

    relative_position = key position - query position (memory - context), integer (...).
    bidirectional: half the buckets for keys after the query (r > 0), half for the rest; otherwise
    (causal) every r > 0 goes to bucket 0. Then, with n = |r| (or max(-r, 0)) and B the buckets left:
    n < B/2 gets its own bucket n; larger n get B/2 + floor(log(n / (B/2)) / log(max_distance / (B/2))
    · (B - B/2)), log-spaced up to max_distance and capped at B - 1.
    Returns (...) int32 in [0, num_buckets).
    """
    relative_position = jnp.asarray(relative_position)
    if not jnp.issubdtype(relative_position.dtype, jnp.integer):
        raise TypeError(f"relative_position must be integers, got {relative_position.dtype}")
    side_buckets = num_buckets // 2 if bidirectional else num_buckets  # buckets for one direction
    max_exact = side_buckets // 2
    if max_exact < 1 or max_distance <= max_exact:
        raise ValueError(f"need num_buckets >= {4 if bidirectional else 2} and max_distance > num_buckets "
                         f"{'// 4' if bidirectional else '// 2'} (the exact range), got num_buckets={num_buckets}, "
                         f"max_distance={max_distance}")
    relative_position = relative_position.astype(jnp.int32)
    if bidirectional:
        bucket = (relative_position > 0).astype(jnp.int32) * side_buckets
        n = jnp.abs(relative_position)
    else:
        bucket = jnp.zeros_like(relative_position)
        n = jnp.maximum(-relative_position, 0)
    # jnp.maximum only keeps log finite where the small-n branch is taken anyway.
    log_ratio = jnp.log(jnp.maximum(n, max_exact).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    if_large = jnp.minimum(max_exact + (log_ratio * (side_buckets - max_exact)).astype(jnp.int32), side_buckets - 1)
    return bucket + jnp.where(n < max_exact, n, if_large)


def t5_bias(table: jax.Array, q_len: int, kv_len: int, *, bidirectional: bool, max_distance: int = 128,
            q_offset: int = 0) -> jax.Array:
    """T5 relative attention bias (Raffel et al. 2020, §2.1): bias[h, t, s] = table[bucket(j - i), h]
    with `t5_relative_position_bucket`, query t at position i = q_offset + t, key s at j = s.

    table: (num_buckets, N) learned scalars (one per bucket and head; the module owns them).
    Returns (1, N, q_len, kv_len) in table's dtype for `dot_product_attention(bias=...)`.
    """
    table = jnp.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"table must be 2-D (num_buckets, num_heads), got shape {table.shape}")
    relative_position = jnp.arange(kv_len)[None, :] - (q_offset + jnp.arange(q_len))[:, None]  # j - i
    buckets = t5_relative_position_bucket(relative_position, bidirectional=bidirectional,
                                          num_buckets=table.shape[0], max_distance=max_distance)
    return jnp.transpose(table[buckets], (2, 0, 1))[None]


# ----------------------------------------------------------------------------------------------
# Images and absolute encodings


def image_positions(height: int, width: int) -> jax.Array:
    """(row, column) of each patch of a height × width grid in row-major order (token t = r·width + c).

    Returns (height * width, 2) int32, for `apply_rope_2d`.
    """
    rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
    return jnp.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1).astype(jnp.int32)


def apply_rope_2d(x: jax.Array, positions_hw: jax.Array, *, base: float = 10000.0,
                  interleaved: bool = False) -> jax.Array:
    """Axial 2D RoPE for image tokens (Heo et al. 2024, "Rotary Position Embedding for Vision
    Transformer", RoPE-Axial; the per-axis blocks of EVA-02 and FLUX): the first half of the head dim
    is a 1D RoPE of H/2 dims over the row position, the second half one over the column position,
    each with frequencies `rope_frequencies(H/2, base)` and the pairing of `apply_rope`
    (rotate-half within each half, or `interleaved`). So <q, k> depends on (Δrow, Δcol) only.

    x: (B, L, N, H) with H divisible by 4; positions_hw: (B, L, 2) or (L, 2) integer (row, col),
    e.g. `image_positions(h, w)`. Returns x's shape and dtype.
    """
    x = jnp.asarray(x)
    positions_hw = jnp.asarray(positions_hw)
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D (batch, length, heads, head_dim), got shape {x.shape}")
    if x.shape[-1] % 4:
        raise ValueError(f"head_dim must be divisible by 4 (two halves rotated in pairs), got {x.shape[-1]}")
    if positions_hw.shape not in ((x.shape[1], 2), x.shape[:2] + (2,)):
        raise ValueError(f"positions_hw must have shape (L, 2) = {(x.shape[1], 2)} or (B, L, 2) = "
                         f"{x.shape[:2] + (2,)}, got {positions_hw.shape}")
    rows, cols = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([apply_rope(rows, positions_hw[..., 0], base=base, interleaved=interleaved),
                            apply_rope(cols, positions_hw[..., 1], base=base, interleaved=interleaved)], axis=-1)


def sinusoidal_embedding(positions: jax.Array, dim: int, base: float = 10000.0) -> jax.Array:
    """Sinusoidal position encoding (Vaswani et al. 2017, §3.5): sin(p·θ_i) and cos(p·θ_i) with
    θ_i = base^(-2i/dim), i = 0 .. dim/2 - 1 (the frequencies of `rope_frequencies`).

    Layout: sin on the first half of the last axis, cos on the second half (tensor2tensor, DDPM),
    not the paper's interleaving PE(p, 2i) = sin, PE(p, 2i+1) = cos; the two differ by a fixed
    permutation of the features.
    positions: (...) integer or float (e.g. diffusion timesteps). Returns (..., dim) float32.
    """
    if dim % 2:
        raise ValueError(f"dim must be even (sin and cos halves), got {dim}")
    angles = jnp.asarray(positions).astype(jnp.float32)[..., None] * rope_frequencies(dim, base)
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 where each packed segment starts: (..., T) integer segment ids ->
    (..., T) int32, position t of a row = t - (index of the first token of t's run of equal ids).

    A packed window of documents (ids 1, 1, 1, 2, 2, 0, 0) gets (0, 1, 2, 0, 1, 0, 1): every document sees the
    positions it would have alone (as in T5's and MaxText's packed inputs). A segment is a run of equal
    consecutive ids, so ids need not be increasing (padding, id 0, is one more run).
    """
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.ndim < 1 or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be integer ids (..., T), got {segment_ids.dtype}{list(segment_ids.shape)}")
    index = jnp.broadcast_to(jnp.arange(segment_ids.shape[-1], dtype=jnp.int32), segment_ids.shape)
    first = jnp.ones(segment_ids.shape[:-1] + (1,), bool)
    starts = jnp.concatenate([first, segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)


def fourier_feature_matrix(num_features: int, scale: float = 1.0, seed: int = 0) -> jax.Array:
    """The random projection of `random_fourier_features`: B = scale · N(0, 1)^(2 × num_features) (Tancik et al.
    2020, §5, "Gaussian RFF" with standard deviation `scale`; Segment Anything's PositionEmbeddingRandom buffer,
    scale 1). Drawn on the host from `numpy.random.default_rng(seed)`, so it is a fixed function of
    (num_features, scale, seed) and need not be stored with the parameters. Returns (2, num_features) float32."""
    positive_int("num_features", num_features)
    scale = real_in_range("scale", scale, 0, include_low=False)
    matrix = scale * np.random.default_rng(seed).standard_normal((2, num_features))
    return jnp.asarray(matrix, jnp.float32)


def random_fourier_features(coords: jax.Array, matrix: jax.Array) -> jax.Array:
    """Random Fourier features of 2-D positions (Tancik et al. 2020, "Fourier Features Let Networks Learn High
    Frequency Functions in Low Dimensional Domains", eq. 5; Segment Anything, Kirillov et al. 2023, App. A,
    `PositionEmbeddingRandom._pe_encoding`):

        γ(v) = [sin(2π (2v - 1) B), cos(2π (2v - 1) B)],

    the coordinates v in [0, 1]² first mapped to [-1, 1]². coords: (..., 2) float, (x, y) normalised by the image
    width and height; matrix: (2, F), e.g. `fourier_feature_matrix`. Returns (..., 2F) float32 (sines first)."""
    coords, matrix = jnp.asarray(coords), jnp.asarray(matrix)
    if coords.ndim < 1 or coords.shape[-1] != 2:
        raise ValueError(f"coords must have shape (..., 2) (x, y), got shape {coords.shape}")
    if matrix.ndim != 2 or matrix.shape[0] != 2:
        raise ValueError(f"matrix must have shape (2, num_features), got shape {matrix.shape}")
    projected = 2 * math.pi * jnp.matmul(2 * coords.astype(jnp.float32) - 1, matrix.astype(jnp.float32),
                                         precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([jnp.sin(projected), jnp.cos(projected)], axis=-1)


def grid_fourier_features(height: int, width: int, matrix: jax.Array) -> jax.Array:
    """`random_fourier_features` of the centres of an height × width grid of cells, x = (j + 1/2) / width,
    y = (i + 1/2) / height for cell (i, j) (Segment Anything's `PositionEmbeddingRandom.forward`, the image
    embedding's dense positional encoding). Returns (height, width, 2F) float32."""
    positive_int("height", height)
    positive_int("width", width)
    y = (np.arange(height) + 0.5) / height
    x = (np.arange(width) + 0.5) / width
    coords = np.stack(np.meshgrid(x, y, indexing="xy"), axis=-1)  # (H, W, 2) as (x, y)
    return random_fourier_features(jnp.asarray(coords, jnp.float32), matrix)


def sine_position_encoding_2d(height: int, width: int, dim: int, *, temperature: float = 10000.0,
                              normalize: bool = True, scale: float = 2 * math.pi) -> jax.Array:
    """DETR's fixed 2D sine position encoding of a feature map (Carion et al. 2020, §3.2 and appendix A.4;
    `PositionEmbeddingSine` of the official code, for an unpadded map).

    With rows y = i + 1 and columns x = j + 1 (1-based), rescaled to y / (height + 1e-6) · scale and
    x / (width + 1e-6) · scale when `normalize` (DETR: scale 2π), each half of the features is the
    `sinusoidal_embedding` of one coordinate with dim/2 features and base `temperature`, its sin and cos
    interleaved (sin(p·θ_0), cos(p·θ_0), sin(p·θ_1), ...); the row's half comes first. Equal to the official
    code's output (channels-last).

    Returns (height, width, dim) float32; dim divisible by 4.
    """
    positive_int("height", height)
    positive_int("width", width)
    if not isinstance(dim, int) or dim < 4 or dim % 4:
        raise ValueError(f"dim must be a positive multiple of 4 (sin and cos of rows and columns), got {dim}")
    rows = jnp.arange(1, height + 1, dtype=jnp.float32)
    cols = jnp.arange(1, width + 1, dtype=jnp.float32)
    if normalize:
        rows, cols = rows / (height + 1e-6) * scale, cols / (width + 1e-6) * scale

    def half(p):  # (n,) -> (n, dim/2), sin and cos interleaved
        e = sinusoidal_embedding(p, dim // 2, temperature)
        return jnp.stack(jnp.split(e, 2, axis=-1), axis=-1).reshape(p.shape[0], dim // 2)

    y, x = half(rows), half(cols)
    return jnp.concatenate([jnp.broadcast_to(y[:, None], (height, width, dim // 2)),
                            jnp.broadcast_to(x[None, :], (height, width, dim // 2))], axis=-1)
