"""Pre-norm Transformer block (Xiong et al. 2020): x + attn(norm(x)), then x + mlp(norm(x)); or,
for the GAU kinds, x + gau(norm(x)) alone (Hua et al. 2022: one GAU replaces attention and MLP)."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.nn.attention import GAU_KINDS, Attention, AttentionSpec, Cache
from jaxmodels.nn.gau import GAU
from jaxmodels.nn.layers import MLP, make_norm


class TransformerBlock(nnx.Module):
    """x: (batch, length, embed_dim) -> same. Output projections are initialised with
    std scaled by 1/sqrt(2 * num_layers) (GPT-2, Radford et al. 2019) so the residual stream's
    variance stays O(1) with depth.

    `kind` is this layer's attention kind (`AttentionSpec.layer_kind`). For "gau" / "flash_gau" the
    block is a GAU with expansion mlp_dim and shared dim head_dim, relu² scores, RoPE or no
    positions, and FLASH's chunks of attention.chunk_size for "flash_gau".
    """

    def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int, mlp_dim: int,
                 num_layers: int, mlp_kind: str = "swiglu", norm_kind: str = "rms",
                 attention: AttentionSpec = AttentionSpec(), kind: str | None = None, layer: int = 0,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        out_scale = (2 * num_layers) ** -0.5
        kind = kind or attention.kind
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = make_norm(norm_kind, embed_dim, **kw)
        if kind in GAU_KINDS:
            self.attn = GAU(embed_dim, mlp_dim, head_dim, causal=True,
                            chunk_size=attention.chunk_size if kind == "flash_gau" else None,
                            position="rope" if attention.position == "rope" else None,
                            rope_base=attention.rope_base, out_scale=out_scale, **kw)
            self.mlp = None
        else:
            self.attn = Attention(embed_dim, num_heads, num_kv_heads, head_dim, spec=attention, kind=kind,
                                  feature_seed=layer, out_scale=out_scale, **kw)
            self.mlp_norm = make_norm(norm_kind, embed_dim, **kw)
            self.mlp = MLP(embed_dim, mlp_dim, kind=mlp_kind, out_scale=out_scale, **kw)

    @property
    def has_cache(self) -> bool:
        return self.mlp is not None and self.attn.has_cache

    def init_cache(self, batch: int, max_length: int) -> Cache:
        return self.attn.init_cache(batch, max_length)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: Cache | None = None,
                 cache_index: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
        if self.mlp is None:
            if cache is not None:
                raise ValueError("GAU blocks have no cached form; decode without a cache")
            return x + self.attn(self.attn_norm(x), positions), None
        h, cache = self.attn(self.attn_norm(x), positions, cache, cache_index)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return x, cache
