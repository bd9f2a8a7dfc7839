"""Layers of DETR (Carion et al. 2020, "End-to-End Object Detection with Transformers") and Deformable DETR (Zhu
et al. 2021): a small convolutional backbone, the post-norm Transformer encoder and decoder layers that add
positions to queries and keys (not values), the box MLP, and the multi-scale deformable attention module.

Images and feature maps are channels-last (B, H, W, C); tokens (B, L, dim). Parameters are `param_dtype`,
arithmetic `dtype`, norms float32. DETR's layers use ReLU feed-forward blocks with biases and LayerNorm after each
residual sum ("post-norm", the official `normalize_before=False`); here the feed-forward block is the library's
bias-free GELU `MLP` and the attention projections are bias-free (`MultiHeadAttention`). No dropout.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.nn.conv import Conv2D, GroupNorm
from jaxmodels.nn.diffusion import Linear, MultiHeadAttention
from jaxmodels.nn.layers import MLP, LayerNorm
from jaxmodels.ops.deformable import multi_scale_deformable_attention


class ConvBackbone(nnx.Module):
    """A small ResNet-like CNN standing in for DETR's ResNet-50: stage i is Conv3x3 stride 2 -> GroupNorm -> ReLU
    -> Conv3x3 -> GroupNorm -> ReLU with channels[i] channels (GroupNorm of `num_groups` groups), so stage i's map
    has stride 2^(i+1).

    x: (B, H, W, in_channels), H and W divisible by 2^len(channels). Returns the list of every stage's map
    [(B, H / 2^(i+1), W / 2^(i+1), channels[i])] in `dtype`.
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...], *, num_groups: int = 8, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_channels, self.num_stages = in_channels, len(channels)
        ins = (in_channels,) + tuple(channels[:-1])
        self.down = nnx.List([Conv2D(c_in, c, 3, stride=2, **kw) for c_in, c in zip(ins, channels)])
        self.conv = nnx.List([Conv2D(c, c, 3, **kw) for c in channels])
        self.norm1 = nnx.List([GroupNorm(num_groups, c, **kw) for c in channels])
        self.norm2 = nnx.List([GroupNorm(num_groups, c, **kw) for c in channels])

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        factor = 2 ** self.num_stages
        if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"x must be (batch, height, width, {self.in_channels}) with height and width divisible "
                             f"by 2^{self.num_stages} = {factor}, got shape {x.shape}")
        maps = []
        for down, conv, norm1, norm2 in zip(self.down, self.conv, self.norm1, self.norm2):
            x = jax.nn.relu(norm1(down(x)))
            x = jax.nn.relu(norm2(conv(x)))
            maps.append(x)
        return maps


class BoxMLP(nnx.Module):
    """DETR's box head: a 3-layer perceptron dim -> dim -> dim -> 4 with ReLU between (the official `MLP`).
    x: (..., dim) -> (..., 4) in `dtype`, before the sigmoid."""

    def __init__(self, dim: int, *, num_layers: int = 3, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        sizes = [dim] * num_layers + [4]
        self.layers = nnx.List([Linear(a, b, **kw) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else jax.nn.relu(layer(x))
        return x


class DetrEncoderLayer(nnx.Module):
    """DETR's encoder layer (post-norm): x = LN(x + SelfAttn(q = k = x + pos, v = x)); x = LN(x + FFN(x)).
    x, pos: (B, L, dim). Returns (B, L, dim) in `dtype`."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = MultiHeadAttention(dim, num_heads, **kw)
        self.mlp = MLP(dim, mlp_dim, kind="gelu", **kw)
        self.norm1, self.norm2 = LayerNorm(dim, **kw), LayerNorm(dim, **kw)

    def __call__(self, x: jax.Array, pos: jax.Array) -> jax.Array:
        x = self.norm1(x + self.attn(x + pos, value=x))
        return self.norm2(x + self.mlp(x))


class DetrDecoderLayer(nnx.Module):
    """DETR's decoder layer (post-norm) on the object queries' states t with their learned embeddings q_pos:

        t = LN(t + SelfAttn(q = k = t + q_pos, v = t))
        t = LN(t + CrossAttn(q = t + q_pos, k = memory + pos, v = memory))
        t = LN(t + FFN(t))

    t, q_pos: (B, Q, dim); memory, pos: (B, L, dim). Returns (B, Q, dim) in `dtype`.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = MultiHeadAttention(dim, num_heads, **kw)
        self.cross_attn = MultiHeadAttention(dim, num_heads, context_dim=dim, **kw)
        self.mlp = MLP(dim, mlp_dim, kind="gelu", **kw)
        self.norm1, self.norm2, self.norm3 = LayerNorm(dim, **kw), LayerNorm(dim, **kw), LayerNorm(dim, **kw)

    def __call__(self, t: jax.Array, query_pos: jax.Array, memory: jax.Array, pos: jax.Array) -> jax.Array:
        t = self.norm1(t + self.self_attn(t + query_pos, value=t))
        t = self.norm2(t + self.cross_attn(t + query_pos, memory + pos, value=memory))
        return self.norm3(t + self.mlp(t))


def sampling_offset_bias(num_heads: int, num_levels: int, num_points: int) -> jax.Array:
    """Deformable DETR's initial sampling offsets (the official `_reset_parameters`): head m points in direction
    θ_m = 2πm / M, scaled so that the larger of |cos θ|, |sin θ| is 1, and point k lies k + 1 pixels out, on every
    level. Returns (M·L·P·2,) float32 in the (head, level, point, xy) order of the offsets' projection."""
    theta = jnp.arange(num_heads, dtype=jnp.float32) * (2 * math.pi / num_heads)
    grid = jnp.stack([jnp.cos(theta), jnp.sin(theta)], -1)
    grid = grid / jnp.max(jnp.abs(grid), axis=-1, keepdims=True)
    scale = jnp.arange(1, num_points + 1, dtype=jnp.float32)[None, None, :, None]
    return (grid[:, None, None, :] * scale * jnp.ones((1, num_levels, 1, 1))).reshape(-1)


class MultiScaleDeformableAttention(nnx.Module):
    """Multi-scale deformable attention module (Zhu et al. 2021, eq. 3; `MSDeformAttn` of the official code).

    Each query reads P points per head on each of L levels around its reference point p̂ (normalised (x, y) in
    [0, 1]² per level): locations p̂ + Δp / (W_l, H_l) with offsets Δp (in pixels of level l) = Linear(query),
    weights A = softmax over the L·P points of Linear(query) per head, values Linear(input) split into heads;
    the sampled values (`ops.deformable.multi_scale_deformable_attention`) go through an output Linear. As the
    paper: offsets' weights zero and bias `sampling_offset_bias`, attention weights' projection zero (uniform
    weights at init).

    query: (B, Q, dim); reference_points: (B, Q, L, 2) normalised (x, y); value: (B, S, dim), the L levels'
    flattened maps concatenated (S = Σ H_l W_l); spatial_shapes: static ((H_0, W_0), ...). Returns (B, Q, dim).
    """

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.num_levels, self.num_points, self.dtype = num_heads, num_levels, num_points, dtype
        self.sampling_offsets = Linear(dim, num_heads * num_levels * num_points * 2, zero_init=True, **kw)
        self.sampling_offsets.bias.value = sampling_offset_bias(num_heads, num_levels, num_points).astype(param_dtype)
        self.attention_weights = Linear(dim, num_heads * num_levels * num_points, zero_init=True, **kw)
        self.value_proj = Linear(dim, dim, **kw)
        self.output_proj = Linear(dim, dim, logical_axes=("mlp", "embed"), **kw)

    def __call__(self, query: jax.Array, reference_points: jax.Array, value: jax.Array,
                 spatial_shapes: tuple[tuple[int, int], ...]) -> jax.Array:
        b, q, _ = query.shape
        m, lv, p = self.num_heads, self.num_levels, self.num_points
        if len(spatial_shapes) != lv or reference_points.shape != (b, q, lv, 2):
            raise ValueError(f"need {lv} spatial_shapes and reference_points (B, Q, L, 2) = {(b, q, lv, 2)}, got "
                             f"{len(spatial_shapes)} shapes and reference_points {reference_points.shape}")
        v = self.value_proj(value).reshape(b, value.shape[1], m, -1)
        offsets = self.sampling_offsets(query).reshape(b, q, m, lv, p, 2).astype(jnp.float32)
        weights = jax.nn.softmax(self.attention_weights(query).reshape(b, q, m, lv * p).astype(jnp.float32), -1)
        normaliser = jnp.asarray([(w, h) for h, w in spatial_shapes], jnp.float32)  # (L, 2) as (W_l, H_l)
        locations = (reference_points[:, :, None, :, None, :].astype(jnp.float32)
                     + offsets / normaliser[None, None, None, :, None, :])
        out = multi_scale_deformable_attention(v, spatial_shapes, locations.astype(v.dtype),
                                               weights.reshape(b, q, m, lv, p).astype(v.dtype))
        return self.output_proj(out)


class DeformableEncoderLayer(nnx.Module):
    """Deformable DETR's encoder layer (post-norm): x = LN(x + MSDeformAttn(x + pos, reference_points, x));
    x = LN(x + FFN(x)). x, pos: (B, S, dim); reference_points: (B, S, L, 2). Returns (B, S, dim)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, num_levels: int, num_points: int, *,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = MultiScaleDeformableAttention(dim, num_heads, num_levels, num_points, **kw)
        self.mlp = MLP(dim, mlp_dim, kind="gelu", **kw)
        self.norm1, self.norm2 = LayerNorm(dim, **kw), LayerNorm(dim, **kw)

    def __call__(self, x: jax.Array, pos: jax.Array, reference_points: jax.Array,
                 spatial_shapes: tuple[tuple[int, int], ...]) -> jax.Array:
        x = self.norm1(x + self.attn(x + pos, reference_points, x, spatial_shapes))
        return self.norm2(x + self.mlp(x))


class DeformableDecoderLayer(nnx.Module):
    """Deformable DETR's decoder layer (post-norm): self-attention among the queries as DETR's, then deformable
    cross-attention to the memory around each query's reference point:

        t = LN(t + SelfAttn(q = k = t + q_pos, v = t))
        t = LN(t + MSDeformAttn(t + q_pos, reference_points, memory))
        t = LN(t + FFN(t))

    t, q_pos: (B, Q, dim); reference_points: (B, Q, L, 2); memory: (B, S, dim). Returns (B, Q, dim).
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, num_levels: int, num_points: int, *,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = MultiHeadAttention(dim, num_heads, **kw)
        self.cross_attn = MultiScaleDeformableAttention(dim, num_heads, num_levels, num_points, **kw)
        self.mlp = MLP(dim, mlp_dim, kind="gelu", **kw)
        self.norm1, self.norm2, self.norm3 = LayerNorm(dim, **kw), LayerNorm(dim, **kw), LayerNorm(dim, **kw)

    def __call__(self, t: jax.Array, query_pos: jax.Array, reference_points: jax.Array, memory: jax.Array,
                 spatial_shapes: tuple[tuple[int, int], ...]) -> jax.Array:
        t = self.norm1(t + self.self_attn(t + query_pos, value=t))
        t = self.norm2(t + self.cross_attn(t + query_pos, reference_points, memory, spatial_shapes))
        return self.norm3(t + self.mlp(t))
