"""Deformable sampling: bilinear sampling, deformable convolution v1/v2 and multi-scale deformable attention.

All three read a channels-last feature map at fractional positions by bilinear interpolation with zero padding:
a position (y, x) in pixel units (pixel (i, j) has its centre at y = i, x = j) mixes its four neighbouring
pixels, a neighbour outside the map counting as 0. This is the sampling of torchvision's `deform_conv2d` and of
`torch.nn.functional.grid_sample(..., padding_mode="zeros", align_corners=False)` once normalised coordinates
u in [0, 1] are mapped to pixels by x = u·W - 0.5.
"""

import jax
import jax.numpy as jnp

from jaxmodels.ops.checks import positive_int


def _pair(name, value):
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def _sample_grouped(image, y, x):
    """image (B, H, W, G, Cg); y, x (B, ..., G) pixel coordinates -> (B, ..., G, Cg), zero padding."""
    _, height, width, groups, _ = image.shape
    batch = jnp.arange(image.shape[0]).reshape((-1,) + (1,) * (y.ndim - 1))
    group = jnp.arange(groups)
    y0, x0 = jnp.floor(y), jnp.floor(x)
    ly, lx = y - y0, x - x0
    y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
    out = 0
    for dy, wy in ((0, 1 - ly), (1, ly)):
        for dx, wx in ((0, 1 - lx), (1, lx)):
            yi, xi = y0 + dy, x0 + dx
            valid = (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)
            v = image[batch, jnp.clip(yi, 0, height - 1), jnp.clip(xi, 0, width - 1), group]
            out = out + jnp.where(valid, wy * wx, 0).astype(v.dtype)[..., None] * v
    return out


def bilinear_sample(image: jax.Array, y: jax.Array, x: jax.Array) -> jax.Array:
    """Bilinear interpolation of `image` at fractional pixel positions with zero padding (see the module docstring):
    out = Σ over the 4 neighbours (i, j) of (1 - |y - i|)(1 - |x - j|)·image[i, j], neighbours outside = 0.

    image: (B, H, W, C) float; y, x: (B, ...) float of one shape, row and column positions (pixel centres at
    integers). Returns (B, ..., C) in image's dtype. Differentiable in image, y and x (piecewise linear in y, x).
    """
    if image.ndim != 4:
        raise ValueError(f"image must be 4-D (batch, height, width, channels), got shape {image.shape}")
    if y.shape != x.shape or y.ndim < 1 or y.shape[0] != image.shape[0]:
        raise ValueError(f"y and x must have one shape (B, ...) with B = {image.shape[0]}, got {y.shape} and {x.shape}")
    return _sample_grouped(image[..., None, :], y[..., None], x[..., None])[..., 0, :]


def deform_conv2d(x: jax.Array, offset: jax.Array, kernel: jax.Array, mask: jax.Array | None = None, *,
                  stride=1, padding=0, dilation=1, feature_group_count: int = 1) -> jax.Array:
    """Deformable convolution v1 (Dai et al. 2017, eq. 2) and, with `mask`, v2 (Zhu et al. 2019, eq. 1):

        y[p] = Σ_k w_k · m_k(p) · x(p·stride - padding + p_k·dilation + Δp_k(p))

    over the kh·kw kernel taps p_k, x read by `bilinear_sample` (zero padding), Δp_k the learned offsets and m_k
    the modulation (1 without mask). Zero offsets and unit mask give `jax.lax.conv_general_dilated` exactly.
    torchvision's `deform_conv2d` in channels-last form (bias left to the layer).

    Args:
      x: (B, H, W, Cin) float.
      offset: (B, H', W', 2·G·kh·kw) with G offset groups (Cin split into G contiguous groups that share
        offsets). Channel g·2·kh·kw + 2·(i·kw + j) is the row offset Δy of tap (i, j) for group g and the next
        channel its column offset Δx: (Δy, Δx) pairs, taps in row-major order, groups outermost — torchvision's
        channel order, moved last.
      kernel: (kh, kw, Cin / feature_group_count, Cout) ("HWIO", as `lax.conv_general_dilated`).
      mask: optional (B, H', W', G·kh·kw) modulation, channel g·kh·kw + i·kw + j (v2 takes a sigmoid of it).
      stride, padding, dilation: int or (h, w); padding is symmetric zero padding.
      feature_group_count: groups of the convolution (Cin and Cout split contiguously, as lax and torch).

    H' = (H + 2·padding - dilation·(kh - 1) - 1) // stride + 1, likewise W'. Returns (B, H', W', Cout) in the
    promoted dtype of x and kernel. Differentiable in x, offset, mask and kernel.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D (batch, height, width, channels), got shape {x.shape}")
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be 4-D (kh, kw, in_channels / groups, out_channels), got {kernel.shape}")
    (sh, sw), (ph, pw), (dh, dw) = (_pair(n, v) for n, v in (("stride", stride), ("padding", padding),
                                                              ("dilation", dilation)))
    for name, v in (("stride", sh), ("stride", sw), ("dilation", dh), ("dilation", dw)):
        positive_int(name, v)
    if min(ph, pw) < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    groups = positive_int("feature_group_count", feature_group_count)
    b, height, width, cin = x.shape
    kh, kw, cin_per_group, cout = kernel.shape
    if cin != cin_per_group * groups or cout % groups:
        raise ValueError(f"kernel {kernel.shape} does not fit x with {cin} channels and feature_group_count={groups}: "
                         f"need kernel (kh, kw, {cin} / {groups}, Cout) with Cout divisible by {groups}")
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    taps = kh * kw
    if (offset.ndim != 4 or offset.shape[:3] != (b, out_h, out_w) or not offset.shape[3]
            or offset.shape[3] % (2 * taps) or cin % (offset.shape[3] // (2 * taps))):
        raise ValueError(f"offset must be (B, H', W', 2·G·kh·kw) = ({b}, {out_h}, {out_w}, 2·G·{taps}) with G "
                         f"offset groups dividing {cin} input channels, got shape {offset.shape}")
    offset_groups = offset.shape[3] // (2 * taps)
    if mask is not None and mask.shape != (b, out_h, out_w, offset_groups * taps):
        raise ValueError(f"mask must be (B, H', W', G·kh·kw) = {(b, out_h, out_w, offset_groups * taps)}, "
                         f"got shape {mask.shape}")
    dtype = jnp.promote_types(jnp.promote_types(x.dtype, kernel.dtype), offset.dtype)
    delta = offset.astype(dtype).reshape(b, out_h, out_w, offset_groups, kh, kw, 2)
    base_y = (jnp.arange(out_h) * sh - ph)[:, None, None, None, None] + (jnp.arange(kh) * dh)[None, None, None, :, None]
    base_x = (jnp.arange(out_w) * sw - pw)[None, :, None, None, None] + (jnp.arange(kw) * dw)[None, None, None, None, :]
    y = (base_y + delta[..., 0]).transpose(0, 1, 2, 4, 5, 3)  # (B, H', W', kh, kw, G)
    xs = (base_x + delta[..., 1]).transpose(0, 1, 2, 4, 5, 3)
    image = x.astype(dtype).reshape(b, height, width, offset_groups, cin // offset_groups)
    cols = _sample_grouped(image, y, xs)  # (B, H', W', kh, kw, G, Cin / G)
    if mask is not None:
        m = mask.astype(dtype).reshape(b, out_h, out_w, offset_groups, kh, kw).transpose(0, 1, 2, 4, 5, 3)
        cols = cols * m[..., None]
    cols = cols.reshape(b, out_h, out_w, kh, kw, groups, cin_per_group)
    w = kernel.astype(dtype).reshape(kh, kw, cin_per_group, groups, cout // groups)
    out = jnp.einsum("bhwijgc,ijcgo->bhwgo", cols, w, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, out_h, out_w, cout)


def multi_scale_deformable_attention(value: jax.Array, spatial_shapes, sampling_locations: jax.Array,
                                     attention_weights: jax.Array) -> jax.Array:
    """The core of multi-scale deformable attention (Zhu et al. 2021, Deformable DETR, eq. 3): each query and head
    reads P sampled points on each of L feature levels and mixes them with its attention weights,

        out[q, m] = Σ_l Σ_k A[q, m, l, k] · v_l,m(φ_l(p̂[q, m, l, k]))

    with the sampling positions p̂ normalised to [0, 1]² per level (x first) and read bilinearly with zero padding
    at pixel (u·W_l - 0.5, v·H_l - 0.5) (as the paper's `grid_sample(align_corners=False)` reference). The query
    projections that produce the locations (reference points + offsets) and the weights (softmax over L·P) are
    the layer's; this function is `ms_deform_attn_core_pytorch` of the official code, channels-last.

    Args:
      value: (B, S, M, D) float, the L levels' flattened (H_l, W_l) maps concatenated, S = Σ H_l·W_l, M heads.
      spatial_shapes: static ((H_0, W_0), ..., (H_{L-1}, W_{L-1})).
      sampling_locations: (B, Q, M, L, P, 2) float, (x, y) in [0, 1] (outside reads zeros).
      attention_weights: (B, Q, M, L, P) float.

    Returns (B, Q, M·D) in value's dtype. Differentiable in all three arrays.
    """
    shapes = tuple((positive_int("spatial_shapes height", int(h)), positive_int("spatial_shapes width", int(w)))
                   for h, w in spatial_shapes)
    if value.ndim != 4 or value.shape[1] != sum(h * w for h, w in shapes):
        raise ValueError(f"value must be (B, S, M, D) with S = Σ H·W = {sum(h * w for h, w in shapes)} for "
                         f"spatial_shapes {shapes}, got shape {value.shape}")
    b, _, heads, _ = value.shape
    if (sampling_locations.ndim != 6 or sampling_locations.shape[0] != b or sampling_locations.shape[2] != heads
            or sampling_locations.shape[3] != len(shapes) or sampling_locations.shape[5] != 2):
        raise ValueError(f"sampling_locations must be (B, Q, M, L, P, 2) with B={b}, M={heads}, L={len(shapes)}, "
                         f"got shape {sampling_locations.shape}")
    if attention_weights.shape != sampling_locations.shape[:5]:
        raise ValueError(f"attention_weights must be (B, Q, M, L, P) = {sampling_locations.shape[:5]}, "
                         f"got shape {attention_weights.shape}")
    out, start = 0, 0
    for level, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].reshape(b, h, w, heads, value.shape[3])
        start += h * w
        loc = sampling_locations[:, :, :, level].astype(jnp.promote_types(value.dtype, sampling_locations.dtype))
        x, y = (loc[..., 0] * w - 0.5).transpose(0, 1, 3, 2), (loc[..., 1] * h - 0.5).transpose(0, 1, 3, 2)
        sampled = _sample_grouped(v, y, x)  # (B, Q, P, M, D)
        out = out + jnp.einsum("bqpmd,bqmp->bqmd", sampled, attention_weights[:, :, :, level],
                               precision=jax.lax.Precision.HIGHEST)
    return out.reshape(out.shape[0], out.shape[1], -1).astype(value.dtype)
