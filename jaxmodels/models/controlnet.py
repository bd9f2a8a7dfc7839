"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"): a trainable copy of a UNet's encoder (conditioning embedding, down path, middle block)
that also reads a conditioning image (edges, depth, a mask ...) through a small hint encoder, and
returns residuals for the frozen UNet's skips and middle block through zero-initialised 1x1
convolutions (eq. 2-4). Zero convolutions (and the hint encoder's last conv) start at 0, so at
init the controlled UNet computes exactly what the UNet alone does.

Use: `controlnet = ControlNet.from_unet(unet, hint_channels=...)` copies the UNet's encoder
weights; `ControlledUNet(unet, controlnet)(x, t, hint, ...)` runs both; train only
`controlnet`'s parameters, e.g. (checked with flax 0.12.8)

    only = nnx.PathContains("controlnet")
    optimizer = nnx.Optimizer(model, tx, wrt=only)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, only))(model)
    optimizer.update(model, grads)

The UNet must be trained first: a freshly initialised one has a zero conv_out (ADM), through which
no gradient reaches the ControlNet.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.unet import UNet, UNetEncoder
from jaxmodels.nn.conv import Conv2D


class HintEncoder(nnx.Module):
    """ControlNet's input-hint block (Zhang et al. 2023, §3.2, "a tiny network E(·) of four
    convolution layers"): 3x3 convs with SiLU through `hidden` widths, the first `downsample` of the
    transitions with stride 2 (so the hint is `2^downsample` times the UNet input's resolution, e.g.
    an image hint for a latent UNet), then a zero-initialised 3x3 conv to out_channels.

    hint: (B, H·2^d, W·2^d, hint_channels) -> (B, H, W, out_channels) in `dtype`.
    """

    def __init__(self, hint_channels: int, out_channels: int, *, hidden: Sequence[int] = (16, 32),
                 downsample: int = 0, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        hidden = tuple(hidden)
        if not hidden or not 0 <= downsample < len(hidden):
            raise ValueError(f"need 0 <= downsample < len(hidden) (one stride-2 conv per transition), got "
                             f"hidden={hidden}, downsample={downsample}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.factor = 2**downsample
        convs = [Conv2D(hint_channels, hidden[0], 3, **kw)]
        convs += [Conv2D(hidden[i - 1], hidden[i], 3, stride=2 if i <= downsample else 1, **kw)
                  for i in range(1, len(hidden))]
        self.convs = nnx.List(convs)
        self.conv_out = Conv2D(hidden[-1], out_channels, 3, zero_init=True, **kw)

    def __call__(self, hint: jax.Array) -> jax.Array:
        h = hint
        for conv in self.convs:
            h = jax.nn.silu(conv(h))
        return self.conv_out(h)


class ControlNet(nnx.Module):
    """ControlNet for a `UNet` built with `unet_config` (its `encoder.config`).

    __call__(x, t, hint, labels=None, context=None) -> (skip_residuals, middle_residual): a list of
    one (B, h, w, c) array per UNet skip (`encoder.skip_channels`) and one for the middle block,
    ready for `UNet(..., skip_residuals=..., middle_residual=...)`, in `dtype`, multiplied by
    `scale` (the conditioning strength of the ControlNet code).
    hint: (B, H·2^hint_downsample, W·2^hint_downsample, hint_channels).
    """

    def __init__(self, *, unet_config: dict, hint_channels: int, hint_hidden: Sequence[int] = (16, 32),
                 hint_downsample: int = 0, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = UNetEncoder(**unet_config, **kw)
        self.hint_encoder = HintEncoder(hint_channels, unet_config["base_channels"], hidden=hint_hidden,
                                        downsample=hint_downsample, **kw)
        self.zero_convs = nnx.List([Conv2D(c, c, 1, zero_init=True, **kw) for c in self.encoder.skip_channels])
        ch = self.encoder.middle_channels
        self.middle_zero_conv = Conv2D(ch, ch, 1, zero_init=True, **kw)

    @classmethod
    def from_unet(cls, unet: UNet, *, hint_channels: int, hint_hidden: Sequence[int] = (16, 32),
                  hint_downsample: int = 0, dtype: Any = None, param_dtype: Any = jnp.float32,
                  rngs: nnx.Rngs) -> "ControlNet":
        """A ControlNet whose encoder starts as a copy of `unet.encoder`'s weights (Zhang et al. 2023,
        §3.2: "we lock the parameters ... and clone it into a trainable copy"); dtype defaults to the
        UNet's compute dtype."""
        control = cls(unet_config=unet.encoder.config, hint_channels=hint_channels, hint_hidden=hint_hidden,
                      hint_downsample=hint_downsample, dtype=unet.encoder.dtype if dtype is None else dtype,
                      param_dtype=param_dtype, rngs=rngs)
        source = nnx.state(unet.encoder, nnx.Param)
        nnx.update(control.encoder, jax.tree.map(lambda p: jnp.array(p, param_dtype, copy=True), source))
        return control

    def __call__(self, x: jax.Array, t: jax.Array, hint: jax.Array, labels: jax.Array | None = None,
                 context: jax.Array | None = None, *, scale: float = 1.0) -> tuple[list[jax.Array], jax.Array]:
        f = self.hint_encoder.factor
        if hint.ndim != 4 or hint.shape[:3] != (x.shape[0], f * x.shape[1], f * x.shape[2]):
            raise ValueError(f"hint must be (batch, {f}·height, {f}·width, channels) = ({x.shape[0]}, "
                             f"{f * x.shape[1]}, {f * x.shape[2]}, ...) for x of shape {x.shape}, got {hint.shape}")
        h, skips, _ = self.encoder(x, t, labels, context, hint=self.hint_encoder(hint))
        skip_residuals = [conv(s) * scale for conv, s in zip(self.zero_convs, skips)]
        return skip_residuals, self.middle_zero_conv(h) * scale


class ControlledUNet(nnx.Module):
    """A UNet (meant frozen) with a ControlNet (trainable): x, t, hint [, labels, context] ->
    UNet(x, t, labels, context, residuals of ControlNet(x, t, hint, labels, context)), (B, H, W,
    out_channels) float32 (Zhang et al. 2023, eq. 4, and Fig. 3 for a UNet)."""

    def __init__(self, unet: UNet, controlnet: ControlNet):
        self.unet, self.controlnet = unet, controlnet

    def __call__(self, x: jax.Array, t: jax.Array, hint: jax.Array, labels: jax.Array | None = None,
                 context: jax.Array | None = None, *, scale: float = 1.0) -> jax.Array:
        skip_residuals, middle_residual = self.controlnet(x, t, hint, labels, context, scale=scale)
        return self.unet(x, t, labels, context, skip_residuals=skip_residuals, middle_residual=middle_residual)
