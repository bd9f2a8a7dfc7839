"""Layers of vision Transformers: patch embedding, the ViT encoder block, and the Swin Transformer's
(shifted-)window attention block and patch merging.

Images are channels-last (B, H, W, C); token grids stay (B, H', W', dim) in Swin and are flattened to
(B, L, dim) in ViT. Parameters are `param_dtype`, arithmetic `dtype`, norms and softmax statistics float32.
The window machinery is `jaxmodels.ops.spatial`'s (window partition, cyclic shift mask, relative position bias).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.nn.diffusion import Linear, MultiHeadAttention, patchify
from jaxmodels.nn.layers import MLP, LayerNorm, dense
from jaxmodels.nn.param import fan_in_init, param
from jaxmodels.ops.attention import dot_product_attention
from jaxmodels.ops.spatial import (
    cyclic_shift,
    patch_merging,
    relative_position_bias,
    shifted_window_mask,
    window_partition,
    window_reverse,
)


class PatchEmbedding(nnx.Module):
    """Split the image into p × p patches and embed each linearly (Dosovitskiy et al. 2021, ViT eq. 1; Swin's
    patch partition + linear embedding): equal to a p × p convolution with stride p.

    x: (B, H, W, in_channels), H and W divisible by p. Returns the token grid (B, H/p, W/p, dim) in `dtype`.
    """

    def __init__(self, patch_size: int, in_channels: int, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.patch_size, self.in_channels = patch_size, in_channels
        self.linear = Linear(patch_size * patch_size * in_channels, dim, logical_axes=(None, "embed"), dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"x must be (batch, height, width, {self.in_channels}) with height and width divisible "
                             f"by patch_size {p}, got shape {x.shape}")
        return self.linear(patchify(x, p)).reshape(x.shape[0], x.shape[1] // p, x.shape[2] // p, -1)


class ViTBlock(nnx.Module):
    """Pre-norm Transformer encoder block (ViT eq. 2-3): x += MSA(LN(x)); x += MLP(LN(x)), GELU MLP of width
    mlp_dim, LayerNorms with scale and bias. x: (B, L, dim) -> (B, L, dim) in `dtype`."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1, self.norm2 = LayerNorm(dim, **kw), LayerNorm(dim, **kw)
        self.attn = MultiHeadAttention(dim, num_heads, **kw)
        self.mlp = MLP(dim, mlp_dim, kind="gelu", **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class WindowAttention(nnx.Module):
    """Multi-head self-attention inside ws × ws windows with a learned relative position bias (Swin §3.2, eq. 4):
    softmax(QKᵀ/√d + B) V, B gathered from a ((2ws - 1)², heads) table (init N(0, 0.02²)) by
    `relative_position_bias`.

    windows: (nW·B, ws², dim) tokens of `window_partition` flattened; mask: optional (nW, ws², ws²) bool (True = may
    attend, `shifted_window_mask`), the same for every image. Returns (nW·B, ws², dim) in `dtype`.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.window_size, self.dtype = window_size, dtype
        head_dim = dim // num_heads
        self.w_qkv = param(rngs, fan_in_init(), (dim, 3, num_heads, head_dim), ("embed", None, "heads", "head_dim"),
                           param_dtype)
        self.w_o = param(rngs, fan_in_init(2), (num_heads, head_dim, dim), ("heads", "head_dim", "embed"), param_dtype)
        self.bias_table = param(rngs, jax.nn.initializers.normal(0.02), ((2 * window_size - 1) ** 2, num_heads),
                                (None, "heads"), param_dtype)

    def __call__(self, windows: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        qkv = dense(windows, self.w_qkv.value, self.dtype, "bld,dknh->kblnh")
        bias = relative_position_bias(self.bias_table.value, self.window_size).astype(self.dtype)[None]
        if mask is not None:  # windows are image-major: window index b·nW + w
            mask = jnp.tile(mask, (windows.shape[0] // mask.shape[0], 1, 1))[:, None]
        out = dot_product_attention(qkv[0], qkv[1], qkv[2], bias=bias, mask=mask)
        return dense(out, self.w_o.value, self.dtype, "blnh,nhd->bld")


class SwinBlock(nnx.Module):
    """Swin Transformer block (Liu et al. 2021, §3.2, eq. 3): with z the (B, H, W, dim) token grid,

        z = z + reverse(W-MSA(partition(shift(LN(z)))));  z = z + MLP(LN(z))

    where shift is the cyclic shift by `shift_size` (0: regular windows, W-MSA; ws/2 in every second block:
    SW-MSA) and the shifted windows are masked by `shifted_window_mask`. MLP: GELU, width mlp_ratio·dim.
    x: (B, H, W, dim), H and W divisible by window_size. Returns (B, H, W, dim) in `dtype`.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int = 0, mlp_ratio: float = 4.0, *,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size={window_size}), got {shift_size}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1, self.norm2 = LayerNorm(dim, **kw), LayerNorm(dim, **kw)
        self.attn = WindowAttention(dim, num_heads, window_size, **kw)
        self.mlp = MLP(dim, int(dim * mlp_ratio), kind="gelu", **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        ws, shift = self.window_size, self.shift_size
        if x.ndim != 4 or x.shape[1] % ws or x.shape[2] % ws:
            raise ValueError(f"x must be (batch, height, width, dim) with height and width divisible by window_size "
                             f"{ws}, got shape {x.shape}; pad the image first")
        _, h, w, dim = x.shape
        y = self.norm1(x)
        mask = None
        if shift:
            y = cyclic_shift(y, shift)
            mask = shifted_window_mask(h, w, ws, shift)
        windows = window_partition(y, ws).reshape(-1, ws * ws, dim)
        y = window_reverse(self.attn(windows, mask).reshape(-1, ws, ws, dim), ws, h, w)
        if shift:
            y = cyclic_shift(y, -shift)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nnx.Module):
    """Swin's patch merging (§3.1): concatenate each 2 × 2 neighbourhood (`ops.spatial.patch_merging`), LayerNorm,
    then a bias-free linear 4·dim -> 2·dim. x: (B, H, W, dim), H and W even. Returns (B, H/2, W/2, 2·dim)."""

    def __init__(self, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = LayerNorm(4 * dim, **kw)
        self.reduction = Linear(4 * dim, 2 * dim, use_bias=False, logical_axes=(None, "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.reduction(self.norm(patch_merging(x)))
