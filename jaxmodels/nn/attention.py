"""Multi-head self-attention layer with grouped KV heads, RoPE and a KV cache."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.nn.layers import dense
from jaxmodels.nn.param import fan_in_init, param
from jaxmodels.ops.attention import dot_product_attention
from jaxmodels.ops.position import apply_rope

KVCache = dict[str, jax.Array]  # {"k", "v"}: (batch, max_length, num_kv_heads, head_dim)


def init_kv_cache(batch: int, max_length: int, num_kv_heads: int, head_dim: int, dtype) -> KVCache:
    """An empty (zero) cache for one attention layer; filled slots are tracked by the caller's index."""
    shape = (batch, max_length, num_kv_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cache_mask(query_length: int, max_length: int, cache_index: jax.Array) -> jax.Array:
    """(1, 1, T, S) boolean: query i (absolute position cache_index + i) sees cache slots j <= its position.

    This is causal masking over the cache and also hides the slots not yet written.
    """
    q_pos = cache_index + jnp.arange(query_length)
    return (jnp.arange(max_length)[None, :] <= q_pos[:, None])[None, None]


class Attention(nnx.Module):
    """Causal self-attention (Vaswani et al. 2017) with grouped-query heads (Ainslie et al. 2023)
    and rotary position embedding (Su et al. 2021).

    x: (batch, length, embed_dim) -> (batch, length, embed_dim). Kernels: q (embed, heads, head_dim),
    k/v (embed, kv_heads, head_dim), o (heads, head_dim, embed).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 rope_base: float = 10000.0, implementation: str | None = None, out_scale: float = 1.0,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.rope_base, self.implementation, self.dtype = rope_base, implementation, dtype
        init = fan_in_init()
        self.w_q = param(rngs, init, (embed_dim, num_heads, head_dim), ("embed", "heads", "head_dim"), param_dtype)
        self.w_k = param(rngs, init, (embed_dim, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.w_v = param(rngs, init, (embed_dim, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.w_o = param(rngs, fan_in_init(fan_in_dims=2, scale=out_scale**2), (num_heads, head_dim, embed_dim),
                         ("heads", "head_dim", "embed"), param_dtype)

    def _project(self, x, kernel):
        return dense(x, kernel, self.dtype, "bld,dnh->blnh")

    def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None,
                 cache_index: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """positions: (batch, length) int. With a cache, x holds the tokens at absolute positions
        cache_index .. cache_index + length - 1; returns the updated cache."""
        q = apply_rope(self._project(x, self.w_q.value), positions, base=self.rope_base)
        k = apply_rope(self._project(x, self.w_k.value), positions, base=self.rope_base)
        v = self._project(x, self.w_v.value)
        if cache is None:
            out = dot_product_attention(q, k, v, is_causal=True, implementation=self.implementation)
        else:
            start = (0, cache_index, 0, 0)
            cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start),
                     "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)}
            mask = cache_mask(x.shape[1], cache["k"].shape[1], cache_index)
            out = dot_product_attention(q, cache["k"], cache["v"], mask=mask, implementation=self.implementation)
        y = dense(out, self.w_o.value, self.dtype, "blnh,nhd->bld")
        return y, cache
