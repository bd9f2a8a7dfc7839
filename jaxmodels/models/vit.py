"""Vision Transformer, ViT (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"), as an image classifier.

x (B, H, W, C) -> p × p patches, linear embedding (`PatchEmbedding`) -> [class token;] + learned position
embedding (eq. 1) -> depth pre-norm encoder blocks (eq. 2-3) -> final LayerNorm -> the class token's state
(eq. 4) or the mean over patch tokens (pooling="mean", as in later ViT work, e.g. Beyer et al. 2022) -> linear
head (zero-initialised, as the paper's fine-tuning head) -> (B, num_classes) float32 logits.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.base import Model, check_fields
from jaxmodels.nn.diffusion import Linear
from jaxmodels.nn.layers import LayerNorm
from jaxmodels.nn.param import param, zeros_init
from jaxmodels.nn.vision import PatchEmbedding, ViTBlock
from jaxmodels.ops.checks import check_image_batch


class ViT(Model):
    """ViT classifier (see the module docstring).

    image_size: H = W; patch_size: p dividing it; in_channels: C; num_classes: size of the head.
    hidden_dim, depth, num_heads, mlp_dim: the Transformer (ViT-B/16: 768, 12, 12, 3072).
    pooling: "cls" (class token) or "mean" (global average of the patch tokens, no class token).

    __call__(x (B, image_size, image_size, in_channels)) -> logits (B, num_classes) float32.
    Parameters: `vit_parameter_count`; FLOPs: `vit_flops_per_example`.
    """

    POOLINGS = ("cls", "mean")

    @classmethod
    def check_config(cls, config) -> None:
        """config.model: pooling kind, positive sizes, image_size divisible by patch_size, hidden_dim by num_heads."""
        check_fields(config, "config.model", {"pooling": cls.POOLINGS},
                     ("image_size", "patch_size", "in_channels", "num_classes", "hidden_dim", "depth", "num_heads",
                      "mlp_dim"))
        if config.image_size % config.patch_size:
            raise ValueError(f"config.model.image_size={config.image_size} must be divisible by "
                             f"config.model.patch_size={config.patch_size}")
        if config.hidden_dim % config.num_heads:
            raise ValueError(f"config.model.hidden_dim={config.hidden_dim} must be divisible by "
                             f"config.model.num_heads={config.num_heads}")

    def __init__(self, *, image_size: int, patch_size: int, in_channels: int, num_classes: int, hidden_dim: int,
                 depth: int, num_heads: int, mlp_dim: int, pooling: str = "cls", dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if pooling not in self.POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not valid; choose one of {list(self.POOLINGS)}")
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.image_size, self.in_channels, self.pooling, self.dtype = image_size, in_channels, pooling, dtype
        self.hyperparameters = tuple(dict(  # hashable: nnx keeps it in the graph definition
            image_size=image_size, patch_size=patch_size, in_channels=in_channels, num_classes=num_classes,
            hidden_dim=hidden_dim, depth=depth, mlp_dim=mlp_dim, pooling=pooling).items())
        num_tokens = (image_size // patch_size) ** 2 + (pooling == "cls")
        self.patch_embed = PatchEmbedding(patch_size, in_channels, hidden_dim, **kw)
        if pooling == "cls":
            self.cls_token = param(rngs, zeros_init, (1, 1, hidden_dim), (None, None, "embed"), param_dtype)
        self.position = param(rngs, jax.nn.initializers.normal(0.02), (1, num_tokens, hidden_dim),
                              (None, None, "embed"), param_dtype)
        self.blocks = nnx.List([ViTBlock(hidden_dim, num_heads, mlp_dim, **kw) for _ in range(depth)])
        self.norm = LayerNorm(hidden_dim, **kw)
        self.head = Linear(hidden_dim, num_classes, zero_init=True, logical_axes=("embed", "vocab"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_image_batch("x", x, self.image_size, self.in_channels)
        h = self.patch_embed(x)
        h = h.reshape(h.shape[0], -1, h.shape[-1])
        if self.pooling == "cls":
            cls = jnp.broadcast_to(self.cls_token.value.astype(h.dtype), (h.shape[0], 1, h.shape[-1]))
            h = jnp.concatenate([cls, h], axis=1)
        h = h + self.position.value.astype(h.dtype)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        pooled = h[:, 0] if self.pooling == "cls" else jnp.mean(h.astype(jnp.float32), axis=1).astype(h.dtype)
        return self.head(pooled).astype(jnp.float32)

    def train_flops_per_example(self) -> float:
        """Model FLOPs of one training example: 3 x the forward (`vit_flops_per_example`), forward + backward."""
        return 3 * vit_flops_per_example(**dict(self.hyperparameters))


def vit_parameter_count(*, image_size: int, patch_size: int, in_channels: int, num_classes: int, hidden_dim: int,
                        depth: int, num_heads: int, mlp_dim: int, pooling: str = "cls") -> int:
    """Parameters of `ViT`, counted from the architecture: patch embedding p²·C·d + d; class token d and
    (N [+ 1])·d positions; per block 2 LayerNorms (4d), attention 4d² (bias-free), MLP 2·d·mlp_dim (bias-free);
    final LayerNorm 2d; head d·num_classes + num_classes."""
    del num_heads
    d = hidden_dim
    tokens = (image_size // patch_size) ** 2 + (pooling == "cls")
    block = 4 * d + 4 * d * d + 2 * d * mlp_dim
    return (patch_size ** 2 * in_channels * d + d + (d if pooling == "cls" else 0) + tokens * d
            + depth * block + 2 * d + d * num_classes + num_classes)


def vit_flops_per_example(*, image_size: int, patch_size: int, in_channels: int, num_classes: int, hidden_dim: int,
                          depth: int, mlp_dim: int, pooling: str = "cls", num_heads: int | None = None) -> float:
    """Model FLOPs of one ViT forward pass for one example, counted analytically (2 FLOPs per multiply-add; a
    training step is 3x this). With T = N [+ 1] tokens (N = (image_size / p)² patches, + the class token) of dim d:
    patch embedding 2·N·p²C·d; per block the projections 2·T·4d², the scores and values 2·2·T²·d (the full,
    non-causal matrix), the MLP 2·T·2·d·mlp_dim; head 2·d·num_classes. Elementwise work is not counted. timm and the
    ViT paper's successors report multiply-adds as "GFLOPs" (ViT-B/16 at 224: 17.6), i.e. half this count."""
    del num_heads
    d, patches = hidden_dim, (image_size // patch_size) ** 2
    tokens = patches + (pooling == "cls")
    macs = patches * patch_size ** 2 * in_channels * d
    macs += depth * (4 * tokens * d * d + 2 * tokens * tokens * d + 2 * tokens * d * mlp_dim)
    return float(2 * (macs + d * num_classes))
