"""Diffusion Transformer, DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

x (B, H, W, C) -> patchify (p×p patches, linear embedding) + 2D position embedding -> depth
adaLN-Zero blocks conditioned on c = timestep embedding + label embedding -> final adaLN and linear
to p·p·out_channels -> unpatchify -> (B, H, W, out_channels), out_channels = C, or 2C with
`learn_sigma` (mean and the variance interpolation of Nichol & Dhariwal 2021).
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.base import Model
from jaxmodels.nn.diffusion import (
    AdaLNModulation,
    LabelEmbedding,
    Linear,
    MultiHeadAttention,
    TimestepEmbedding,
    layer_norm,
    modulate,
    patchify,
    sincos_2d_embedding,
    unpatchify,
)
from jaxmodels.nn.layers import MLP
from jaxmodels.nn.param import param

POSITIONS = ("sincos", "learned")


class DiTBlock(nnx.Module):
    """adaLN-Zero block (Peebles & Xie 2023, §3.2, Fig. 3): with (shift1, scale1, gate1, shift2,
    scale2, gate2) = AdaLNModulation(c),

        x = x + gate1 · Attn(modulate(LN(x), shift1, scale1))
        x = x + gate2 · MLP(modulate(LN(x), shift2, scale2))

    LN affine-free, MLP GELU (tanh) with hidden mlp_dim, bias-free attention and MLP. The
    modulation is zero-initialised, so the gates are 0 and the block is the identity at init.
    x: (B, L, dim), c: (B, dim). Returns (B, L, dim) in `dtype`.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = MultiHeadAttention(dim, num_heads, **kw)
        self.mlp = MLP(dim, mlp_dim, kind="gelu", **kw)
        self.modulation = AdaLNModulation(dim, dim, 6, **kw)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)
        x = x + gate1[:, None, :] * self.attn(modulate(layer_norm(x), shift1, scale1))
        return x + gate2[:, None, :] * self.mlp(modulate(layer_norm(x), shift2, scale2))


class FinalLayer(nnx.Module):
    """DiT's output layer: Linear(modulate(LN(x), shift, scale)) with (shift, scale) from a
    zero-initialised adaLN and a zero-initialised linear to out_dim (Peebles & Xie 2023, §3.2).
    x: (B, L, dim), c: (B, cond_dim). Returns (B, L, out_dim) in `dtype`."""

    def __init__(self, dim: int, cond_dim: int, out_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.modulation = AdaLNModulation(cond_dim, dim, 2, **kw)
        self.linear = Linear(dim, out_dim, zero_init=True, logical_axes=("embed", None), **kw)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = self.modulation(c)
        return self.linear(modulate(layer_norm(x), shift, scale))


class DiT(Model):
    """DiT (see the module docstring).

    input_size: image height = width (H, divisible by patch_size); in_channels: C.
    hidden_dim, depth, num_heads, mlp_ratio: the Transformer (DiT-S/2: 384, 12, 6, 4.0).
    num_classes: 0 for an unconditional model, else labels (B,) int in [0, num_classes], label
      num_classes being the null label (classifier-free guidance); labels=None means null.
    position: "sincos" (fixed 2D sin-cos, the paper's choice) or "learned" (N(0, 0.02²) table).
    learn_sigma: output 2C channels (off by default).
    frequency_dim: width of the timestep sinusoid.

    __call__(x (B, H, W, C), t (B,) float, labels (B,) | None) -> (B, H, W, out_channels) float32.
    Parameters: see `dit_parameter_count`; FLOPs: `dit_flops_per_example`.
    """

    def __init__(self, *, input_size: int, patch_size: int, in_channels: int, hidden_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, num_classes: int = 0, position: str = "sincos",
                 learn_sigma: bool = False, frequency_dim: int = 256, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if position not in POSITIONS:
            raise ValueError(f"unknown position {position!r}; valid: {list(POSITIONS)}")
        if input_size % patch_size:
            raise ValueError(f"input_size ({input_size}) must be divisible by patch_size ({patch_size})")
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes, self.position, self.dtype = num_classes, position, dtype
        self.hidden_dim, self.depth, self.mlp_ratio = hidden_dim, depth, mlp_ratio
        self.learn_sigma, self.frequency_dim = learn_sigma, frequency_dim
        grid = input_size // patch_size
        self.patch_embed = Linear(patch_size * patch_size * in_channels, hidden_dim, logical_axes=(None, "embed"),
                                  **kw)
        if position == "learned":
            self.position_table = param(rngs, jax.nn.initializers.normal(0.02), (grid * grid, hidden_dim),
                                        (None, "embed"), param_dtype)
        self.time_embed = TimestepEmbedding(hidden_dim, frequency_dim=frequency_dim, **kw)
        self.label_embed = LabelEmbedding(num_classes, hidden_dim, **kw) if num_classes else None
        self.blocks = nnx.List([DiTBlock(hidden_dim, num_heads, int(hidden_dim * mlp_ratio), **kw)
                                for _ in range(depth)])
        self.final = FinalLayer(hidden_dim, hidden_dim, patch_size * patch_size * self.out_channels, **kw)

    def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        expected = (self.input_size, self.input_size, self.in_channels)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(f"x must be (batch, {', '.join(map(str, expected))}), got shape {x.shape}")
        if t.shape != x.shape[:1]:
            raise ValueError(f"t must be (batch,) = {x.shape[:1]}, got shape {t.shape}")
        h = self.patch_embed(patchify(x, self.patch_size))
        grid = self.input_size // self.patch_size
        if self.position == "sincos":
            h = h + sincos_2d_embedding(grid, grid, h.shape[-1]).astype(h.dtype)
        else:
            h = h + self.position_table.value.astype(h.dtype)
        c = self.time_embed(t)
        if self.label_embed is not None:
            c = c + self.label_embed(jnp.full(t.shape, self.num_classes, jnp.int32) if labels is None else labels)
        elif labels is not None:
            raise ValueError("labels given to a model built with num_classes=0")
        for block in self.blocks:
            h = block(h, c)
        out = self.final(h, c)
        return unpatchify(out, self.patch_size, self.input_size, self.input_size).astype(jnp.float32)

    def train_flops_per_example(self) -> float:
        """Model FLOPs of one training example: 3 x the forward (`dit_flops_per_example`), forward + backward."""
        return 3 * dit_flops_per_example(input_size=self.input_size, patch_size=self.patch_size,
                                         in_channels=self.in_channels, hidden_dim=self.hidden_dim, depth=self.depth,
                                         mlp_ratio=self.mlp_ratio, learn_sigma=self.learn_sigma,
                                         frequency_dim=self.frequency_dim)


def dit_parameter_count(*, input_size: int, patch_size: int, in_channels: int, hidden_dim: int, depth: int,
                        mlp_ratio: float = 4.0, num_classes: int = 0, position: str = "sincos",
                        learn_sigma: bool = False, frequency_dim: int = 256) -> int:
    """Number of parameters of `DiT` with these arguments, counted by hand (num_heads does not matter)."""
    d, p, f = hidden_dim, patch_size, int(hidden_dim * mlp_ratio)
    out = p * p * in_channels * (2 if learn_sigma else 1)
    patch = p * p * in_channels * d + d
    pos = (input_size // p) ** 2 * d if position == "learned" else 0
    time = frequency_dim * d + d + d * d + d
    labels = (num_classes + 1) * d if num_classes else 0
    block = 4 * d * d + 2 * d * f + (d * 6 * d + 6 * d)
    final = (d * 2 * d + 2 * d) + d * out + out
    return patch + pos + time + labels + depth * block + final


def dit_flops_per_example(*, input_size: int, patch_size: int, in_channels: int, hidden_dim: int, depth: int,
                          mlp_ratio: float = 4.0, learn_sigma: bool = False, frequency_dim: int = 256) -> float:
    """Model FLOPs of one DiT forward pass for one example, counted analytically (2 FLOPs per
    multiply-add; a training step is 3x this: forward + backward).

    With T = (input_size / patch_size)² tokens, D = hidden_dim, F = mlp_ratio·D:
      per token: patch embedding 2·p²C·D; per block 2·(4D² + 2DF) (q, k, v, out, MLP) and the
      attention scores and values 2·2·T·D (full, non-causal matrix); final linear 2·D·p²·out.
      per example: timestep MLP 2·(frequency_dim·D + D²); adaLN 2·D·6D per block and 2·D·2D final.
    Elementwise work (norms, softmax, GELU, biases) is not counted. DiT's paper reports
    multiply-adds as "Gflops" (DiT-XL/2: 118.6), i.e. half this count.
    """
    d, p, f = hidden_dim, patch_size, hidden_dim * mlp_ratio
    tokens = (input_size // p) ** 2
    out = p * p * in_channels * (2 if learn_sigma else 1)
    per_token = 2 * p * p * in_channels * d + depth * (2 * (4 * d * d + 2 * d * f) + 4 * tokens * d) + 2 * d * out
    per_example = 2 * (frequency_dim * d + d * d) + depth * 2 * d * 6 * d + 2 * d * 2 * d
    return float(tokens * per_token + per_example)
