"""Pre-norm Transformer block (Xiong et al. 2020): x + attn(norm(x)), then x + mlp(norm(x))."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.nn.attention import Attention, KVCache
from jaxmodels.nn.layers import MLP, make_norm


class TransformerBlock(nnx.Module):
    """x: (batch, length, embed_dim) -> same. Output projections are initialised with
    std scaled by 1/sqrt(2 * num_layers) (GPT-2, Radford et al. 2019) so the residual stream's
    variance stays O(1) with depth."""

    def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int, mlp_dim: int,
                 num_layers: int, mlp_kind: str = "swiglu", norm_kind: str = "rms", rope_base: float = 10000.0,
                 attention_impl: str | None = None, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        out_scale = (2 * num_layers) ** -0.5
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = make_norm(norm_kind, embed_dim, **kw)
        self.attn = Attention(embed_dim, num_heads, num_kv_heads, head_dim, rope_base=rope_base,
                              implementation=attention_impl, out_scale=out_scale, **kw)
        self.mlp_norm = make_norm(norm_kind, embed_dim, **kw)
        self.mlp = MLP(embed_dim, mlp_dim, kind=mlp_kind, out_scale=out_scale, **kw)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None,
                 cache_index: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        h, cache = self.attn(self.attn_norm(x), positions, cache, cache_index)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return x, cache
