"""Convolutional layers for channels-last images (batch, height, width, channels): a 2D
convolution with logical axes, GroupNorm, and the up/downsampling layers of diffusion UNets and
autoencoders (pixel shuffle and its inverse are the pure functions `jaxmodels.ops.spatial.depth_to_space`
and `space_to_depth`).

Kernels are (kh, kw, in_channels, out_channels) ("HWIO"), tagged (None, None, None, "embed") so
the sharding rules split output channels like other parameters. Arithmetic runs in `dtype` (both
operands cast, as `jaxmodels.nn.layers.dense`); GroupNorm's statistics are float32.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.nn.param import fan_in_init, ones_init, param, zeros_init
from jaxmodels.ops.checks import one_of
from jaxmodels.ops.spatial import conv_transpose, depth_to_space, space_to_depth

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _check_image(x, name="x"):
    if x.ndim != 4:
        raise ValueError(f"{name} must be 4-D (batch, height, width, channels), got shape {x.shape}")


class Conv2D(nnx.Module):
    """2D convolution, x (B, H, W, in_channels) -> (B, H', W', out_channels) in `dtype`.

    H' = floor((H + 2·padding - kernel_size) / stride) + 1, so the default padding
    kernel_size // 2 keeps odd kernels "same" at stride 1 and halves even sizes at stride 2
    (PyTorch's symmetric zero padding). Kernel init: LeCun normal over kh·kw·in_channels
    (`fan_in_init`), or zeros with `zero_init` (the "zero module" of ADM, Dhariwal & Nichol 2021,
    and ControlNet's zero convolutions, Zhang et al. 2023); bias zeros.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
                 padding: int | None = None, use_bias: bool = True, zero_init: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_channels, self.stride, self.dtype = in_channels, stride, dtype
        self.padding = kernel_size // 2 if padding is None else padding
        init = zeros_init if zero_init else fan_in_init(fan_in_dims=3)
        self.kernel = param(rngs, init, (kernel_size, kernel_size, in_channels, out_channels),
                            (None, None, None, "embed"), param_dtype)
        self.bias = param(rngs, zeros_init, (out_channels,), ("embed",), param_dtype) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_image(x)
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got shape {x.shape}")
        pad = ((self.padding, self.padding), (self.padding, self.padding))
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel.value.astype(self.dtype),
                                         (self.stride, self.stride), pad, dimension_numbers=_DIMENSION_NUMBERS)
        if self.bias is not None:
            y = y + self.bias.value.astype(self.dtype)
        return y


class GroupNorm(nnx.Module):
    """Group normalisation (Wu & He 2018, eq. 1-3): channels split into `num_groups` groups, each
    normalised over (spatial positions × channels of the group) per example, then a per-channel
    scale and bias. x: (B, ..., channels) -> same shape in `dtype`; statistics in float32.
    """

    def __init__(self, num_groups: int, channels: int, *, eps: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if channels % num_groups:
            raise ValueError(f"channels ({channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
        self.scale = param(rngs, ones_init, (channels,), ("norm",), param_dtype)
        self.bias = param(rngs, zeros_init, (channels,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim < 2 or x.shape[-1] != self.scale.value.shape[0]:
            raise ValueError(f"expected (batch, ..., {self.scale.value.shape[0]}), got shape {x.shape}")
        g = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, x.shape[-1] // self.num_groups)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        mean = jnp.mean(g, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * self.scale.value.astype(jnp.float32) + self.bias.value.astype(jnp.float32)).astype(self.dtype)


UPSAMPLE_METHODS = ("nearest_conv", "pixel_shuffle", "transposed")
DOWNSAMPLE_METHODS = ("conv", "avg_pool", "pixel_unshuffle")


class Upsample(nnx.Module):
    """x (B, H, W, in_channels) -> (B, r·H, r·W, out_channels), r = `factor`, by `method`:

      "nearest_conv":  nearest-neighbour repeat, then a 3x3 conv (DDPM/ADM's upsampling; Odena et
                       al. 2016 on avoiding the checkerboard artefacts of transposed convs).
      "pixel_shuffle": 3x3 conv to r²·out_channels, then `depth_to_space` (Shi et al. 2016), with the
                       conv's plain init (no ICNR).
      "transposed":    transposed conv, kernel 2r, stride r (fractionally strided conv; Dumoulin &
                       Visin 2016), output exactly r·H × r·W.
    """

    def __init__(self, in_channels: int, out_channels: int, *, method: str = "nearest_conv", factor: int = 2,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.method, self.factor, self.dtype = one_of("method", method, UPSAMPLE_METHODS), factor, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if method == "transposed":
            self.conv = Conv2D(in_channels, out_channels, 2 * factor, **kw)
        else:
            mult = factor * factor if method == "pixel_shuffle" else 1
            self.conv = Conv2D(in_channels, out_channels * mult, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_image(x)
        r = self.factor
        if self.method == "nearest_conv":
            return self.conv(jnp.repeat(jnp.repeat(x, r, axis=1), r, axis=2))
        if self.method == "pixel_shuffle":
            return depth_to_space(self.conv(x), r)
        if x.shape[-1] != self.conv.in_channels:
            raise ValueError(f"expected {self.conv.in_channels} input channels, got shape {x.shape}")
        y = jax.lax.conv_transpose(x.astype(self.dtype), self.conv.kernel.value.astype(self.dtype), (r, r), "SAME",
                                   dimension_numbers=_DIMENSION_NUMBERS)
        return y + self.conv.bias.value.astype(self.dtype)


class ConvTranspose2D(nnx.Module):
    """Transposed convolution layer (Dumoulin & Visin 2016, §4; PyTorch's `ConvTranspose2d`), the pure
    `ops.spatial.conv_transpose` with a learned kernel and bias: x (B, H, W, in_channels) ->
    (B, H', W', out_channels) in `dtype`, H' = (H - 1)·stride - 2·padding + kernel_size, likewise W'. With
    kernel_size = stride (Segment Anything's mask upscaling: 2, 2) the output is exactly stride·H × stride·W and
    every output pixel reads one input pixel.

    Kernel (kh, kw, in_channels, out_channels), LeCun normal with the fan-in of one output pixel,
    in_channels·(kernel_size / stride)² (`fan_in_init` over kh·kw·in_channels scaled by stride²); bias zeros.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if stride > kernel_size:
            raise ValueError(f"stride ({stride}) must not exceed kernel_size ({kernel_size}): the output would "
                             "have holes")
        self.in_channels, self.stride, self.padding, self.dtype = in_channels, stride, padding, dtype
        self.kernel = param(rngs, fan_in_init(fan_in_dims=3, scale=float(stride * stride)),
                            (kernel_size, kernel_size, in_channels, out_channels), (None, None, None, "embed"),
                            param_dtype)
        self.bias = param(rngs, zeros_init, (out_channels,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_image(x)
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got shape {x.shape}")
        y = conv_transpose(x.astype(self.dtype), self.kernel.value.astype(self.dtype), self.stride, self.padding)
        return y.astype(self.dtype) + self.bias.value.astype(self.dtype)


class Downsample(nnx.Module):
    """x (B, r·H, r·W, in_channels) -> (B, H, W, out_channels), r = `factor`, by `method`:

      "conv":            3x3 conv with stride r, padding 1 (DDPM/ADM).
      "avg_pool":        mean over r×r blocks, then a 1x1 conv if the channel count changes.
      "pixel_unshuffle": `space_to_depth`, then a 1x1 conv from r²·in_channels (lossless before the
                         conv; Shi et al. 2016 run backwards).
    """

    def __init__(self, in_channels: int, out_channels: int, *, method: str = "conv", factor: int = 2,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.method, self.factor, self.dtype = one_of("method", method, DOWNSAMPLE_METHODS), factor, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if method == "conv":
            self.conv = Conv2D(in_channels, out_channels, 3, stride=factor, padding=1, **kw)
        elif method == "pixel_unshuffle":
            self.conv = Conv2D(in_channels * factor * factor, out_channels, 1, **kw)
        else:
            self.conv = Conv2D(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_image(x)
        r = self.factor
        if x.shape[1] % r or x.shape[2] % r:
            raise ValueError(f"height and width must be divisible by factor {r}, got shape {x.shape}")
        if self.method == "conv":
            return self.conv(x)
        if self.method == "pixel_unshuffle":
            return self.conv(space_to_depth(x, r))
        b, h, w, c = x.shape
        pooled = jnp.mean(x.astype(jnp.float32).reshape(b, h // r, r, w // r, r, c), axis=(2, 4)).astype(self.dtype)
        return pooled if self.conv is None else self.conv(pooled)


class Conv1D(nnx.Module):
    """1-D convolution over sequences, x (B, L, in_channels) -> (B, L', out_channels) in `dtype`, no padding
    ("VALID": L' = floor((L - kernel_size) / stride) + 1), or with `causal` padding by kernel_size - 1 on the left
    (stride 1: L' = L, output t sees inputs t - kernel_size + 1 .. t only, as WaveNet's causal convolutions).
    Kernel (kernel_size, in_channels, out_channels): LeCun normal over kernel_size·in_channels; bias zeros."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 causal: bool = False, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if causal and stride != 1:
            raise ValueError(f"a causal convolution has stride 1, got stride={stride}")
        self.in_channels, self.kernel_size, self.stride, self.causal, self.dtype = (in_channels, kernel_size, stride,
                                                                                  causal, dtype)
        self.kernel = param(rngs, fan_in_init(fan_in_dims=2), (kernel_size, in_channels, out_channels),
                            (None, None, "embed"), param_dtype)
        self.bias = param(rngs, zeros_init, (out_channels,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 3 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must be (batch, length, {self.in_channels}), got shape {x.shape}")
        if not self.causal and x.shape[1] < self.kernel_size:
            raise ValueError(f"x's length {x.shape[1]} is shorter than the kernel ({self.kernel_size})")
        pad = ((self.kernel_size - 1, 0),) if self.causal else ((0, 0),)
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel.value.astype(self.dtype), (self.stride,),
                                         pad, dimension_numbers=("NWC", "WIO", "NWC"))
        return y + self.bias.value.astype(self.dtype)
