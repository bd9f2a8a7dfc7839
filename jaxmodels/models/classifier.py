"""A small CNN classifier of digits: the feature extractor of sample-quality metrics for generated digits, and the
ConvNet baseline of image classification (model.name "convnet", `jaxmodels.tasks.classification`).

The role Inception-v3 plays for FID (Heusel et al. 2017): generated samples are scored by the accuracy of
this classifier w.r.t. the label they were conditioned on, and by the Fréchet distance between the
Gaussians fitted to its penultimate features of generated and real digits
(`jaxmodels.tasks.metrics.frechet_distance`).
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.base import Model, check_fields
from jaxmodels.nn.conv import Conv2D
from jaxmodels.nn.diffusion import Linear


class DigitClassifier(Model):
    """x (B, H, W, C) -> conv3x3(channels) silu -> conv3x3 stride 2 (2·channels) silu -> conv3x3 (2·channels)
    silu -> global mean pool -> Linear(feature_dim) silu = features -> Linear(num_classes) = logits.

    image_size: the side of the square images it takes (checked, and what `train_flops_per_example` counts);
    None: any size, FLOPs not counted.
    `features(x)` -> (B, feature_dim) float32 (the penultimate layer); `__call__(x)` -> (B, num_classes)
    float32 logits. FLOPs: `convnet_flops_per_example`.
    """

    @classmethod
    def check_config(cls, config) -> None:
        """config.model: positive sizes (image_size may be None)."""
        positive = ("in_channels", "channels", "feature_dim", "num_classes")
        check_fields(config, "config.model", {}, positive + (("image_size",) if config.get("image_size") else ()))

    def __init__(self, *, in_channels: int = 1, channels: int = 32, feature_dim: int = 64, num_classes: int = 10,
                 image_size: int | None = None, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_channels, self.image_size = in_channels, image_size
        self.hyperparameters = tuple(dict(  # hashable: nnx keeps it in the graph definition
            in_channels=in_channels, channels=channels, feature_dim=feature_dim, num_classes=num_classes).items())
        self.conv1 = Conv2D(in_channels, channels, 3, **kw)
        self.conv2 = Conv2D(channels, 2 * channels, 3, stride=2, **kw)
        self.conv3 = Conv2D(2 * channels, 2 * channels, 3, **kw)
        self.fc = Linear(2 * channels, feature_dim, **kw)
        self.head = Linear(feature_dim, num_classes, logical_axes=("embed", "vocab"), **kw)

    def features(self, x: jax.Array) -> jax.Array:
        side = self.image_size
        if x.ndim != 4 or x.shape[-1] != self.in_channels or (side and x.shape[1:3] != (side, side)):
            size = f"{side}, {side}" if side else "height, width"
            raise ValueError(f"x must be (batch, {size}, {self.in_channels}), got shape {x.shape}")
        h = jax.nn.silu(self.conv3(jax.nn.silu(self.conv2(jax.nn.silu(self.conv1(x))))))
        return jax.nn.silu(self.fc(jnp.mean(h, axis=(1, 2)))).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x)).astype(jnp.float32)

    def train_flops_per_example(self) -> float | None:
        """Model FLOPs of one training example (3 x `convnet_flops_per_example`); None without image_size."""
        if self.image_size is None:
            return None
        return 3 * convnet_flops_per_example(image_size=self.image_size, **dict(self.hyperparameters))


def convnet_flops_per_example(*, image_size: int, in_channels: int, channels: int, feature_dim: int,
                              num_classes: int) -> float:
    """Model FLOPs of one `DigitClassifier` forward pass on an image_size² image (2 FLOPs per multiply-add): the
    three 3x3 convolutions 2·9·(H²·C·c + H'²·c·2c + H'²·2c·2c) with H' = ceil(H / 2) after the stride-2 one, then
    2·(2c·feature_dim + feature_dim·num_classes). Elementwise work is not counted."""
    h, c = image_size, channels
    h2 = (h + 1) // 2
    macs = 9 * (h * h * in_channels * c + h2 * h2 * c * 2 * c + h2 * h2 * 4 * c * c)
    return float(2 * (macs + 2 * c * feature_dim + feature_dim * num_classes))
