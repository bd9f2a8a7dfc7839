"""DETR (Carion et al. 2020, "End-to-End Object Detection with Transformers") and, with `deformable=True`, its
Deformable DETR variant (Zhu et al. 2021, single-stage, no iterative box refinement), at toy scale.

DETR: backbone -> the last map projected to hidden_dim by a 1x1 convolution -> flattened tokens with the fixed
2D sine encoding (`ops.position.sine_position_encoding_2d`) added to queries and keys of every attention ->
num_encoder_layers encoder layers -> num_decoder_layers decoder layers on num_queries object queries (states
start at 0, each query's learned embedding is its position) -> after every decoder layer, the shared final
LayerNorm, a linear class head (num_classes + 1 logits, the last one "no object") and a 3-layer box MLP with a
sigmoid: boxes (cx, cy, w, h) normalised to [0, 1] by the image size (§3.2, appendix A.3).

Deformable DETR: num_feature_levels maps (the backbone's last stages, each a 1x1 convolution + GroupNorm to
hidden_dim, then, beyond the backbone's stages, 3x3 stride-2 convolutions + GroupNorm) with the sine encoding
plus a learned per-level embedding; the encoder's self-attention and the decoder's cross-attention are multi-scale
deformable attention (`nn.detection.MultiScaleDeformableAttention`, num_points per head and level) around
reference points: each token's own normalised centre in the encoder, sigmoid(Linear(query embedding)) in the
decoder, whose box head predicts offsets from it (in inverse-sigmoid space, §4.1 and appendix A.3). The query
embedding has 2·hidden_dim features, split into the position and the initial state. Classification is
DETR's softmax with a "no object" class (the paper's focal loss is not used), so the two variants share a loss.

backbone: "cnn" (`nn.detection.ConvBackbone`, stride 2 per stage) or "patch" (ViT's linear patch embedding,
one map of stride patch_size, of backbone_channels[-1] channels: the encoder is then a ViT on the patches).

__call__(x (B, image_size, image_size, in_channels)) -> {"logits": (D, B, Q, num_classes + 1) float32, "boxes":
(D, B, Q, 4) float32 cxcywh in (0, 1)} for the D = num_decoder_layers decoder outputs; index -1 is the
prediction, the earlier ones DETR's auxiliary decoding outputs (§3.2), all from the same (shared) heads.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.base import Model, check_fields
from jaxmodels.nn.conv import Conv2D, GroupNorm
from jaxmodels.nn.detection import (
    BoxMLP,
    ConvBackbone,
    DeformableDecoderLayer,
    DeformableEncoderLayer,
    DetrDecoderLayer,
    DetrEncoderLayer,
)
from jaxmodels.nn.diffusion import Linear
from jaxmodels.nn.layers import LayerNorm
from jaxmodels.nn.param import param
from jaxmodels.nn.vision import PatchEmbedding
from jaxmodels.ops.checks import check_image_batch, one_of
from jaxmodels.ops.position import sine_position_encoding_2d

BACKBONES = ("cnn", "patch")


def inverse_sigmoid(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """log(x / (1 - x)) with both clamped to >= eps (Deformable DETR's `inverse_sigmoid`)."""
    x = jnp.clip(x, 0.0, 1.0)
    return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1 - x, eps))


def level_centres(height: int, width: int) -> jax.Array:
    """Normalised (x, y) centres ((j + 1/2) / W, (i + 1/2) / H) of an H x W map's pixels in row-major order:
    (H·W, 2) float32, the encoder's reference points of Deformable DETR (unpadded images)."""
    y, x = jnp.meshgrid((jnp.arange(height) + 0.5) / height, (jnp.arange(width) + 0.5) / width, indexing="ij")
    return jnp.stack([x.reshape(-1), y.reshape(-1)], axis=-1).astype(jnp.float32)


class DETR(Model):
    """DETR / Deformable DETR (module docstring).

    image_size: H = W; in_channels; num_classes: object classes (the head has num_classes + 1).
    hidden_dim, num_heads, mlp_dim, num_encoder_layers, num_decoder_layers, num_queries: the Transformer
    (DETR: 256, 8, 2048, 6, 6, 100).
    backbone: "cnn" | "patch"; backbone_channels: the CNN's stage widths (multiples of 8, for GroupNorm); "patch"
    embeds patch_size x patch_size patches into backbone_channels[-1] channels.
    deformable: Deformable DETR's attention; num_feature_levels (L) and num_points (P) per head and level.
    """

    @classmethod
    def check_config(cls, config) -> None:
        """config.model: the backbone kind, positive sizes, hidden_dim divisible by num_heads and by 4 (sine
        encoding), backbone_channels multiples of 8, image_size divisible by the backbone's stride."""
        check_fields(config, "config.model", {"backbone": BACKBONES},
                     ("image_size", "in_channels", "num_classes", "hidden_dim", "num_heads", "mlp_dim",
                      "num_encoder_layers", "num_decoder_layers", "num_queries", "patch_size", "num_feature_levels",
                      "num_points"))
        if not isinstance(config.deformable, bool):
            raise ValueError(f"config.model.deformable must be True or False, got {config.deformable!r}")
        if config.hidden_dim % config.num_heads or config.hidden_dim % 4:
            raise ValueError(f"config.model.hidden_dim={config.hidden_dim} must be divisible by "
                             f"config.model.num_heads={config.num_heads} and by 4 (sine position encoding)")
        if config.deformable and config.hidden_dim % 8:
            raise ValueError(f"config.model.hidden_dim={config.hidden_dim} must be a multiple of 8 when deformable "
                             "(GroupNorm of 8 groups on each level)")
        channels = tuple(config.backbone_channels)
        if not channels or any(not isinstance(c, int) or c < 8 or c % 8 for c in channels):
            raise ValueError(f"config.model.backbone_channels must be positive multiples of 8 (GroupNorm of 8 "
                             f"groups), got {channels}")
        stride = config.patch_size if config.backbone == "patch" else 2 ** len(channels)
        if config.image_size % stride:
            raise ValueError(f"config.model.image_size={config.image_size} must be divisible by the backbone's "
                             f"stride {stride}")

    @staticmethod
    def backbone_levels(backbone: str, channels: tuple[int, ...], num_feature_levels: int) -> int:
        """How many of the feature levels come from backbone stages (the rest are strided convolutions)."""
        return min(num_feature_levels, len(channels) if backbone == "cnn" else 1)

    def __init__(self, *, image_size: int, in_channels: int = 3, num_classes: int, hidden_dim: int = 64,
                 num_heads: int = 4, mlp_dim: int = 128, num_encoder_layers: int = 2, num_decoder_layers: int = 3,
                 num_queries: int = 10, backbone: str = "cnn", backbone_channels: tuple[int, ...] = (32, 64, 128),
                 patch_size: int = 4, deformable: bool = False, num_feature_levels: int = 3, num_points: int = 4,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        one_of("backbone", backbone, BACKBONES)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        channels = tuple(backbone_channels)
        self.image_size, self.in_channels, self.deformable, self.hidden_dim = (image_size, in_channels, deformable,
                                                                             hidden_dim)
        if backbone == "cnn":
            self.backbone = ConvBackbone(in_channels, channels, **kw)
            self.backbone_channels = channels
        else:
            self.backbone = PatchEmbedding(patch_size, in_channels, channels[-1], **kw)
            self.backbone_channels = channels[-1:]
        num_levels = num_feature_levels if deformable else 1
        from_backbone = self.backbone_levels(backbone, self.backbone_channels, num_levels)
        self.num_levels = num_levels
        used = self.backbone_channels[len(self.backbone_channels) - from_backbone:]
        self.input_proj = nnx.List([Conv2D(c, hidden_dim, 1, **kw) for c in used])
        extra_in = [self.backbone_channels[-1]] + [hidden_dim] * (num_levels - from_backbone - 1)
        self.extra_levels = nnx.List([Conv2D(c, hidden_dim, 3, stride=2, **kw) for c in extra_in[:num_levels
                                                                                                - from_backbone]])
        self.level_norms = nnx.List([GroupNorm(8, hidden_dim, **kw) for _ in range(num_levels)] if deformable else [])
        heads = (hidden_dim, num_heads, mlp_dim)
        if deformable:
            self.level_embed = param(rngs, jax.nn.initializers.normal(1.0), (num_levels, hidden_dim),
                                     (None, "embed"), param_dtype)
            self.encoder = nnx.List([DeformableEncoderLayer(*heads, num_levels, num_points, **kw)
                                     for _ in range(num_encoder_layers)])
            self.decoder = nnx.List([DeformableDecoderLayer(*heads, num_levels, num_points, **kw)
                                     for _ in range(num_decoder_layers)])
            self.query_embed = param(rngs, jax.nn.initializers.normal(1.0), (num_queries, 2 * hidden_dim),
                                     (None, "embed"), param_dtype)
            self.reference_points = Linear(hidden_dim, 2, **kw)
        else:
            self.encoder = nnx.List([DetrEncoderLayer(*heads, **kw) for _ in range(num_encoder_layers)])
            self.decoder = nnx.List([DetrDecoderLayer(*heads, **kw) for _ in range(num_decoder_layers)])
            self.query_embed = param(rngs, jax.nn.initializers.normal(1.0), (num_queries, hidden_dim),
                                     (None, "embed"), param_dtype)
            self.decoder_norm = LayerNorm(hidden_dim, **kw)
        self.class_head = Linear(hidden_dim, num_classes + 1, logical_axes=("embed", "vocab"), **kw)
        self.box_head = BoxMLP(hidden_dim, **kw)

    def feature_levels(self, x: jax.Array) -> list[jax.Array]:
        """The hidden_dim maps the Transformer reads: [(B, H_l, W_l, hidden_dim)] for l < L (1 for DETR)."""
        maps = self.backbone(x)
        maps = maps if isinstance(maps, list) else [maps]
        levels = [proj(m) for proj, m in zip(self.input_proj, maps[len(maps) - len(self.input_proj):])]
        if not self.deformable:
            return levels
        levels = [norm(level) for norm, level in zip(self.level_norms, levels)]
        source = maps[-1]  # the first extra level reads the backbone's last map, the next ones the previous level
        for conv, norm in zip(self.extra_levels, self.level_norms[len(levels):]):
            source = norm(conv(source))
            levels.append(source)
        return levels

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        check_image_batch("x", x, self.image_size, self.in_channels)
        levels = self.feature_levels(x)
        b, dim = x.shape[0], self.hidden_dim
        shapes = tuple((int(m.shape[1]), int(m.shape[2])) for m in levels)
        src = jnp.concatenate([m.reshape(b, -1, dim) for m in levels], axis=1)
        pos = [sine_position_encoding_2d(h, w, dim).reshape(h * w, dim) for h, w in shapes]
        if self.deformable:
            pos = [p + self.level_embed.value[i].astype(jnp.float32) for i, p in enumerate(pos)]
        pos = jnp.broadcast_to(jnp.concatenate(pos)[None].astype(src.dtype), src.shape)
        if self.deformable:
            centres = jnp.concatenate([level_centres(h, w) for h, w in shapes])  # (S, 2)
            enc_ref = jnp.broadcast_to(centres[None, :, None, :], (b, centres.shape[0], len(shapes), 2))
            for layer in self.encoder:
                src = layer(src, pos, enc_ref, shapes)
            query = jnp.broadcast_to(self.query_embed.value.astype(src.dtype)[None],
                                     (b,) + self.query_embed.value.shape)
            query_pos, t = query[..., :dim], query[..., dim:]
            reference = jax.nn.sigmoid(self.reference_points(query_pos).astype(jnp.float32))  # (B, Q, 2)
            dec_ref = jnp.broadcast_to(reference[:, :, None, :], reference.shape[:2] + (len(shapes), 2))
            states = []
            for layer in self.decoder:
                t = layer(t, query_pos, dec_ref, src, shapes)
                states.append(t)
            hs = jnp.stack(states)
            raw = self.box_head(hs).astype(jnp.float32)
            raw = raw.at[..., :2].add(inverse_sigmoid(reference)[None])
        else:
            for layer in self.encoder:
                src = layer(src, pos)
            query_pos = jnp.broadcast_to(self.query_embed.value.astype(src.dtype)[None],
                                         (b,) + self.query_embed.value.shape)
            t, states = jnp.zeros_like(query_pos), []
            for layer in self.decoder:
                t = layer(t, query_pos, src, pos)
                states.append(self.decoder_norm(t))
            hs = jnp.stack(states)
            raw = self.box_head(hs).astype(jnp.float32)
        return {"logits": self.class_head(hs).astype(jnp.float32), "boxes": jax.nn.sigmoid(raw)}
