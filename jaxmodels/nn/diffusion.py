"""Layers shared by diffusion networks: noise-level and class-label embeddings, adaLN-Zero
modulation, patchify/unpatchify, 2D sin-cos positions, (cross-)attention, and the UNet's residual
and attention blocks.

Conventions: images are channels-last (B, H, W, C), token sequences (B, L, D); the noise level
is one float per example (a DDPM timestep in [0, T) or a continuous c_noise(σ)); parameters are
`param_dtype`, arithmetic `dtype`, norms and softmax statistics float32.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.nn.conv import Conv2D, GroupNorm
from jaxmodels.nn.layers import LayerNorm, dense
from jaxmodels.nn.param import fan_in_init, param, zeros_init
from jaxmodels.ops.attention import dot_product_attention
from jaxmodels.ops.position import image_positions, sinusoidal_embedding
from jaxmodels.ops.spatial import depth_to_space, space_to_depth


class Linear(nnx.Module):
    """y = x W + b. x: (..., in_dim) -> (..., out_dim) in `dtype`. W: LeCun normal, or zeros with
    `zero_init` (adaLN-Zero, Peebles & Xie 2023, §3.2); b: zeros. `logical_axes` names W's dims."""

    def __init__(self, in_dim: int, out_dim: int, *, use_bias: bool = True, zero_init: bool = False,
                 logical_axes: tuple[str | None, str | None] = ("embed", "mlp"), dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = param(rngs, zeros_init if zero_init else fan_in_init(), (in_dim, out_dim), logical_axes,
                            param_dtype)
        self.bias = param(rngs, zeros_init, (out_dim,), logical_axes[1:], param_dtype) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.kernel.value.shape[0]:
            raise ValueError(f"expected (..., {self.kernel.value.shape[0]}), got shape {x.shape}")
        y = dense(x, self.kernel.value, self.dtype)
        return y if self.bias is None else y + self.bias.value.astype(self.dtype)


class TimestepEmbedding(nnx.Module):
    """Noise-level embedding (DDPM, Ho et al. 2020, App. B; DiT's TimestepEmbedder):
    MLP(sinusoidal_embedding(t, frequency_dim)) = W2 silu(W1 e + b1) + b2.

    t: (B,) float or int noise conditioning (timestep, or c_noise(σ) = ln(σ)/4 of Karras et al.
    2022). Returns (B, dim) in `dtype`. The sinusoid has the frequencies base^(-2i/frequency_dim),
    so continuous inputs of small range want a rescaling (e.g. 1000·t for t in [0, 1]).
    """

    def __init__(self, dim: int, *, frequency_dim: int = 256, base: float = 10000.0, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.frequency_dim, self.base = frequency_dim, base
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(frequency_dim, dim, **kw)
        self.fc2 = Linear(dim, dim, logical_axes=("mlp", "embed"), **kw)

    def __call__(self, t: jax.Array) -> jax.Array:
        t = jnp.asarray(t)
        if t.ndim != 1:
            raise ValueError(f"t must be (batch,) noise levels, one per example, got shape {t.shape}")
        return self.fc2(jax.nn.silu(self.fc1(sinusoidal_embedding(t, self.frequency_dim, self.base))))


class LabelEmbedding(nnx.Module):
    """Class-label table of num_classes + 1 rows: label `num_classes` is the null label of
    classifier-free guidance (Ho & Salimans 2021; DiT's LabelEmbedder). labels (B,) int in
    [0, num_classes] -> (B, dim) in `dtype`. N(0, 0.02²) init as DiT."""

    def __init__(self, num_classes: int, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_classes, self.dtype = num_classes, dtype
        self.embedding = param(rngs, jax.nn.initializers.normal(0.02), (num_classes + 1, dim), ("vocab", "embed"),
                               param_dtype)

    def __call__(self, labels: jax.Array) -> jax.Array:
        labels = jnp.asarray(labels)
        if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise TypeError(f"labels must be (batch,) integers, got shape {labels.shape} dtype {labels.dtype}")
        return jnp.take(self.embedding.value, labels, axis=0).astype(self.dtype)


def drop_labels(labels: jax.Array, key: jax.Array, rate: float, num_classes: int) -> jax.Array:
    """Classifier-free guidance training (Ho & Salimans 2021, Alg. 1): replace each label by the
    null label `num_classes` with probability `rate`. labels (B,) int -> (B,) same dtype."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    drop = jax.random.bernoulli(key, rate, labels.shape)
    return jnp.where(drop, jnp.asarray(num_classes, labels.dtype), labels)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Affine-free LayerNorm (Ba et al. 2016) over the last axis, statistics in float32, result in
    x's dtype: the norm before adaLN modulation (DiT's LayerNorm(elementwise_affine=False))."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN (Peebles & Xie 2023, §3.2; FiLM, Perez et al. 2018): x · (1 + scale) + shift.
    x: (B, L, D); shift, scale: (B, D) -> (B, L, D)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class AdaLNModulation(nnx.Module):
    """The adaLN-Zero regression of modulation parameters (Peebles & Xie 2023, §3.2):
    chunks = split(Linear(silu(c)), num_chunks), Linear zero-initialised so that every gate α
    (and shift, scale) starts at 0 and each block starts as the identity.

    c: (B, cond_dim) -> tuple of num_chunks arrays (B, dim) in `dtype`.
    """

    def __init__(self, cond_dim: int, dim: int, num_chunks: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.num_chunks = num_chunks
        self.linear = Linear(cond_dim, num_chunks * dim, zero_init=True, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs)

    def __call__(self, c: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(jnp.split(self.linear(jax.nn.silu(c)), self.num_chunks, axis=-1))


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
    """Image to patch tokens (Dosovitskiy et al. 2021; DiT §3.1): (B, H, W, C) ->
    (B, (H/p)·(W/p), p·p·C), tokens in row-major patch order, each patch flattened as (i, j, c)
    (the `space_to_depth` order). Returns x's dtype. Inverse: `unpatchify`."""
    y = space_to_depth(x, patch_size)
    return y.reshape(y.shape[0], y.shape[1] * y.shape[2], y.shape[3])


def unpatchify(tokens: jax.Array, patch_size: int, height: int, width: int) -> jax.Array:
    """Inverse of `patchify`: (B, (H/p)·(W/p), p·p·C) -> (B, H, W, C) for an H × W image."""
    p = patch_size
    if tokens.ndim != 3 or height % p or width % p or tokens.shape[1] != (height // p) * (width // p) \
            or tokens.shape[2] % (p * p):
        raise ValueError(f"tokens must be (batch, {(height // p) * (width // p)}, p·p·C) for a {height}x{width} "
                         f"image and patch {p}, got shape {tokens.shape}")
    return depth_to_space(tokens.reshape(tokens.shape[0], height // p, width // p, tokens.shape[2]), p)


def sincos_2d_embedding(height: int, width: int, dim: int, base: float = 10000.0) -> jax.Array:
    """Fixed 2D sin-cos position embedding (MAE, He et al. 2022; DiT): the first dim/2 features are
    `sinusoidal_embedding(row, dim/2)`, the last dim/2 the same of the column, for the patches of an
    height × width grid in row-major order. (MAE/DiT's code puts the column first; a fixed
    permutation of features.) Returns (height·width, dim) float32; dim divisible by 4."""
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 (sin and cos of rows and columns), got {dim}")
    pos = image_positions(height, width)
    return jnp.concatenate([sinusoidal_embedding(pos[:, 0], dim // 2, base),
                            sinusoidal_embedding(pos[:, 1], dim // 2, base)], axis=-1)


class MultiHeadAttention(nnx.Module):
    """Bidirectional multi-head attention (Vaswani et al. 2017, §3.2.2): self-attention over x, or
    cross-attention from x to `context` (latent diffusion's conditioning, Rombach et al. 2022, §3.3)
    when `context_dim` is set. Bias-free projections; `zero_init_out` zeroes the output projection
    (ADM's zero module: the residual branch starts at 0).

    x: (B, L, dim); context: (B, S, context_dim); value: optional (B, S, context_dim or dim), the source of the
    values when it is not the keys' (DETR adds positions to the queries' and keys' inputs only: q = (x + pos) W_q,
    k = (context + pos') W_k, v = context W_v). Returns (B, L, dim) in `dtype`.
    """

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None, context_dim: int | None = None,
                 zero_init_out: bool = False, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}), or give head_dim")
            head_dim = dim // num_heads
        self.context_dim, self.dtype = context_dim, dtype
        kv_dim = context_dim or dim
        shape_in = ("embed", "heads", "head_dim")
        self.w_q = param(rngs, fan_in_init(), (dim, num_heads, head_dim), shape_in, param_dtype)
        self.w_k = param(rngs, fan_in_init(), (kv_dim, num_heads, head_dim), shape_in, param_dtype)
        self.w_v = param(rngs, fan_in_init(), (kv_dim, num_heads, head_dim), shape_in, param_dtype)
        self.w_o = param(rngs, zeros_init if zero_init_out else fan_in_init(2), (num_heads, head_dim, dim),
                         ("heads", "head_dim", "embed"), param_dtype)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, value: jax.Array | None = None) -> jax.Array:
        if (context is None) != (self.context_dim is None):
            raise ValueError(f"context must be given exactly when context_dim is set (context_dim="
                             f"{self.context_dim}, got context {None if context is None else context.shape})")
        source = x if context is None else context
        if value is not None and value.shape != source.shape:
            raise ValueError(f"value must have the shape of the keys' source {source.shape}, got {value.shape}")
        q = dense(x, self.w_q.value, self.dtype, "bld,dnh->blnh")
        k = dense(source, self.w_k.value, self.dtype, "bsd,dnh->bsnh")
        v = dense(source if value is None else value, self.w_v.value, self.dtype, "bsd,dnh->bsnh")
        return dense(dot_product_attention(q, k, v), self.w_o.value, self.dtype, "blnh,nhd->bld")


class ResBlock(nnx.Module):
    """Residual block of DDPM/ADM UNets (Ho et al. 2020; Dhariwal & Nichol 2021) and the LDM
    autoencoder: h = conv(silu(GN(x))); h += Linear(silu(emb)) (broadcast over space, if emb_dim);
    h = conv(silu(GN(h))) (zero-initialised, so the block starts as its skip); returns
    skip(x) + h, skip a 1x1 conv when the channel count changes.

    x: (B, H, W, in_channels); emb: (B, emb_dim) or None. Returns (B, H, W, out_channels) in `dtype`.
    """

    def __init__(self, in_channels: int, out_channels: int, *, emb_dim: int = 0, num_groups: int = 8,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.emb_dim = emb_dim
        self.norm1 = GroupNorm(num_groups, in_channels, **kw)
        self.conv1 = Conv2D(in_channels, out_channels, 3, **kw)
        self.emb_proj = Linear(emb_dim, out_channels, **kw) if emb_dim else None
        self.norm2 = GroupNorm(num_groups, out_channels, **kw)
        self.conv2 = Conv2D(out_channels, out_channels, 3, zero_init=True, **kw)
        self.skip = Conv2D(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None

    def __call__(self, x: jax.Array, emb: jax.Array | None = None) -> jax.Array:
        if (emb is None) != (self.emb_proj is None):
            raise ValueError(f"emb must be given exactly when emb_dim is set (emb_dim={self.emb_dim})")
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if emb is not None:
            h = h + self.emb_proj(jax.nn.silu(emb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x.astype(h.dtype) if self.skip is None else self.skip(x)) + h


class AttentionBlock(nnx.Module):
    """UNet attention at low resolution: x + SelfAttn(GN(x)) over the H·W positions (ADM's
    AttentionBlock), then, if `context_dim`, + CrossAttn(LN(·), context) (latent diffusion's
    SpatialTransformer, Rombach et al. 2022, §3.3, without its feed-forward). Output projections
    are zero-initialised, so the block starts as the identity.

    x: (B, H, W, channels); context: (B, S, context_dim). Returns (B, H, W, channels) in `dtype`.
    """

    def __init__(self, channels: int, num_heads: int, *, context_dim: int = 0, num_groups: int = 8,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = GroupNorm(num_groups, channels, **kw)
        self.attn = MultiHeadAttention(channels, num_heads, zero_init_out=True, **kw)
        if context_dim:
            self.cross_norm = LayerNorm(channels, **kw)
            self.cross_attn = MultiHeadAttention(channels, num_heads, context_dim=context_dim, zero_init_out=True,
                                                 **kw)
        else:
            self.cross_attn = None

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        tokens = tokens.astype(self.attn.dtype) + self.attn(self.norm(x).reshape(b, h * w, c))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this block was built with context_dim: pass context (batch, length, context_dim)")
            tokens = tokens + self.cross_attn(self.cross_norm(tokens), context)
        return tokens.reshape(b, h, w, c)
