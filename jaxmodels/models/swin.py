"""Swin Transformer (Liu et al. 2021, "Hierarchical Vision Transformer using Shifted Windows") as an image
classifier.

x (B, H, W, C) -> p × p patch partition + linear embedding + LayerNorm (§3.1) -> stages of Swin blocks
(`nn.vision.SwinBlock`: W-MSA in even blocks, SW-MSA with cyclic shift ws/2 in odd ones, eq. 3) with patch merging
(2 × 2 -> 2·dim, `nn.vision.PatchMerging`) between stages -> LayerNorm -> global average pool -> linear head
(zero-initialised, as `models.vit.ViT`) -> (B, num_classes) float32 logits.

Swin-T (Table 1 of the paper, §3.3): patch 4, embed_dim 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24), window 7,
224 × 224 (`SWIN_T`). Stage s works on a (H/p/2^s)² token grid of dim embed_dim·2^s. As the official code, a stage
whose grid is no larger than the window takes the whole grid as its one window and does not shift (so 28 × 28
MNIST with patch 2 runs stages of 14² and 7² tokens with window 7).

Differences from the official model, stated where they change a count: the attention projections (qkv, out) and
the MLP are bias-free, as the library's other Transformers (`nn.vision.WindowAttention`, `nn.layers.MLP`), 9·dim
parameters per block fewer (Swin-T: 28,248,610 against timm's 28,288,354); no absolute position embedding (Swin's
default); no stochastic depth or dropout.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.base import Model, check_fields
from jaxmodels.nn.diffusion import Linear
from jaxmodels.nn.layers import LayerNorm
from jaxmodels.nn.vision import PatchEmbedding, PatchMerging, SwinBlock
from jaxmodels.ops.checks import check_image_batch, positive_int

# Swin-T of the paper (Table 1 / §3.3), ImageNet-1k at 224 × 224: 28M parameters, 4.5G FLOPs (multiply-adds).
SWIN_T = dict(image_size=224, patch_size=4, in_channels=3, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2),
              num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0)


def swin_stages(image_size: int, patch_size: int, depths, num_heads, window_size: int, embed_dim: int,
                prefix: str = "") -> list[tuple[int, int, int]]:
    """(grid side, window, shift) of each stage of a Swin model, checking that the shapes fit.

    Stage s has a token grid of side r_s = image_size / patch_size / 2^s; its window is min(window_size, r_s) and
    its odd blocks shift by window // 2 unless the window is the whole grid (the official rule). Raises ValueError
    naming the argument (`prefix` + name, e.g. "config.model.window_size") when image_size is not divisible by
    patch_size, a grid before a patch merging is odd, a grid is not divisible by its window, depths and num_heads
    differ in length, or a stage's dim embed_dim·2^s is not divisible by its heads."""
    for name, value in (("image_size", image_size), ("patch_size", patch_size), ("window_size", window_size),
                        ("embed_dim", embed_dim)):
        positive_int(prefix + name, value)
    depths, num_heads = tuple(depths), tuple(num_heads)
    if not depths or len(depths) != len(num_heads):
        raise ValueError(f"{prefix}depths={depths} and {prefix}num_heads={num_heads} must give one entry per stage "
                         "(at least one)")
    for i, (d, h) in enumerate(zip(depths, num_heads)):
        positive_int(f"{prefix}depths[{i}]", d)
        positive_int(f"{prefix}num_heads[{i}]", h)
        if (embed_dim << i) % h:
            raise ValueError(f"stage {i} has dim {prefix}embed_dim·2^{i} = {embed_dim << i}, not divisible by "
                             f"{prefix}num_heads[{i}]={h}")
    if image_size % patch_size:
        raise ValueError(f"{prefix}image_size={image_size} must be divisible by {prefix}patch_size={patch_size}")
    side, stages = image_size // patch_size, []
    for i in range(len(depths)):
        if i and side % 2:
            raise ValueError(f"stage {i - 1}'s token grid {side} x {side} ({prefix}image_size={image_size} / "
                             f"{prefix}patch_size={patch_size} / 2^{i - 1}) is odd: patch merging needs an even grid; "
                             f"use fewer stages or another image or patch size")
        side = side // 2 if i else side
        window = min(window_size, side)
        if side % window:
            raise ValueError(f"stage {i}'s token grid {side} x {side} is not divisible by {prefix}window_size="
                             f"{window_size}; choose a window dividing it or pad the image")
        stages.append((side, window, window // 2 if window < side else 0))
    return stages


class Swin(Model):
    """Swin Transformer classifier (see the module docstring).

    image_size: H = W; patch_size: p dividing it; in_channels: C; num_classes: size of the head.
    embed_dim: dim of stage 0 (doubled by each patch merging); depths, num_heads: blocks and heads per stage;
    window_size: M (tokens per window M²); mlp_ratio: MLP width / dim. `swin_stages` says which shapes fit.

    __call__(x (B, image_size, image_size, in_channels)) -> logits (B, num_classes) float32.
    Parameters: `swin_parameter_count`; FLOPs: `swin_flops_per_example`.
    """

    @classmethod
    def check_config(cls, config) -> None:
        """config.model: positive sizes, depths and num_heads per stage, and every stage's grid fitting its
        window and patch merging (`swin_stages`)."""
        check_fields(config, "config.model", {}, ("in_channels", "num_classes"))
        swin_stages(config.image_size, config.patch_size, config.depths, config.num_heads, config.window_size,
                    config.embed_dim, prefix="config.model.")

    def __init__(self, *, image_size: int, patch_size: int, in_channels: int, num_classes: int, embed_dim: int,
                 depths, num_heads, window_size: int, mlp_ratio: float = 4.0, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        stages = swin_stages(image_size, patch_size, depths, num_heads, window_size, embed_dim)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.image_size, self.in_channels = image_size, in_channels
        self.hyperparameters = tuple(dict(  # hashable: nnx keeps it in the graph definition
            image_size=image_size, patch_size=patch_size, in_channels=in_channels, num_classes=num_classes,
            embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(num_heads), window_size=window_size,
            mlp_ratio=mlp_ratio).items())
        self.patch_embed = PatchEmbedding(patch_size, in_channels, embed_dim, **kw)
        self.patch_norm = LayerNorm(embed_dim, **kw)
        self.stages = nnx.List()
        self.merges = nnx.List()
        for i, ((_, window, shift), depth, heads) in enumerate(zip(stages, depths, num_heads)):
            dim = embed_dim << i
            if i:
                self.merges.append(PatchMerging(dim // 2, **kw))
            self.stages.append(nnx.List([SwinBlock(dim, heads, window, shift if j % 2 else 0, mlp_ratio, **kw)
                                         for j in range(depth)]))
        final_dim = embed_dim << (len(depths) - 1)
        self.norm = LayerNorm(final_dim, **kw)
        self.head = Linear(final_dim, num_classes, zero_init=True, logical_axes=("embed", "vocab"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_image_batch("x", x, self.image_size, self.in_channels)
        h = self.patch_norm(self.patch_embed(x))
        for i, blocks in enumerate(self.stages):
            if i:
                h = self.merges[i - 1](h)
            for block in blocks:
                h = block(h)
        h = self.norm(h)
        pooled = jnp.mean(h.astype(jnp.float32), axis=(1, 2)).astype(h.dtype)
        return self.head(pooled).astype(jnp.float32)

    def train_flops_per_example(self) -> float:
        """Model FLOPs of one training example: 3 x the forward (`swin_flops_per_example`), forward + backward."""
        return 3 * swin_flops_per_example(**dict(self.hyperparameters))


def swin_parameter_count(*, image_size: int, patch_size: int, in_channels: int, num_classes: int, embed_dim: int,
                         depths, num_heads, window_size: int, mlp_ratio: float = 4.0) -> int:
    """Parameters of `Swin`, counted from the architecture: patch embedding p²·C·d + d and its LayerNorm 2d; per
    block of dim d with h heads and window M: 2 LayerNorms 4d, qkv and output 4d² (bias-free), the relative
    position bias table (2M - 1)²·h, MLP 2·d·(mlp_ratio·d) (bias-free); patch merging into 2d: LayerNorm 8d and
    4d·2d; final LayerNorm 2d; head d·num_classes + num_classes."""
    stages = swin_stages(image_size, patch_size, depths, num_heads, window_size, embed_dim)
    total = patch_size ** 2 * in_channels * embed_dim + embed_dim + 2 * embed_dim
    for i, ((_, window, _), depth, heads) in enumerate(zip(stages, depths, num_heads)):
        d = embed_dim << i
        if i:
            total += 4 * d + 2 * d * d  # LayerNorm(4·(d/2)) and the (4·d/2 -> d) reduction
        total += depth * (4 * d + 4 * d * d + (2 * window - 1) ** 2 * heads + 2 * d * int(d * mlp_ratio))
    d = embed_dim << (len(depths) - 1)
    return total + 2 * d + d * num_classes + num_classes


def swin_flops_per_example(*, image_size: int, patch_size: int, in_channels: int, num_classes: int, embed_dim: int,
                           depths, num_heads, window_size: int, mlp_ratio: float = 4.0) -> float:
    """Model FLOPs of one Swin forward pass for one example, counted analytically (2 FLOPs per multiply-add; a
    training step is 3x this).

    With L = r² tokens of dim d in a stage and windows of N = M² tokens: per block qkv and output projections
    2·4·L·d², the window attention's scores and values 2·2·L·N·d (every token attends the N tokens of its window;
    shifted windows cost the same), the MLP 2·2·L·d·(mlp_ratio·d); patch embedding 2·L₀·p²C·d; patch merging
    2·(L/4)·4d·2d; head 2·d·num_classes. Elementwise work (norms, softmax, GELU, bias, masks) is not counted, as
    the official `flops()` does not count it beside the matmuls. The paper reports multiply-adds as "FLOPs"
    (Swin-T: 4.5G), i.e. half this count.
    """
    stages = swin_stages(image_size, patch_size, depths, num_heads, window_size, embed_dim)
    side0 = image_size // patch_size
    macs = side0 * side0 * patch_size ** 2 * in_channels * embed_dim
    for i, ((side, window, _), depth) in enumerate(zip(stages, depths)):
        d, tokens = embed_dim << i, side * side
        if i:
            macs += tokens * 4 * (d // 2) * d
        macs += depth * (4 * tokens * d * d + 2 * tokens * window * window * d + 2 * tokens * d * int(d * mlp_ratio))
    macs += (embed_dim << (len(depths) - 1)) * num_classes
    return float(2 * macs)
