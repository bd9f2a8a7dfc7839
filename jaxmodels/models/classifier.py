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
    """x (B, H, W, C) -> conv3x3(channels) silu -> num_stages x [conv3x3 stride 2 (doubling the channels) silu ->
    conv3x3 silu] -> global mean pool -> Linear(feature_dim) silu = features -> Linear(num_classes) = logits.

    One stage (the default) suits 8x8 digits: channels, 2·channels, 2·channels, receptive field 9 pixels; 28x28
    MNIST wants two (7x7 maps of 4·channels at the end, receptive field 21).
    image_size: the side of the square images it takes (checked, and what `train_flops_per_example` counts);
    None: any size, FLOPs not counted.
    `features(x)` -> (B, feature_dim) float32 (the penultimate layer); `__call__(x)` -> (B, num_classes)
    float32 logits. FLOPs: `convnet_flops_per_example`.
    """

    @classmethod
    def check_config(cls, config) -> None:
        """config.model: positive sizes (num_stages and image_size where given; image_size may be None)."""
        optional = tuple(k for k in ("num_stages", "image_size") if config.get(k) is not None)
        check_fields(config, "config.model", {}, ("in_channels", "channels", "feature_dim", "num_classes") + optional)

    def __init__(self, *, in_channels: int = 1, channels: int = 32, feature_dim: int = 64, num_classes: int = 10,
                 num_stages: int = 1, image_size: int | None = None, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_channels, self.image_size = in_channels, image_size
        self.hyperparameters = tuple(dict(  # hashable: nnx keeps it in the graph definition
            in_channels=in_channels, channels=channels, feature_dim=feature_dim, num_classes=num_classes,
            num_stages=num_stages).items())
        self.conv_in = Conv2D(in_channels, channels, 3, **kw)
        self.downsample = nnx.List([Conv2D(channels << s, channels << (s + 1), 3, stride=2, **kw)
                                    for s in range(num_stages)])
        self.convs = nnx.List([Conv2D(channels << (s + 1), channels << (s + 1), 3, **kw) for s in range(num_stages)])
        self.fc = Linear(channels << num_stages, feature_dim, **kw)
        self.head = Linear(feature_dim, num_classes, logical_axes=("embed", "vocab"), **kw)

    def features(self, x: jax.Array) -> jax.Array:
        side = self.image_size
        if x.ndim != 4 or x.shape[-1] != self.in_channels or (side and x.shape[1:3] != (side, side)):
            size = f"{side}, {side}" if side else "height, width"
            raise ValueError(f"x must be (batch, {size}, {self.in_channels}), got shape {x.shape}")
        h = jax.nn.silu(self.conv_in(x))
        for down, conv in zip(self.downsample, self.convs):
            h = jax.nn.silu(conv(jax.nn.silu(down(h))))
        return jax.nn.silu(self.fc(jnp.mean(h, axis=(1, 2)))).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x)).astype(jnp.float32)

    def train_flops_per_example(self) -> float | None:
        """Model FLOPs of one training example (3 x `convnet_flops_per_example`); None without image_size."""
        if self.image_size is None:
            return None
        return 3 * convnet_flops_per_example(image_size=self.image_size, **dict(self.hyperparameters))


def convnet_flops_per_example(*, image_size: int, in_channels: int, channels: int, feature_dim: int,
                              num_classes: int, num_stages: int = 1) -> float:
    """Model FLOPs of one `DigitClassifier` forward pass on an image_size² image (2 FLOPs per multiply-add): the
    3x3 convolutions 2·9·(H²·C·c + Σ_s H_s²·(c_s/2·c_s + c_s·c_s)), stage s having H_s = ceil(H_{s-1} / 2) and
    c_s = c·2^s, then 2·(c_S·feature_dim + feature_dim·num_classes). Elementwise work is not counted."""
    h, c = image_size, channels
    macs = h * h * in_channels * c
    for _ in range(num_stages):
        h, c = (h + 1) // 2, 2 * c
        macs += h * h * (c // 2 * c + c * c)
    return float(2 * (9 * macs + c * feature_dim + feature_dim * num_classes))
