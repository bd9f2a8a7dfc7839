"""A small CNN classifier of 8x8 digits, the feature extractor of sample-quality metrics for generated digits.

The role Inception-v3 plays for FID (Heusel et al. 2017): generated samples are scored by the accuracy of
this classifier w.r.t. the label they were conditioned on, and by the Fréchet distance between the
Gaussians fitted to its penultimate features of generated and real digits
(`jaxmodels.tasks.metrics.frechet_distance`).
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.nn.conv import Conv2D
from jaxmodels.nn.diffusion import Linear


class DigitClassifier(nnx.Module):
    """x (B, H, W, C) -> conv3x3(channels) silu -> conv3x3 stride 2 (2·channels) silu -> conv3x3 (2·channels)
    silu -> global mean pool -> Linear(feature_dim) silu = features -> Linear(num_classes) = logits.

    `features(x)` -> (B, feature_dim) float32 (the penultimate layer); `__call__(x)` -> (B, num_classes)
    float32 logits.
    """

    def __init__(self, *, in_channels: int = 1, channels: int = 32, feature_dim: int = 64, num_classes: int = 10,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_channels = in_channels
        self.conv1 = Conv2D(in_channels, channels, 3, **kw)
        self.conv2 = Conv2D(channels, 2 * channels, 3, stride=2, **kw)
        self.conv3 = Conv2D(2 * channels, 2 * channels, 3, **kw)
        self.fc = Linear(2 * channels, feature_dim, **kw)
        self.head = Linear(feature_dim, num_classes, logical_axes=("embed", "vocab"), **kw)

    def features(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must be (batch, height, width, {self.in_channels}), got shape {x.shape}")
        h = jax.nn.silu(self.conv3(jax.nn.silu(self.conv2(jax.nn.silu(self.conv1(x))))))
        return jax.nn.silu(self.fc(jnp.mean(h, axis=(1, 2)))).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x)).astype(jnp.float32)
