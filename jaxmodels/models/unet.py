"""Diffusion UNet (DDPM, Ho et al. 2020; ADM, Dhariwal & Nichol 2021; the latent diffusion UNet,
Rombach et al. 2022), small and channels-last.

x (B, H, W, C), noise level t (B,) [, class labels (B,), context (B, S, context_dim)] -> (B, H, W,
out_channels). Layout (ADM): conditioning embedding emb = MLP(sinusoid(t)) [+ label embedding];
conv_in; per resolution level, num_res_blocks ResBlocks (+ attention at `attention_levels`) and a
downsample (not after the last level), every output kept as a skip; middle ResBlock-Attention-
ResBlock; the mirrored up path, each ResBlock taking one skip by concatenation (num_res_blocks + 1
per level) and an upsample; GroupNorm, SiLU, zero-initialised conv_out.

ControlNet (Zhang et al. 2023) plugs in through `skip_residuals` and `middle_residual`, added to the
skips and to the middle block's output (see `jaxmodels.models.controlnet`).
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.base import Model
from jaxmodels.nn.conv import Conv2D, Downsample, GroupNorm, Upsample
from jaxmodels.nn.diffusion import AttentionBlock, LabelEmbedding, ResBlock, TimestepEmbedding


class _Stage(nnx.Module):
    """One ResBlock, then an AttentionBlock if `attention`."""

    def __init__(self, in_channels, out_channels, *, emb_dim, attention, num_heads, context_dim, num_groups, kw):
        self.res = ResBlock(in_channels, out_channels, emb_dim=emb_dim, num_groups=num_groups, **kw)
        self.attn = (AttentionBlock(out_channels, num_heads, context_dim=context_dim, num_groups=num_groups, **kw)
                     if attention else None)

    def __call__(self, x, emb, context):
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x, context)


class UNetEncoder(nnx.Module):
    """The UNet's conditioning embedding, conv_in, down path and middle block: the part that
    ControlNet copies. Arguments as `UNet`; `config` keeps them to build a copy.

    __call__(x, t, labels, context, hint=None) -> (h, skips, emb): h (B, H/2^(L-1), W/2^(L-1),
    base_channels·channel_mult[-1]) the middle block's output, skips the list of the down path's
    outputs (channels `skip_channels`), emb (B, 4·base_channels). `hint`, if given, (B, H, W,
    base_channels), is added to conv_in's output (ControlNet's guided hint).
    """

    def __init__(self, *, in_channels: int, base_channels: int = 32, channel_mult: Sequence[int] = (1, 2),
                 num_res_blocks: int = 1, attention_levels: Sequence[int] = (1,), num_heads: int = 4,
                 num_groups: int = 8, num_classes: int = 0, context_dim: int = 0, frequency_dim: int = 256,
                 downsample: str = "conv", dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        channel_mult, attention_levels = tuple(channel_mult), tuple(attention_levels)
        bad = [a for a in attention_levels if not 0 <= a < len(channel_mult)]
        if not channel_mult or bad:
            raise ValueError(f"need a non-empty channel_mult and attention_levels in [0, {len(channel_mult)}), got "
                             f"channel_mult={channel_mult}, attention_levels={attention_levels}")
        # Hashable (a tuple, not a dict), so the graphdef can be a static jit argument.
        self.config_items = tuple(dict(
            in_channels=in_channels, base_channels=base_channels, channel_mult=channel_mult,
            num_res_blocks=num_res_blocks, attention_levels=attention_levels, num_heads=num_heads,
            num_groups=num_groups, num_classes=num_classes, context_dim=context_dim, frequency_dim=frequency_dim,
            downsample=downsample).items())
        self.in_channels, self.num_classes, self.context_dim, self.dtype = in_channels, num_classes, context_dim, dtype
        self.num_levels = len(channel_mult)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        emb_dim = 4 * base_channels
        self.time_embed = TimestepEmbedding(emb_dim, frequency_dim=frequency_dim, **kw)
        self.label_embed = LabelEmbedding(num_classes, emb_dim, **kw) if num_classes else None
        self.conv_in = Conv2D(in_channels, base_channels, 3, **kw)
        stage = dict(emb_dim=emb_dim, num_heads=num_heads, context_dim=context_dim, num_groups=num_groups, kw=kw)
        ch, skips, down = base_channels, [base_channels], []
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                down.append(_Stage(ch, base_channels * mult, attention=level in attention_levels, **stage))
                ch = base_channels * mult
                skips.append(ch)
            if level < len(channel_mult) - 1:
                down.append(Downsample(ch, ch, method=downsample, **kw))
                skips.append(ch)
        self.down = nnx.List(down)
        self.skip_channels = tuple(skips)
        self.middle_channels = ch
        self.middle_res1 = ResBlock(ch, ch, emb_dim=emb_dim, num_groups=num_groups, **kw)
        self.middle_attn = AttentionBlock(ch, num_heads, context_dim=context_dim, num_groups=num_groups, **kw)
        self.middle_res2 = ResBlock(ch, ch, emb_dim=emb_dim, num_groups=num_groups, **kw)

    @property
    def config(self) -> dict:
        """The constructor's arguments but dtype, param_dtype and rngs."""
        return dict(self.config_items)

    def embed(self, t: jax.Array, labels: jax.Array | None) -> jax.Array:
        """emb (B, 4·base_channels) from noise levels t (B,) and labels (B,) (None: the null label)."""
        emb = self.time_embed(t)
        if self.label_embed is not None:
            if labels is None:
                labels = jnp.full(t.shape, self.num_classes, jnp.int32)
            emb = emb + self.label_embed(labels)
        elif labels is not None:
            raise ValueError("labels given to a model built with num_classes=0")
        return emb

    def __call__(self, x, t, labels=None, context=None, hint=None):
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must be (batch, height, width, {self.in_channels}), got shape {x.shape}")
        factor = 2 ** (self.num_levels - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"height and width must be divisible by 2^(levels - 1) = {factor}, got shape {x.shape}")
        if t.shape != x.shape[:1]:
            raise ValueError(f"t must be (batch,) = {x.shape[:1]}, got shape {t.shape}")
        if (context is None) != (not self.context_dim):
            raise ValueError(f"context (batch, length, {self.context_dim}) must be given exactly when context_dim "
                             f"is set (context_dim={self.context_dim})")
        emb = self.embed(t, labels)
        h = self.conv_in(x)
        if hint is not None:
            h = h + hint.astype(h.dtype)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else block(h, emb, context)
            skips.append(h)
        h = self.middle_res2(self.middle_attn(self.middle_res1(h, emb), context), emb)
        return h, skips, emb


class UNet(Model):
    """Diffusion UNet (see the module docstring). x (B, H, W, in_channels), H and W divisible by
    2^(len(channel_mult) - 1); t (B,) float noise levels; labels (B,) int in [0, num_classes]
    (num_classes is the null label of classifier-free guidance; None means null) when num_classes > 0;
    context (B, S, context_dim) when context_dim > 0 (cross-attention in every attention block).
    Returns (B, H, W, out_channels) float32 (out_channels defaults to in_channels).

    Channels of level l: base_channels · channel_mult[l]; attention_levels: the levels with
    attention (the middle block always has it); num_groups: GroupNorm groups (must divide every
    channel count, skips' concatenations included); upsample / downsample: methods of
    `jaxmodels.nn.conv.Upsample` / `Downsample`. Every residual branch's last layer and conv_out
    are zero-initialised (ADM), so the network outputs 0 at init.
    """

    def __init__(self, *, in_channels: int, out_channels: int | None = None, base_channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1, attention_levels: Sequence[int] = (1,),
                 num_heads: int = 4, num_groups: int = 8, num_classes: int = 0, context_dim: int = 0,
                 frequency_dim: int = 256, upsample: str = "nearest_conv", downsample: str = "conv",
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = UNetEncoder(in_channels=in_channels, base_channels=base_channels, channel_mult=channel_mult,
                                   num_res_blocks=num_res_blocks, attention_levels=attention_levels,
                                   num_heads=num_heads, num_groups=num_groups, num_classes=num_classes,
                                   context_dim=context_dim, frequency_dim=frequency_dim, downsample=downsample, **kw)
        stage = dict(emb_dim=4 * base_channels, num_heads=num_heads, context_dim=context_dim, num_groups=num_groups,
                     kw=kw)
        skips = list(self.encoder.skip_channels)
        ch, up = self.encoder.middle_channels, []
        for level in reversed(range(len(channel_mult))):
            for _ in range(num_res_blocks + 1):
                up.append(_Stage(ch + skips.pop(), base_channels * channel_mult[level],
                                 attention=level in tuple(attention_levels), **stage))
                ch = base_channels * channel_mult[level]
            if level > 0:
                up.append(Upsample(ch, ch, method=upsample, **kw))
        self.up = nnx.List(up)
        self.out_norm = GroupNorm(num_groups, ch, **kw)
        self.conv_out = Conv2D(ch, out_channels or in_channels, 3, zero_init=True, **kw)

    def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array | None = None, context: jax.Array | None = None,
                 *, skip_residuals: Sequence[jax.Array] | None = None,
                 middle_residual: jax.Array | None = None) -> jax.Array:
        """skip_residuals: one array per skip (shapes of the skips, `encoder.skip_channels`), added to
        each skip before it is concatenated; middle_residual: added to the middle block's output
        (ControlNet's residuals, Zhang et al. 2023, eq. 4)."""
        num_skips = len(self.encoder.skip_channels)
        if skip_residuals is not None and len(skip_residuals) != num_skips:
            raise ValueError(f"skip_residuals needs one array per skip ({num_skips}), got {len(skip_residuals)}")
        h, skips, emb = self.encoder(x, t, labels, context)
        if skip_residuals is not None:
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, skip_residuals)]
        if middle_residual is not None:
            h = h + middle_residual.astype(h.dtype)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = block(jnp.concatenate([h, skips.pop()], axis=-1), emb, context)
        return self.conv_out(jax.nn.silu(self.out_norm(h))).astype(jnp.float32)
