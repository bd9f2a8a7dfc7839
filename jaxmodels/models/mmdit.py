"""Multimodal Diffusion Transformer, MMDiT (Esser et al. 2024, "Scaling Rectified Flow Transformers
for High-Resolution Image Synthesis", §4, Fig. 2): two token streams, image patches and context
(e.g. text) tokens, each with its own weights and adaLN modulation from y = timestep embedding +
pooled-conditioning embedding, joined in one attention over the concatenated sequence
[context, image]. Queries and keys are RMS-normalised per head (§5.3.2); image tokens carry 2D
RoPE (the axial rotary positions of FLUX, instead of SD3's absolute embedding), context tokens none.

x (B, H, W, C), t (B,), context (B, S, context_dim), pooled (B, pooled_dim) -> (B, H, W, C).
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.base import Model
from jaxmodels.models.dit import FinalLayer
from jaxmodels.nn.diffusion import (
    AdaLNModulation,
    Linear,
    TimestepEmbedding,
    layer_norm,
    modulate,
    patchify,
    unpatchify,
)
from jaxmodels.nn.layers import MLP, RMSNorm, dense
from jaxmodels.nn.param import fan_in_init, param
from jaxmodels.ops.attention import dot_product_attention
from jaxmodels.ops.position import apply_rope_2d, image_positions


class _Stream(nnx.Module):
    """One stream's weights in one MMDiT block: adaLN modulation, q/k/v with per-head RMSNorm on
    q and k, and (unless `pre_only`, the last block's context stream in SD3) the output projection
    and MLP."""

    def __init__(self, dim, num_heads, mlp_dim, *, pre_only, kw):
        head_dim = dim // num_heads
        param_dtype, rngs = kw["param_dtype"], kw["rngs"]
        self.pre_only, self.dtype = pre_only, kw["dtype"]
        self.modulation = AdaLNModulation(dim, dim, 2 if pre_only else 6, **kw)
        self.w_qkv = param(rngs, fan_in_init(), (dim, 3, num_heads, head_dim), ("embed", None, "heads", "head_dim"),
                           param_dtype)
        self.q_norm = RMSNorm(head_dim, **kw)
        self.k_norm = RMSNorm(head_dim, **kw)
        if not pre_only:
            self.w_o = param(rngs, fan_in_init(2), (num_heads, head_dim, dim), ("heads", "head_dim", "embed"),
                             param_dtype)
            self.mlp = MLP(dim, mlp_dim, kind="gelu", **kw)

    def qkv(self, x, c):
        """(q, k, v) each (B, L, N, H) of the modulated, normalised x, and the remaining modulation."""
        mods = self.modulation(c)
        qkv = dense(modulate(layer_norm(x), mods[0], mods[1]), self.w_qkv.value, self.dtype, "bld,dtnh->btlnh")
        return self.q_norm(qkv[:, 0]), self.k_norm(qkv[:, 1]), qkv[:, 2], mods[2:]

    def post(self, x, attn, mods):
        """Gated residual of the attention output, then of the MLP (adaLN-Zero, as DiT's block)."""
        gate1, shift2, scale2, gate2 = mods
        x = x + gate1[:, None, :] * dense(attn, self.w_o.value, self.dtype, "blnh,nhd->bld")
        return x + gate2[:, None, :] * self.mlp(modulate(layer_norm(x), shift2, scale2))


class MMDiTBlock(nnx.Module):
    """One MMDiT block (Esser et al. 2024, Fig. 2b): per stream, modulate(LN(·)) and q, k, v with
    RMSNorm on q and k; 2D RoPE on the image queries and keys; softmax attention over the joint
    sequence [context; image]; per stream, gated output projection and gated MLP. All modulations
    are zero-initialised (adaLN-Zero), so the block starts as the identity on both streams.

    x: (B, L, dim) image tokens at grid positions `positions` (L, 2); ctx: (B, S, dim); c: (B, dim).
    Returns (x, ctx) of the same shapes, ctx None when `context_pre_only` (the last block).
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, context_pre_only: bool = False,
                 rope_base: float = 10000.0, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if dim % num_heads or (dim // num_heads) % 4:
            raise ValueError(f"dim / num_heads must be an integer divisible by 4 (2D RoPE), got dim={dim}, "
                             f"num_heads={num_heads}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.rope_base = rope_base
        self.image = _Stream(dim, num_heads, mlp_dim, pre_only=False, kw=kw)
        self.context = _Stream(dim, num_heads, mlp_dim, pre_only=context_pre_only, kw=kw)

    def __call__(self, x: jax.Array, ctx: jax.Array, c: jax.Array, positions: jax.Array):
        qx, kx, vx, mods_x = self.image.qkv(x, c)
        qc, kc, vc, mods_c = self.context.qkv(ctx, c)
        qx = apply_rope_2d(qx, positions, base=self.rope_base)
        kx = apply_rope_2d(kx, positions, base=self.rope_base)
        joint = dot_product_attention(jnp.concatenate([qc, qx], 1), jnp.concatenate([kc, kx], 1),
                                      jnp.concatenate([vc, vx], 1))
        num_ctx = ctx.shape[1]
        x = self.image.post(x, joint[:, num_ctx:], mods_x)
        ctx = None if self.context.pre_only else self.context.post(ctx, joint[:, :num_ctx], mods_c)
        return x, ctx


class MMDiT(Model):
    """MMDiT (see the module docstring).

    input_size: image height = width, divisible by patch_size; in_channels: C.
    context_dim: width of the context tokens (projected to hidden_dim by a linear layer).
    pooled_dim: width of the pooled conditioning vector (0: none), embedded by Linear-SiLU-Linear
      and added to the timestep embedding (SD3's y).
    hidden_dim, depth, num_heads (hidden_dim / num_heads divisible by 4), mlp_ratio: the Transformer.
    The last block's context stream is "pre-only" (SD3): its output would be discarded.

    __call__(x (B, H, W, C), t (B,) float, context (B, S, context_dim), pooled (B, pooled_dim) or None)
    -> (B, H, W, C) float32.
    """

    def __init__(self, *, input_size: int, patch_size: int, in_channels: int, context_dim: int, hidden_dim: int,
                 depth: int, num_heads: int, pooled_dim: int = 0, mlp_ratio: float = 4.0, rope_base: float = 10000.0,
                 frequency_dim: int = 256, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if input_size % patch_size:
            raise ValueError(f"input_size ({input_size}) must be divisible by patch_size ({patch_size})")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if hidden_dim % num_heads or (hidden_dim // num_heads) % 4:
            raise ValueError(f"hidden_dim / num_heads must be an integer divisible by 4 (2D RoPE), got hidden_dim="
                             f"{hidden_dim}, num_heads={num_heads}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.context_dim, self.pooled_dim = context_dim, pooled_dim
        self.patch_embed = Linear(patch_size * patch_size * in_channels, hidden_dim, logical_axes=(None, "embed"),
                                  **kw)
        self.context_embed = Linear(context_dim, hidden_dim, **kw)
        self.time_embed = TimestepEmbedding(hidden_dim, frequency_dim=frequency_dim, **kw)
        if pooled_dim:
            self.pooled_fc1 = Linear(pooled_dim, hidden_dim, **kw)
            self.pooled_fc2 = Linear(hidden_dim, hidden_dim, logical_axes=("mlp", "embed"), **kw)
        self.blocks = nnx.List([
            MMDiTBlock(hidden_dim, num_heads, int(hidden_dim * mlp_ratio), context_pre_only=i == depth - 1,
                       rope_base=rope_base, **kw) for i in range(depth)])
        self.final = FinalLayer(hidden_dim, hidden_dim, patch_size * patch_size * in_channels, **kw)

    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, pooled: jax.Array | None = None) -> jax.Array:
        expected = (self.input_size, self.input_size, self.in_channels)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(f"x must be (batch, {', '.join(map(str, expected))}), got shape {x.shape}")
        if t.shape != x.shape[:1]:
            raise ValueError(f"t must be (batch,) = {x.shape[:1]}, got shape {t.shape}")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != self.context_dim:
            raise ValueError(f"context must be ({x.shape[0]}, length, {self.context_dim}), got shape {context.shape}")
        if (pooled is None) != (not self.pooled_dim) or (pooled is not None and
                                                         pooled.shape != (x.shape[0], self.pooled_dim)):
            raise ValueError(f"pooled must be ({x.shape[0]}, {self.pooled_dim}) when pooled_dim is set and None "
                             f"otherwise, got {None if pooled is None else pooled.shape}")
        h = self.patch_embed(patchify(x, self.patch_size))
        ctx = self.context_embed(context)
        c = self.time_embed(t)
        if pooled is not None:
            c = c + self.pooled_fc2(jax.nn.silu(self.pooled_fc1(pooled)))
        grid = self.input_size // self.patch_size
        positions = image_positions(grid, grid)
        for block in self.blocks:
            h, ctx = block(h, ctx, c, positions)
        out = self.final(h, c)
        return unpatchify(out, self.patch_size, self.input_size, self.input_size).astype(jnp.float32)
