"""Causal self-attention layer of every kind in `jaxmodels.ops`, selected by an `AttentionSpec`.

Kinds (`AttentionSpec.kind`):
  softmax         softmax(Q Kᵀ / sqrt(H)) V (Vaswani et al. 2017), any `dot_product_attention` kernel.
  linear          causal linear attention (Katharopoulos et al. 2020), chunked; recurrent decoding.
  performer       FAVOR+ positive random features (Choromanski et al. 2021), chunked; recurrent decoding.
  norm            TransNormer's NormAttention (Qin et al. 2022), with a learned output gain; recurrent decoding.
  diag            TransNormer's DiagAttention: softmax inside diagonal blocks of `chunk_size`; KV cache.
  transnormer     diag in the lower half of the layers, norm in the upper half (the paper's layout).
  sparse_strided, sparse_fixed, local_global
                  Sparse Transformer patterns (Child et al. 2019) / Longformer-style local + global
                  blocks, computed block-sparse (empty blocks skipped).
  gau, flash_gau  Gated Attention Unit with quadratic relu² attention (FLASH-Quad) or FLASH's
                  mixed-chunk attention (Hua et al. 2022); these replace the whole block
                  (see `jaxmodels.nn.transformer`), not only the attention.
Positions (`AttentionSpec.position`): "rope" (with a context-extension `rope_scaling` and
optional log-n scaling), "alibi" (Press et al. 2022; softmax only), "rerope" (Su 2023; softmax
only, usually switched on at inference for a RoPE-trained model), the absolute "sinusoidal"
(Vaswani et al. 2017) and "learned" (GPT-2) embeddings that the model adds to its input (ABSOLUTE_POSITIONS;
the attention itself is then position-free), or "none".
Packed documents (`segment_ids`): softmax attention with any position but ReRoPE masks the keys of other
documents (`segments_error` names the rest, which cannot).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmodels.nn.layers import RMSNorm, dense
from jaxmodels.nn.param import fan_in_init, param
from jaxmodels.nn.spec import spec_from_section
from jaxmodels.ops import sparse_attention as sparse
from jaxmodels.ops.attention import IMPLEMENTATIONS, dot_product_attention
from jaxmodels.ops.checks import non_negative_int, one_of, positive_int, real_in_range
from jaxmodels.ops.init import t5_query
from jaxmodels.ops.linear_attention import (
    FEATURE_MAPS,
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
from jaxmodels.ops.position import (
    ROPE_SCALING_METHODS,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    log_n_scale,
    rerope_attention,
    rope_inverse_frequencies,
)

SPARSE_KINDS = ("sparse_strided", "sparse_fixed", "local_global")
GAU_KINDS = ("gau", "flash_gau")
KINDS = ("softmax", "linear", "performer", "norm", "diag", "transnormer", *SPARSE_KINDS, *GAU_KINDS)
POSITIONS = ("rope", "alibi", "rerope", "sinusoidal", "learned", "none")
ABSOLUTE_POSITIONS = ("sinusoidal", "learned")  # added to the token embeddings by the model
# Kinds with a cached form: KV cache (softmax, diag, sparse) or recurrent state (linear, performer, norm).
RECURRENT_KINDS = ("linear", "performer", "norm")
CACHED_KINDS = ("softmax", "diag", *SPARSE_KINDS, *RECURRENT_KINDS)
# logits = q·k / divisor(head_dim): Vaswani et al. 2017's sqrt(head_dim) keeps their variance O(1) for unit-variance
# q and k; T5 (Raffel et al. 2020) divides by nothing and shrinks q's initialisation instead (query_init "t5");
# muP (Yang et al. 2021) divides by head_dim. Kinds whose scores take the divisor: LOGIT_SCALED_KINDS.
LOGIT_DIVISORS = {"sqrt_head_dim": math.sqrt, "head_dim": float, "none": lambda head_dim: 1.0}
LOGIT_SCALED_KINDS = ("softmax", "performer", *SPARSE_KINDS)
# The query kernel's initialiser: "lecun" (variance 1 / embed_dim, like k and v) or "t5" (1 / (embed_dim * head_dim),
# `jaxmodels.ops.init.t5_query`, which makes up for logit_divisor "none").
QUERY_INITS = ("lecun", "t5")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What attention a layer computes; the `model.attention` section of a config.

    kind, position: see the module docstring (KINDS, POSITIONS).
    implementation: softmax kernel, None (fastest for the device) or one of IMPLEMENTATIONS; "pallas" (the Pallas
      FlashAttention-2 kernels) also serves the sparse kinds (`block_sparse_attention`'s "pallas": only the
      layout's blocks are computed) and takes ALiBi's slopes, windows and segment ids inside the kernel.
    rope_base: RoPE's base b (θ_i = b^(-2i/H)).
    rope_scaling: context extension (ROPE_SCALING_METHODS): "none", "linear" (position
      interpolation), "ntk", "dynamic_ntk", "yarn"; `rope_factor` s = target / training length.
    train_length: the training context length L, used by dynamic NTK, YaRN and log-n (0 = unset).
    log_n: multiply queries by log(n)/log(L) beyond L keys (Chiang & Cholak 2022).
    max_positions: the table size of "learned" positions (longer sequences are an error).
    rerope_window: ReRoPE's window w; rerope_leaky: Leaky ReRoPE's k (0 = plain ReRoPE).
    qk_norm: RMS-normalise queries and keys per head (learned gains) before RoPE (Dehghani et al. 2023).
    logit_divisor: what q·k is divided by (LOGIT_DIVISORS; kinds in LOGIT_SCALED_KINDS); query_init: the query
      kernel's initialiser (QUERY_INITS). T5 pairs logit_divisor="none" with query_init="t5".
    window: sliding-window softmax, a query sees its last `window` keys (0 = unlimited).
    feature_map: linear/norm kinds' φ (FEATURE_MAPS). num_features: Performer's m.
    chunk_size: chunk of the causal linear forms, diag's block, flash_gau's chunk.
    block_size: compute block of the sparse kinds (the sequence length must be a multiple).
    sparse_block: the pattern's l (strided stride, fixed block, local/global block);
    sparse_summary: fixed's c; window_blocks, global_blocks: local_global's band and global blocks.
    Ranges (ValueError naming attention.X otherwise): the sizes in POSITIVE_INTS are ints >= 1, those in
    NON_NEGATIVE_INTS ints >= 0, rope_base and rope_factor > 0, rerope_leaky >= 0.
    """

    kind: str = "softmax"
    implementation: str | None = None
    position: str = "rope"
    rope_base: float = 10000.0
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    train_length: int = 0
    log_n: bool = False
    max_positions: int = 2048
    rerope_window: int = 16
    rerope_leaky: float = 0.0
    qk_norm: bool = False
    logit_divisor: str = "sqrt_head_dim"
    query_init: str = "lecun"
    window: int = 0
    feature_map: str = "elu"
    num_features: int = 64
    chunk_size: int = 64
    block_size: int = 16
    sparse_block: int = 16
    sparse_summary: int = 4
    window_blocks: int = 1
    global_blocks: int = 1

    POSITIVE_INTS = ("max_positions", "rerope_window", "num_features", "chunk_size", "block_size", "sparse_block",
                     "sparse_summary")
    NON_NEGATIVE_INTS = ("train_length", "window", "window_blocks", "global_blocks")

    def __post_init__(self):
        for name, choices in (("kind", KINDS), ("position", POSITIONS), ("rope_scaling", ROPE_SCALING_METHODS),
                              ("implementation", (None, *IMPLEMENTATIONS)), ("feature_map", tuple(FEATURE_MAPS)),
                              ("logit_divisor", tuple(LOGIT_DIVISORS)), ("query_init", QUERY_INITS)):
            one_of(f"attention.{name}", getattr(self, name), choices)
        for name in self.POSITIVE_INTS:
            positive_int(f"attention.{name}", getattr(self, name))
        for name in self.NON_NEGATIVE_INTS:
            non_negative_int(f"attention.{name}", getattr(self, name))
        for name in ("rope_base", "rope_factor"):
            real_in_range(f"attention.{name}", getattr(self, name), 0, include_low=False)
        real_in_range("attention.rerope_leaky", self.rerope_leaky, 0)
        if self.position in ("alibi", "rerope") and self.kind != "softmax":
            raise ValueError(f"attention.position={self.position!r} needs attention.kind='softmax', got {self.kind!r}")
        if self.rope_scaling != "none" and self.position != "rope":
            raise ValueError(f"attention.rope_scaling={self.rope_scaling!r} needs attention.position='rope'")
        needs_length = self.rope_scaling in ("dynamic_ntk", "yarn") or self.log_n
        if needs_length and self.train_length < 2:
            raise ValueError("attention.train_length (the training context length) must be set (>= 2) for "
                             f"rope_scaling={self.rope_scaling!r} / log_n={self.log_n}")
        if self.window and self.kind != "softmax":
            raise ValueError(f"attention.window needs attention.kind='softmax', got {self.kind!r}")
        if self.kind in GAU_KINDS and self.position in ("alibi", "rerope"):
            raise ValueError(f"attention.kind={self.kind!r} does not support position {self.position!r}")
        if self.logit_divisor != "sqrt_head_dim" and self.kind not in LOGIT_SCALED_KINDS:
            raise ValueError(f"attention.logit_divisor={self.logit_divisor!r} needs attention.kind in "
                             f"{list(LOGIT_SCALED_KINDS)} (whose scores are q·k / divisor), got {self.kind!r}")
        if self.query_init != "lecun" and self.kind in GAU_KINDS:
            raise ValueError(f"attention.query_init={self.query_init!r} needs a kind with a query kernel, got "
                             f"{self.kind!r} (GAU derives q and k from one shared projection)")

    def layer_kind(self, layer: int, num_layers: int) -> str:
        """The kind of layer `layer` (0-based): TransNormer puts diag below norm, others are uniform."""
        if self.kind == "transnormer":
            return "diag" if layer < num_layers // 2 else "norm"
        return self.kind


def segments_error(kind: str, position: str) -> str | None:
    """Why a layer of attention `kind` with `position` cannot keep packed documents apart (mask the keys of
    other segments), or None when it can: softmax attention with any position but "rerope". The linear,
    performer and norm kinds sum keys into one state, diag and the sparse kinds have their own kernels, and
    ReRoPE its own score matrices, none of which takes a segment mask."""
    if kind == "softmax" and position != "rerope":
        return None
    what = f"position {position!r}" if kind == "softmax" else f"attention kind {kind!r}"
    return (f"{what} cannot keep packed documents apart (segment_ids): only kind 'softmax' with a position "
            f"other than 'rerope' masks the keys of other documents")


def prefix_error(kind: str, position: str) -> str | None:
    """Why a layer of attention `kind` with `position` cannot take prefix tuning's keys and values, or None when
    it can: softmax attention with any position but ALiBi and ReRoPE (whose scores depend on key positions that a
    prefix does not have)."""
    if kind == "softmax" and position not in ("alibi", "rerope"):
        return None
    what = f"position {position!r}" if kind == "softmax" else f"attention kind {kind!r}"
    return (f"{what} cannot take prefix tuning's keys and values: only kind 'softmax' with a position other than "
            "'alibi' and 'rerope' can")


def spec_from_config(attention: dict | None) -> AttentionSpec:
    """AttentionSpec from a config section (a dict / ConfigDict of its fields); None gives the defaults."""
    return spec_from_section(AttentionSpec, attention, "attention")


Cache = dict  # {"k", "v"} (B, max_length, K, H) for KV-cached kinds; {"state"} for RECURRENT_KINDS


def cache_mask(query_length: int, max_length: int, cache_index: jax.Array, window: int = 0) -> jax.Array:
    """(1, 1, T, S) boolean: query i (absolute position p = cache_index + i) sees cache slots j <= p
    (and j > p - window with a sliding window). This also hides the slots not yet written."""
    q_pos = (cache_index + jnp.arange(query_length))[:, None]
    slots = jnp.arange(max_length)[None, :]
    allowed = slots <= q_pos
    if window:
        allowed &= slots > q_pos - window
    return allowed[None, None]


def sparse_pattern(kind: str, length: int, spec: AttentionSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """(element mask (T, T), block layout (T/b, T/b) or None if T is not a multiple of b) of a causal
    sparse kind."""
    mask = {"sparse_strided": lambda: sparse.strided_mask(length, spec.sparse_block, causal=True),
            "sparse_fixed": lambda: sparse.fixed_mask(length, spec.sparse_block, spec.sparse_summary, causal=True),
            "local_global": lambda: sparse.local_global_mask(length, spec.sparse_block,
                                                             window_blocks=spec.window_blocks,
                                                             global_blocks=spec.global_blocks, causal=True)}[kind]()
    layout = sparse.block_layout(mask, spec.block_size) if length % spec.block_size == 0 else None
    return mask, layout


class Attention(nnx.Module):
    """Causal self-attention with grouped-query heads (Ainslie et al. 2023) of any kind in KINDS
    except the GAU ones. x: (batch, length, embed_dim) -> (batch, length, embed_dim).

    Kernels: q (embed, heads, head_dim), k/v (embed, kv_heads, head_dim), o (heads, head_dim, embed);
    with qk_norm, RMSNorm gains (head_dim,) for q and k; for kind "norm", an output gain (heads, head_dim).
    `feature_seed` fixes the Performer's random features (a constant of the layer, not a parameter;
    redraw by building the layer with another seed).
    """

    LORA_PROJECTIONS = ("w_q", "w_k", "w_v", "w_o")  # kernels used only through `dense` (`nn.peft.lora_projections`)

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 spec: AttentionSpec = AttentionSpec(), kind: str | None = None, feature_seed: int = 0,
                 out_scale: float = 1.0, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.spec, self.kind = spec, kind or spec.kind
        if self.kind in GAU_KINDS + ("transnormer",):
            raise ValueError(f"Attention computes one kind per layer; {self.kind!r} is resolved by the block/model")
        if spec.position in ("rope", "rerope") and head_dim % 2:
            raise ValueError(f"RoPE rotates pairs of dims: head_dim must be even, got {head_dim}")
        self.num_heads, self.head_dim, self.feature_seed, self.dtype = num_heads, head_dim, feature_seed, dtype
        init = fan_in_init()
        q_init = t5_query(head_dim, "truncated_normal", in_axis=0, out_axis=(1, 2)) if spec.query_init == "t5" else init
        self.w_q = param(rngs, q_init, (embed_dim, num_heads, head_dim), ("embed", "heads", "head_dim"), param_dtype)
        kv_axes = ("embed", "kv_heads", "head_dim")
        self.w_k = param(rngs, init, (embed_dim, num_kv_heads, head_dim), kv_axes, param_dtype)
        self.w_v = param(rngs, init, (embed_dim, num_kv_heads, head_dim), kv_axes, param_dtype)
        self.w_o = param(rngs, fan_in_init(fan_in_dims=2, scale=out_scale**2), (num_heads, head_dim, embed_dim),
                         ("heads", "head_dim", "embed"), param_dtype)
        if spec.qk_norm:
            self.q_norm = RMSNorm(head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.k_norm = RMSNorm(head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if self.kind == "norm":
            self.out_gain = param(rngs, jax.nn.initializers.ones, (num_heads, head_dim), ("heads", "head_dim"),
                                  param_dtype)

    @property
    def has_cache(self) -> bool:
        return self.kind in CACHED_KINDS

    def init_cache(self, batch: int, max_length: int) -> Cache:
        """An empty cache for sequences up to max_length tokens (kinds in CACHED_KINDS)."""
        num_kv_heads = self.w_k.value.shape[1]
        if self.kind in RECURRENT_KINDS:
            features = self.spec.num_features if self.kind == "performer" else self.head_dim
            return {"state": linear_attention_init_state(batch, num_kv_heads, features, self.head_dim)}
        if self.kind not in CACHED_KINDS:
            raise ValueError(f"attention kind {self.kind!r} has no cached form; decode without a cache")
        shape = (batch, max_length, num_kv_heads, self.head_dim)
        return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

    def __call__(self, x: jax.Array, positions: jax.Array, cache: Cache | None = None,
                 cache_index: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 prefix: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, Cache | None]:
        """x: (B, T, D); positions: (B, T) int positions (with segment_ids, each document's own, from 0). With a
        cache (from `init_cache`), x holds the tokens at positions cache_index .. cache_index + T - 1; returns the
        new cache. segment_ids: None or (B, T) int, packed documents: a query attends only to keys of its own
        segment (no cache then; ValueError, from `segments_error`, for kinds that cannot).
        prefix: None or (keys, values), each (P, K, H): prefix tuning's learned positions (`nn.peft.Prefix`),
        which every query sees before the sequence's own keys (and every document of a packed row); used as they
        are (no RoPE). Softmax attention only, without ALiBi or ReRoPE (PREFIX_ERROR)."""
        spec = self.spec
        if segment_ids is not None:
            error = segments_error(self.kind, spec.position)
            if error or cache is not None:
                raise ValueError(error or "segment_ids are for a whole-sequence forward; decoding with a cache "
                                          "takes one sequence per row")
        if prefix is not None and prefix_error(self.kind, spec.position):
            raise ValueError(prefix_error(self.kind, spec.position))
        q, k, v = (dense(x, w.value, self.dtype, "bld,dnh->blnh") for w in (self.w_q, self.w_k, self.w_v))
        if spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        length = x.shape[1] if cache is None else cache_index + x.shape[1]  # keys seen by the last query
        scale = 1.0 / LOGIT_DIVISORS[spec.logit_divisor](self.head_dim)
        if spec.position == "rope":
            scaling = rope_inverse_frequencies(self.head_dim, base=spec.rope_base, method=spec.rope_scaling,
                                               factor=spec.rope_factor, train_length=spec.train_length or None,
                                               length=length)
            q = apply_rope(q, positions, inv_freq=scaling.inv_freq)
            k = apply_rope(k, positions, inv_freq=scaling.inv_freq)
            scale *= scaling.attention_scale
            if spec.log_n:  # query at position p attends p + 1 keys
                q = q * log_n_scale(positions + 1, spec.train_length)[..., None, None].astype(q.dtype)
        if prefix is not None:
            out, cache = self._attend_with_prefix(q, k, v, scale, prefix, cache, cache_index, segment_ids)
        elif cache is None:
            out = self._attend(q, k, v, scale, segment_ids)
        else:
            out, cache = self._attend_cached(q, k, v, scale, cache, cache_index)
        if self.kind == "norm":
            out = out * self.out_gain.value.astype(out.dtype)
        return dense(out, self.w_o.value, self.dtype, "blnh,nhd->bld"), cache

    def _attend(self, q, k, v, scale, segment_ids=None):
        """Causal attention of the whole sequence: q (B, T, N, H), k, v (B, T, K, H) -> (B, T, N, H); softmax
        also within segments (segment_ids (B, T) or None; ALiBi's and the window's distances are relative,
        so they are those of each document alone)."""
        spec, kind = self.spec, self.kind
        if kind == "softmax":
            if spec.position == "rerope":
                return rerope_attention(q, k, v, window=spec.rerope_window, leaky=spec.rerope_leaky or None,
                                        base=spec.rope_base, is_causal=True, scale=scale)
            slopes = alibi_slopes(self.num_heads) if spec.position == "alibi" else None
            window = (spec.window - 1, 0) if spec.window else None
            return dot_product_attention(q, k, v, scale=scale, is_causal=True, segment_ids=segment_ids,
                                         local_window_size=window, alibi_slopes=slopes,
                                         implementation=spec.implementation)
        if kind == "linear":
            return linear_attention(q, k, v, feature_map=spec.feature_map, causal=True, chunk_size=spec.chunk_size)
        if kind == "performer":
            return performer_attention(q, k, v, self._projection(q.dtype), causal=True, chunk_size=spec.chunk_size,
                                       scale=scale)
        if kind == "norm":
            return norm_attention(q, k, v, causal=True, chunk_size=spec.chunk_size, feature_map=spec.feature_map)
        if kind == "diag":
            return diagonal_block_attention(q, k, v, block_size=spec.chunk_size, causal=True)
        mask, layout = sparse_pattern(kind, q.shape[1], spec)
        if layout is None:
            raise ValueError(f"attention kind {kind!r} needs the length ({q.shape[1]}) to be a multiple of "
                             f"attention.block_size={spec.block_size}")
        return sparse.block_sparse_attention(q, k, v, layout, block_size=spec.block_size, mask=mask, scale=scale,
                                             implementation="pallas" if spec.implementation == "pallas" else None)

    def _attend_with_prefix(self, q, k, v, scale, prefix, cache, cache_index, segment_ids):
        """Softmax attention over the prefix's P keys then the sequence's (the cache's, when decoding): the
        prefix visible to every query, the rest causal (within the window and the query's document).
        Returns (out (B, T, N, H), the cache or None)."""
        t = q.shape[1]
        if cache is None:
            allowed = cache_mask(t, t, 0, self.spec.window)
            if segment_ids is not None:
                allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        else:
            start = (0, cache_index, 0, 0)
            cache = {name: jax.lax.dynamic_update_slice(cache[name], new.astype(cache[name].dtype), start)
                     for name, new in (("k", k), ("v", v))}
            k, v = cache["k"], cache["v"]
            allowed = cache_mask(t, k.shape[1], cache_index, self.spec.window)
        pk, pv = (jnp.broadcast_to(p.astype(k.dtype), (k.shape[0], *p.shape)) for p in prefix)
        mask = jnp.concatenate([jnp.ones((*allowed.shape[:-1], pk.shape[1]), bool), allowed], axis=-1)
        out = dot_product_attention(q, jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1), None, mask,
                                    scale=scale, implementation=self.spec.implementation)
        return out, cache

    def _attend_cached(self, q, k, v, scale, cache, cache_index):
        """Attention of T new tokens against the cache; returns (out (B, T, N, H), new cache)."""
        spec, kind = self.spec, self.kind
        if kind in RECURRENT_KINDS:
            feature_map = spec.feature_map
            if kind == "performer":  # φ(x·scale^½) with the causal (unstabilised) features, for q and k alike
                projection = self._projection(q.dtype)
                feature_map = lambda x: performer_features(x * math.sqrt(scale), projection, is_query=False,
                                                           causal=True)

            step_fn = norm_attention_step if kind == "norm" else linear_attention_step

            def step(state, qkv):
                out, state = step_fn(state, *(a[:, None] for a in qkv), feature_map=feature_map)
                return state, out[:, 0]

            state, out = jax.lax.scan(step, cache["state"], tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v)))
            return jnp.moveaxis(out, 0, 1), {"state": state}
        start = (0, cache_index, 0, 0)
        cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start),
                 "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)}
        t, max_length = q.shape[1], cache["k"].shape[1]
        if spec.position == "rerope":
            out = rerope_attention(q, cache["k"], cache["v"], window=spec.rerope_window,
                                   leaky=spec.rerope_leaky or None, base=spec.rope_base, is_causal=True, scale=scale,
                                   q_offset=cache_index)
            return out, cache
        if kind == "softmax":
            mask = cache_mask(t, max_length, cache_index, spec.window)
        elif kind == "diag":  # earlier slots of the query's own block
            positions = cache_index + jnp.arange(t)
            same_block = jnp.arange(max_length)[None, :] // spec.chunk_size == positions[:, None] // spec.chunk_size
            mask = (same_block & cache_mask(t, max_length, cache_index)[0, 0])[None, None]
        else:  # sparse: rows cache_index.. of the pattern over all max_length slots
            pattern = jnp.asarray(sparse_pattern(kind, max_length, spec)[0])
            mask = jax.lax.dynamic_slice_in_dim(pattern, cache_index, t, axis=0)[None, None]
        bias = None
        if spec.position == "alibi":
            bias = alibi_bias(self.num_heads, t, max_length, q_offset=cache_index)
        out = dot_product_attention(q, cache["k"], cache["v"], bias, mask, scale=scale,
                                    implementation=spec.implementation)
        return out, cache

    def _projection(self, dtype) -> jax.Array:
        """The Performer's (num_features, head_dim) orthogonal random features, fixed by feature_seed."""
        return orthogonal_random_features(jax.random.key(self.feature_seed), self.spec.num_features,
                                          self.head_dim).astype(dtype)
