"""KL-regularised convolutional autoencoder for latent diffusion (Rombach et al. 2022, "High-
Resolution Image Synthesis with Latent Diffusion Models", §3.1 and App. G), small: the encoder
maps x (B, H, W, C) to the mean and log-variance of a diagonal Gaussian over a latent (B, H/f,
W/f, latent_channels), f = 2^(len(channel_mult) - 1); the decoder maps a latent back to an image.
Trained with a reconstruction loss plus a small KL term toward N(0, I) (`autoencoder_loss`).
(The paper adds a patch discriminator and a perceptual loss; not here.)
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.base import Model
from jaxmodels.nn.conv import Conv2D, Downsample, GroupNorm, Upsample
from jaxmodels.nn.diffusion import ResBlock

LOGVAR_RANGE = (-30.0, 20.0)  # clamp of LDM's DiagonalGaussianDistribution
RECONSTRUCTION_KINDS = ("l2", "l1")


class KLAutoencoder(Model):
    """Encoder: conv_in, per level num_res_blocks ResBlocks and a downsample (not after the last),
    a middle ResBlock, GroupNorm-SiLU-conv to 2·latent_channels = (mean, logvar). Decoder: the
    mirror image, num_res_blocks + 1 ResBlocks per level, nearest-neighbour upsampling.
    Channels of level l: base_channels · channel_mult[l]; num_groups divides them all.

    encode(x (B, H, W, in_channels)) -> (mean, logvar), each (B, H/f, W/f, latent_channels) float32,
      logvar clamped to LOGVAR_RANGE.
    decode(z (B, H/f, W/f, latent_channels)) -> (B, H, W, in_channels) float32.
    __call__(x, key) -> (reconstruction, mean, logvar), decoding a sample z ~ N(mean, exp(logvar))
      (`sample_latent`); key=None decodes the mean.
    """

    def __init__(self, *, in_channels: int, latent_channels: int, base_channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1, num_groups: int = 8,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        channel_mult = tuple(channel_mult)
        if not channel_mult:
            raise ValueError("channel_mult must name at least one level")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.factor = 2 ** (len(channel_mult) - 1)
        widths = [base_channels * m for m in channel_mult]
        res = dict(num_groups=num_groups, **kw)

        self.enc_in = Conv2D(in_channels, base_channels, 3, **kw)
        enc, ch = [], base_channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                enc.append(ResBlock(ch, width, **res))
                ch = width
            if level < len(widths) - 1:
                enc.append(Downsample(ch, ch, **kw))
        enc.append(ResBlock(ch, ch, **res))
        self.enc_blocks = nnx.List(enc)
        self.enc_norm = GroupNorm(num_groups, ch, **kw)
        self.enc_out = Conv2D(ch, 2 * latent_channels, 3, **kw)

        self.dec_in = Conv2D(latent_channels, ch, 3, **kw)
        dec = [ResBlock(ch, ch, **res)]
        for level in reversed(range(len(widths))):
            for _ in range(num_res_blocks + 1):
                dec.append(ResBlock(ch, widths[level], **res))
                ch = widths[level]
            if level > 0:
                dec.append(Upsample(ch, ch, **kw))
        self.dec_blocks = nnx.List(dec)
        self.dec_norm = GroupNorm(num_groups, ch, **kw)
        self.dec_out = Conv2D(ch, in_channels, 3, **kw)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % self.factor or x.shape[2] % self.factor:
            raise ValueError(f"x must be (batch, height, width, {self.in_channels}) with height and width divisible "
                             f"by {self.factor}, got shape {x.shape}")
        h = self.enc_in(x)
        for block in self.enc_blocks:
            h = block(h)
        moments = self.enc_out(jax.nn.silu(self.enc_norm(h))).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"z must be (batch, h, w, {self.latent_channels}), got shape {z.shape}")
        h = self.dec_in(z)
        for block in self.dec_blocks:
            h = block(h)
        return self.dec_out(jax.nn.silu(self.dec_norm(h))).astype(jnp.float32)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        mean, logvar = self.encode(x)
        z = mean if key is None else sample_latent(mean, logvar, key)
        return self.decode(z), mean, logvar


def sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """Reparameterised sample z = mean + exp(logvar / 2) · ε, ε ~ N(0, I) (Kingma & Welling 2014,
    §2.4). mean, logvar: same shape, float; returns that shape in mean's dtype."""
    if mean.shape != logvar.shape:
        raise ValueError(f"mean and logvar must have one shape, got {mean.shape} and {logvar.shape}")
    eps = jax.random.normal(key, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) = ½ Σ (mean² + exp(logvar) - 1 - logvar) over all but the
    batch axis (Kingma & Welling 2014, App. B). mean, logvar: (B, ...). Returns (B,) float32."""
    if mean.shape != logvar.shape:
        raise ValueError(f"mean and logvar must have one shape, got {mean.shape} and {logvar.shape}")
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    terms = jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar
    return 0.5 * jnp.sum(terms.reshape(terms.shape[0], -1), axis=-1)


def reconstruction_loss(x: jax.Array, reconstruction: jax.Array, kind: str = "l2") -> jax.Array:
    """Per-example reconstruction error summed over pixels and channels: "l2" Σ (x - x̂)² (the
    Gaussian NLL up to constants and a factor ½), "l1" Σ |x - x̂| (LDM's pixel loss).
    x, reconstruction: (B, H, W, C). Returns (B,) float32."""
    if kind not in RECONSTRUCTION_KINDS:
        raise ValueError(f"unknown reconstruction loss {kind!r}; valid: {list(RECONSTRUCTION_KINDS)}")
    if x.shape != reconstruction.shape:
        raise ValueError(f"x and reconstruction must have one shape, got {x.shape} and {reconstruction.shape}")
    diff = x.astype(jnp.float32) - reconstruction.astype(jnp.float32)
    err = jnp.square(diff) if kind == "l2" else jnp.abs(diff)
    return jnp.sum(err.reshape(err.shape[0], -1), axis=-1)


def autoencoder_loss(model: KLAutoencoder, x: jax.Array, key: jax.Array, *, kl_weight: float = 1e-3,
                     kind: str = "l2") -> tuple[jax.Array, dict[str, jax.Array]]:
    """The KL-autoencoder objective (Rombach et al. 2022, eq. 25 without the adversarial and
    perceptual terms): mean over the batch of reconstruction_loss(x, decode(z)) + kl_weight ·
    kl_divergence, z sampled with `key`. x: (B, H, W, C). Returns (scalar float32 loss,
    {"reconstruction", "kl"} batch means, float32)."""
    reconstruction, mean, logvar = model(x, key)
    rec = jnp.mean(reconstruction_loss(x, reconstruction, kind))
    kl = jnp.mean(kl_divergence(mean, logvar))
    return rec + kl_weight * kl, {"reconstruction": rec, "kl": kl}
