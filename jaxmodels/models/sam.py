"""Segment Anything, a promptable segmenter (Kirillov et al. 2023, "Segment Anything", §3, App. A), small.

    images (B, S, S, C_in) ──ViT image encoder + neck──> image embeddings (B, g, g, C), g = S / patch_size
    points / boxes ──prompt encoder──> sparse prompt tokens (B, N, C); no mask ──> dense (B, g, g, C)
    mask decoder: [IoU token; 4 mask tokens; prompt tokens] ⇄ image embeddings + dense (two-way Transformer),
        image embeddings upscaled 4x by two transposed convs; each mask token's hypernetwork MLP gives the
        weights of a dynamic linear classifier of the upscaled pixels -> 4 mask logits (B, 4, 4g, 4g), upsampled
        bilinearly to (B, 4, S, S) when 4g != S; the IoU token's MLP predicts each mask's IoU (B, 4).

Multimask output (ambiguity-aware, §3): the first mask token serves unambiguous prompts (single-mask output,
masks[:, :1]); the other three serve ambiguous ones such as a single point (multimask output, masks[:, 1:]),
trained by the minimum of their losses; at inference the mask of highest predicted IoU is picked.

Prompts, in input-image pixel coordinates (x to the right, y down, continuous: pixel (i, j) covers
[j, j + 1) × [i, i + 1); as the official code, a point is shifted by half a pixel before encoding):
  points (B, N, 2) float (x, y) with point_labels (B, N) int: 1 foreground, 0 background, -1 padding (ignored,
    gets the "not a point" embedding), and, as Segment Anything 2 encodes boxes, 2 and 3 for a box's top-left and
    bottom-right corner (so that a batch can mix point and box prompts with one token count);
  boxes (B, 4) float (x1, y1, x2, y2): one box per example, encoded as its two corners with labels 2 and 3.
A padding point is appended to points given without boxes (the official code's `pad`). Positions are random
Fourier features (`ops.position.random_fourier_features`, the paper's PositionEmbeddingRandom) of the
coordinates normalised by the image size; the Gaussian matrix is a fixed function of (C/2, pe_scale, pe_seed),
not a parameter. Mask prompts are not implemented: the dense prompt is always the learned no-mask embedding.

Channels-last throughout (embeddings (B, g, g, C)); masks are (B, num_masks, S, S) float32 logits (a mask pixel
is set where its logit > 0); IoU predictions (B, num_masks) float32.
"""

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxmodels.models.base import Model, check_fields
from jaxmodels.nn.conv import Conv2D, ConvTranspose2D
from jaxmodels.nn.layers import LayerNorm
from jaxmodels.nn.param import param
from jaxmodels.nn.two_way import MLPHead, TwoWayTransformer
from jaxmodels.nn.vision import PatchEmbedding, ViTBlock
from jaxmodels.ops.checks import check_image_batch, values_in_range
from jaxmodels.ops.position import fourier_feature_matrix, grid_fourier_features, random_fourier_features
from jaxmodels.ops.spatial import resize_bilinear

# Point labels (Segment Anything 2's convention; SAM 1 has the first three and encodes box corners separately).
PADDING, BACKGROUND, FOREGROUND, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = -1, 0, 1, 2, 3
# LayerNorm2d's eps in the official neck and upscaling.
NECK_EPS = 1e-6
_embedding_init = jax.nn.initializers.normal(1.0)  # PyTorch's nn.Embedding: N(0, 1)


class ImageEncoder(nnx.Module):
    """A plain ViT (`PatchEmbedding`, learned absolute positions, `ViTBlock`s; SAM uses ViT-H/16 with windowed
    attention, here every block is global) and the neck of App. A: 1x1 conv to C channels, LayerNorm, 3x3 conv,
    LayerNorm, both convs bias-free. images (B, S, S, in_channels) -> (B, g, g, embed_dim) in `dtype`."""

    def __init__(self, *, image_size: int, patch_size: int, in_channels: int, hidden_dim: int, depth: int,
                 num_heads: int, mlp_dim: int, embed_dim: int, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        grid = image_size // patch_size
        self.patch_embed = PatchEmbedding(patch_size, in_channels, hidden_dim, **kw)
        self.position = param(rngs, jax.nn.initializers.normal(0.02), (1, grid, grid, hidden_dim),
                              (None, None, None, "embed"), param_dtype)
        self.blocks = nnx.List([ViTBlock(hidden_dim, num_heads, mlp_dim, **kw) for _ in range(depth)])
        self.neck_conv1 = Conv2D(hidden_dim, embed_dim, 1, use_bias=False, **kw)
        self.neck_norm1 = LayerNorm(embed_dim, eps=NECK_EPS, **kw)
        self.neck_conv2 = Conv2D(embed_dim, embed_dim, 3, use_bias=False, **kw)
        self.neck_norm2 = LayerNorm(embed_dim, eps=NECK_EPS, **kw)

    def __call__(self, images: jax.Array) -> jax.Array:
        h = self.patch_embed(images)
        h = h + self.position.value.astype(h.dtype)
        b, g, _, d = h.shape
        tokens = h.reshape(b, g * g, d)
        for block in self.blocks:
            tokens = block(tokens)
        h = self.neck_norm1(self.neck_conv1(tokens.reshape(b, g, g, d)))
        return self.neck_norm2(self.neck_conv2(h))


class PromptEncoder(nnx.Module):
    """Sparse (points, boxes) and dense (no-mask) prompt embeddings of App. A (module docstring).

    A point's embedding is its random Fourier features plus the learned embedding of its label (background,
    foreground, box top-left, box bottom-right); a padding point's is the learned "not a point" embedding alone.
    `dense_positional_encoding()` is the same Fourier features at the centres of the g × g embedding grid.
    """

    def __init__(self, *, embed_dim: int, image_size: int, grid_size: int, pe_scale: float = 1.0, pe_seed: int = 0,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if embed_dim % 2:
            raise ValueError(f"embed_dim must be even (sines and cosines of the Fourier features), got {embed_dim}")
        fourier_feature_matrix(embed_dim // 2, pe_scale, pe_seed)  # checks the arguments now
        self.embed_dim, self.image_size, self.grid_size, self.dtype = embed_dim, image_size, grid_size, dtype
        self.pe_scale, self.pe_seed = pe_scale, pe_seed
        self.point_embeddings = param(rngs, _embedding_init, (4, embed_dim), (None, "embed"), param_dtype)
        self.not_a_point_embed = param(rngs, _embedding_init, (embed_dim,), ("embed",), param_dtype)
        self.no_mask_embed = param(rngs, _embedding_init, (embed_dim,), ("embed",), param_dtype)

    @property
    def fourier_matrix(self) -> jax.Array:
        """The (2, embed_dim / 2) Gaussian matrix B of the positional encoding (`fourier_feature_matrix`)."""
        return fourier_feature_matrix(self.embed_dim // 2, self.pe_scale, self.pe_seed)

    def dense_positional_encoding(self) -> jax.Array:
        """(g, g, embed_dim) float32: the Fourier features of the grid cell centres (`grid_fourier_features`)."""
        return grid_fourier_features(self.grid_size, self.grid_size, self.fourier_matrix)

    def embed_points(self, points: jax.Array, labels: jax.Array) -> jax.Array:
        """points (B, N, 2) (x, y) pixels, labels (B, N) int in {-1, 0, 1, 2, 3} -> (B, N, embed_dim) in `dtype`."""
        coords = (points.astype(jnp.float32) + 0.5) / self.image_size
        pe = random_fourier_features(coords, self.fourier_matrix)
        table = self.point_embeddings.value.astype(jnp.float32)
        label_embedding = jnp.take(table, jnp.clip(labels, 0, 3), axis=0)
        padding = (labels == PADDING)[..., None]
        out = jnp.where(padding, self.not_a_point_embed.value.astype(jnp.float32), pe + label_embedding)
        return out.astype(self.dtype)

    def __call__(self, points: jax.Array | None = None, point_labels: jax.Array | None = None,
                 boxes: jax.Array | None = None, *, batch_size: int | None = None) -> tuple[jax.Array, jax.Array]:
        """(sparse (B, N', embed_dim), dense (B, g, g, embed_dim)) in `dtype`; N' = N + 1 (padding point) for
        points alone, N + 2 with boxes, 2 for boxes alone, 0 without prompts (then `batch_size` gives B)."""
        b = check_prompts(points, point_labels, boxes, batch_size)
        sparse = [jnp.zeros((b, 0, self.embed_dim), self.dtype)]
        if points is not None:
            if boxes is None:
                points = jnp.concatenate([points, jnp.zeros((b, 1, 2), points.dtype)], axis=1)
                point_labels = jnp.concatenate([point_labels, jnp.full((b, 1), PADDING, point_labels.dtype)], axis=1)
            sparse.append(self.embed_points(points, point_labels))
        if boxes is not None:
            corners, labels = box_corner_points(boxes)
            sparse.append(self.embed_points(corners, labels))
        dense = jnp.broadcast_to(self.no_mask_embed.value.astype(self.dtype),
                                 (b, self.grid_size, self.grid_size, self.embed_dim))
        return jnp.concatenate(sparse, axis=1), dense


def box_corner_points(boxes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """boxes (B, 4) (x1, y1, x2, y2) -> (corners (B, 2, 2) (x, y), labels (B, 2) int32 = [2, 3]): a box as two
    prompt points, the form in which the prompt encoder embeds it."""
    corners = boxes.reshape(boxes.shape[0], 2, 2)
    labels = jnp.broadcast_to(jnp.asarray([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], jnp.int32), (boxes.shape[0], 2))
    return corners, labels


def check_prompts(points, point_labels, boxes, batch_size: int | None = None) -> int:
    """Check the prompts' shapes and labels (the module docstring's forms) and return the batch size B.
    Raises ValueError naming the argument: points not (B, N, 2), point_labels not integer (B, N), points without
    labels or labels without points, boxes not (B, 4), batch sizes that disagree (with each other or with
    `batch_size`), and concrete labels outside {-1, 0, 1, 2, 3}."""
    sizes = {}
    if (points is None) != (point_labels is None):
        raise ValueError("points and point_labels must be given together (point_labels: 1 foreground, "
                         "0 background, -1 padding)")
    if points is not None:
        if points.ndim != 3 or points.shape[-1] != 2:
            raise ValueError(f"points must be (batch, num_points, 2) (x, y) pixel coordinates, got shape "
                             f"{points.shape}")
        if point_labels.shape != points.shape[:2]:
            raise ValueError(f"point_labels must be (batch, num_points) = {points.shape[:2]}, one label per "
                             f"point, got shape {point_labels.shape}")
        if not jnp.issubdtype(point_labels.dtype, jnp.integer):
            raise ValueError(f"point_labels must be integers (1 foreground, 0 background, -1 padding), got dtype "
                             f"{point_labels.dtype}")
        values_in_range("point_labels", point_labels, PADDING, BOX_BOTTOM_RIGHT, include_high=True)
        sizes["points"] = points.shape[0]
    if boxes is not None:
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be (batch, 4) (x1, y1, x2, y2) pixel coordinates, one box per example, "
                             f"got shape {boxes.shape}")
        sizes["boxes"] = boxes.shape[0]
    if batch_size is not None:
        sizes["the images"] = batch_size
    if not sizes:
        raise ValueError("without points or boxes the batch size must be given (batch_size)")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the prompts and images must have one batch size, got {sizes}")
    return next(iter(sizes.values()))


class MaskDecoder(nnx.Module):
    """The mask decoder of §3 and App. A (module docstring): output tokens (an IoU token and
    num_multimask_outputs + 1 mask tokens) concatenated with the sparse prompt tokens, a `TwoWayTransformer` with
    the image embeddings + dense prompt, 4x upscaling (transposed conv 2x2 stride 2 to C/4, LayerNorm, GELU,
    transposed conv to C/8, GELU), a 3-layer hypernetwork MLP per mask token giving C/8 dynamic weights, and a
    `iou_head_depth`-layer MLP on the IoU token predicting every mask's IoU.

    __call__(image_embeddings (B, g, g, C), image_pe (g, g, C), sparse (B, N, C), dense (B, g, g, C)) ->
    (masks (B, 4g, 4g, num_mask_tokens), iou (B, num_mask_tokens)), both float32, every mask token's output.
    """

    def __init__(self, *, embed_dim: int, depth: int, num_heads: int, mlp_dim: int, num_multimask_outputs: int = 3,
                 iou_head_depth: int = 3, iou_head_hidden_dim: int = 256, attention_downsample_rate: int = 2,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if embed_dim % 8:
            raise ValueError(f"embed_dim must be divisible by 8 (upscaling to embed_dim / 8 channels), got "
                             f"{embed_dim}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        c = embed_dim
        self.num_mask_tokens, self.dtype = num_multimask_outputs + 1, dtype
        self.iou_token = param(rngs, _embedding_init, (1, c), (None, "embed"), param_dtype)
        self.mask_tokens = param(rngs, _embedding_init, (self.num_mask_tokens, c), (None, "embed"), param_dtype)
        self.transformer = TwoWayTransformer(depth, c, num_heads, mlp_dim, downsample_rate=attention_downsample_rate,
                                             **kw)
        self.upscale_conv1 = ConvTranspose2D(c, c // 4, 2, stride=2, **kw)
        self.upscale_norm = LayerNorm(c // 4, eps=NECK_EPS, **kw)
        self.upscale_conv2 = ConvTranspose2D(c // 4, c // 8, 2, stride=2, **kw)
        self.hypernetworks = MLPHead(c, c, c // 8, 3, num_stacked=self.num_mask_tokens, **kw)  # one per mask token
        self.iou_head = MLPHead(c, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth, **kw)

    def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array, sparse: jax.Array,
                 dense: jax.Array) -> tuple[jax.Array, jax.Array]:
        b = image_embeddings.shape[0]
        m = self.num_mask_tokens
        output_tokens = jnp.concatenate([self.iou_token.value, self.mask_tokens.value], axis=0).astype(self.dtype)
        tokens = jnp.concatenate([jnp.broadcast_to(output_tokens, (b, *output_tokens.shape)),
                                  sparse.astype(self.dtype)], axis=1)
        src = image_embeddings.astype(self.dtype) + dense.astype(self.dtype)
        queries, keys = self.transformer(src, image_pe, tokens)
        iou_token_out, mask_tokens_out = queries[:, 0], queries[:, 1:1 + m]
        upscaled = keys.reshape(src.shape)
        upscaled = jax.nn.gelu(self.upscale_norm(self.upscale_conv1(upscaled)), approximate=False)
        upscaled = jax.nn.gelu(self.upscale_conv2(upscaled), approximate=False)  # (B, 4g, 4g, C/8)
        hyper_in = self.hypernetworks(mask_tokens_out)  # (B, M + 1, C/8): mask token i through MLP i
        masks = jnp.einsum("bmc,bhwc->bhwm", hyper_in.astype(jnp.float32), upscaled.astype(jnp.float32))
        return masks, self.iou_head(iou_token_out).astype(jnp.float32)


def select_masks(masks: jax.Array, iou_predictions: jax.Array, multimask_output: bool) -> tuple[jax.Array, jax.Array]:
    """The masks of one output mode from every mask token's output: masks (B, M + 1, ...) and iou_predictions
    (B, M + 1) -> the multimask outputs [:, 1:] (M masks, for ambiguous prompts) or the single-mask output [:, :1]
    (§3, "we only predict a single mask when more than one prompt is given", through a fourth output token)."""
    chosen = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, chosen], iou_predictions[:, chosen]


class SAM(Model):
    """A small Segment Anything model (module docstring).

    image_size: S = H = W of the input images; patch_size: p dividing S; in_channels: C_in.
    hidden_dim, depth, num_heads, mlp_dim: the ViT image encoder. embed_dim: C, the image and prompt embedding
    width (SAM: 256), divisible by 8. decoder_depth, decoder_num_heads, decoder_mlp_dim: the two-way Transformer
    (SAM: 2, 8, 2048); attention_downsample_rate: of its cross-attentions (2). num_multimask_outputs: masks of the
    multimask output (3); iou_head_depth, iou_head_hidden_dim: the IoU head MLP (3, 256). pe_scale, pe_seed: the
    random Fourier features' standard deviation and seed (`fourier_feature_matrix`).

    encode(images (B, S, S, C_in)) -> image embeddings (B, g, g, C), g = S / p;
    decode(embeddings, points=, point_labels=, boxes=) -> every mask token's (masks (B, M + 1, S, S), iou (B, M + 1));
    __call__(images, points=, point_labels=, boxes=, multimask_output=True) -> `select_masks` of those.
    Parameters: `sam_parameter_count`.
    """

    @classmethod
    def check_config(cls, config) -> None:
        """config.model: positive sizes, image_size divisible by patch_size, hidden_dim by num_heads, embed_dim by 8
        and (embed_dim / attention_downsample_rate) by decoder_num_heads, a positive pe_scale."""
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        config = ml_collections.ConfigDict({**defaults, **dict(config)})
        check_fields(config, "config.model", None,
                     ("image_size", "patch_size", "in_channels", "hidden_dim", "depth", "num_heads", "mlp_dim",
                      "embed_dim", "decoder_depth", "decoder_num_heads", "decoder_mlp_dim",
                      "attention_downsample_rate", "num_multimask_outputs", "iou_head_depth", "iou_head_hidden_dim"))
        c = config
        checks = ((c.image_size % c.patch_size, f"image_size={c.image_size} must be divisible by "
                                                f"config.model.patch_size={c.patch_size}"),
                  (c.hidden_dim % c.num_heads, f"hidden_dim={c.hidden_dim} must be divisible by "
                                               f"config.model.num_heads={c.num_heads}"),
                  (c.embed_dim % 8, f"embed_dim={c.embed_dim} must be divisible by 8 (the upscaled mask features "
                                    "have embed_dim / 8 channels)"),
                  (c.embed_dim % (c.attention_downsample_rate * c.decoder_num_heads),
                   f"embed_dim={c.embed_dim} must be divisible by config.model.attention_downsample_rate * "
                   f"config.model.decoder_num_heads = {c.attention_downsample_rate * c.decoder_num_heads}"))
        for bad, message in checks:
            if bad:
                raise ValueError(f"config.model.{message}")
        if not c.pe_scale > 0:
            raise ValueError(f"config.model.pe_scale must be positive, got {c.pe_scale!r}")

    def __init__(self, *, image_size: int, patch_size: int, in_channels: int, hidden_dim: int, depth: int,
                 num_heads: int, mlp_dim: int, embed_dim: int, decoder_depth: int = 2, decoder_num_heads: int = 8,
                 decoder_mlp_dim: int = 2048, attention_downsample_rate: int = 2, num_multimask_outputs: int = 3,
                 iou_head_depth: int = 3, iou_head_hidden_dim: int = 256, pe_scale: float = 1.0, pe_seed: int = 0,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.image_size, self.in_channels = image_size, in_channels
        self.grid_size = image_size // patch_size
        self.image_encoder = ImageEncoder(image_size=image_size, patch_size=patch_size, in_channels=in_channels,
                                          hidden_dim=hidden_dim, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
                                          embed_dim=embed_dim, **kw)
        self.prompt_encoder = PromptEncoder(embed_dim=embed_dim, image_size=image_size, grid_size=self.grid_size,
                                            pe_scale=pe_scale, pe_seed=pe_seed, **kw)
        self.mask_decoder = MaskDecoder(embed_dim=embed_dim, depth=decoder_depth, num_heads=decoder_num_heads,
                                        mlp_dim=decoder_mlp_dim, num_multimask_outputs=num_multimask_outputs,
                                        iou_head_depth=iou_head_depth, iou_head_hidden_dim=iou_head_hidden_dim,
                                        attention_downsample_rate=attention_downsample_rate, **kw)

    def encode(self, images: jax.Array) -> jax.Array:
        """images (B, S, S, C_in) -> image embeddings (B, g, g, C) in `dtype`."""
        check_image_batch("images", images, self.image_size, self.in_channels)
        return self.image_encoder(images)

    def decode(self, image_embeddings: jax.Array, points: jax.Array | None = None,
               point_labels: jax.Array | None = None, boxes: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Every mask token's output for one prompt per image: (mask logits (B, M + 1, S, S), predicted IoU
        (B, M + 1)), float32; mask 0 is the single-mask output, 1.. the multimask outputs (`select_masks`)."""
        g = self.grid_size
        if image_embeddings.ndim != 4 or image_embeddings.shape[1:3] != (g, g):
            raise ValueError(f"image_embeddings must be (batch, {g}, {g}, embed_dim) (`encode`), got shape "
                             f"{image_embeddings.shape}")
        sparse, dense = self.prompt_encoder(points, point_labels, boxes, batch_size=image_embeddings.shape[0])
        masks, iou = self.mask_decoder(image_embeddings, self.prompt_encoder.dense_positional_encoding(), sparse,
                                       dense)
        if masks.shape[1] != self.image_size:  # the official `postprocess_masks`: bilinear to the input size
            masks = resize_bilinear(masks, self.image_size)
        return masks.transpose(0, 3, 1, 2), iou

    def __call__(self, images: jax.Array, points: jax.Array | None = None, point_labels: jax.Array | None = None,
                 boxes: jax.Array | None = None, *, multimask_output: bool = True) -> tuple[jax.Array, jax.Array]:
        """(mask logits (B, M, S, S), predicted IoU (B, M)) float32: M = num_multimask_outputs with
        `multimask_output`, else 1."""
        check_prompts(points, point_labels, boxes, images.shape[0])  # before the image encoder runs
        masks, iou = self.decode(self.encode(images), points, point_labels, boxes)
        return select_masks(masks, iou, multimask_output)


def sam_parameter_count(*, image_size: int, patch_size: int, in_channels: int, hidden_dim: int, depth: int,
                        num_heads: int, mlp_dim: int, embed_dim: int, decoder_depth: int = 2,
                        decoder_num_heads: int = 8, decoder_mlp_dim: int = 2048, attention_downsample_rate: int = 2,
                        num_multimask_outputs: int = 3, iou_head_depth: int = 3, iou_head_hidden_dim: int = 256,
                        **unused) -> int:
    """Parameters of `SAM`, counted from the architecture (biases everywhere in the decoder, none in the ViT's
    attention and MLP nor the neck's convs; LayerNorms 2 per width)."""
    del num_heads, decoder_num_heads, unused
    d, c, i = hidden_dim, embed_dim, embed_dim // attention_downsample_rate
    m = num_multimask_outputs + 1
    linear = lambda a, b: a * b + b
    encoder = (patch_size ** 2 * in_channels * d + d + (image_size // patch_size) ** 2 * d
               + depth * (4 * d + 4 * d * d + 2 * d * mlp_dim) + d * c + 2 * c + 9 * c * c + 2 * c)
    prompt = 4 * c + c + c
    cross = 3 * linear(c, i) + linear(i, c)
    block = 4 * linear(c, c) + 2 * cross + linear(c, decoder_mlp_dim) + linear(decoder_mlp_dim, c) + 4 * 2 * c
    head_dims = [c] + [iou_head_hidden_dim] * (iou_head_depth - 1) + [m]
    decoder = (c + m * c + decoder_depth * block + cross + 2 * c
               + 4 * c * (c // 4) + c // 4 + 2 * (c // 4) + 4 * (c // 4) * (c // 8) + c // 8
               + m * (2 * linear(c, c) + linear(c, c // 8))
               + sum(linear(a, b) for a, b in zip(head_dims[:-1], head_dims[1:])))
    return encoder + prompt + decoder
