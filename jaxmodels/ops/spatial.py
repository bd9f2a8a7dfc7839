"""Spatial operators on channels-last images (B, H, W, C): pooling to fixed sizes (adaptive pooling, spatial
pyramid pooling), resampling (pixel shuffle and its inverse, nearest and bilinear resizing, transposed
convolution), and the window machinery of the Swin Transformer (window partition and reverse, cyclic shift with
its attention mask, relative position index and bias, patch merging).

Shapes and options are static: every function here is a fixed gather / reshape / einsum under `jit`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.ops.checks import non_negative_int, one_of, positive_int


def _check_image(x, name="x"):
    if x.ndim != 4:
        raise ValueError(f"{name} must be 4-D (batch, height, width, channels), got shape {x.shape}")


def _pair(name, value, check=positive_int):
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return tuple(check(f"{name}[{i}]", v) for i, v in enumerate(pair))


# ----------------------------------------------------------------------------------------------- pooling

POOL_MODES = ("max", "avg")


def adaptive_pool(x: jax.Array, output_size, mode: str = "max") -> jax.Array:
    """Adaptive pooling to a fixed grid, as PyTorch's `adaptive_{max,avg}_pool2d`: output cell (i, j) reduces rows
    [floor(i·H/oh), ceil((i+1)·H/oh)) and columns [floor(j·W/ow), ceil((j+1)·W/ow)) (cells overlap when H is not a
    multiple of oh, and repeat rows when H < oh).

    x: (B, H, W, C) with H, W >= 1; output_size: int or (oh, ow); mode: "max" or "avg" (mean in float32 or wider).
    Returns (B, oh, ow, C) in x's dtype.
    """
    _check_image(x)
    one_of("mode", mode, POOL_MODES)
    oh, ow = _pair("output_size", output_size)
    if min(x.shape[1:3]) < 1:
        raise ValueError(f"x must have height and width >= 1, got shape {x.shape}")

    def reduce(v, axis, n):
        size = v.shape[axis]
        cells = []
        for i in range(n):
            part = jax.lax.slice_in_dim(v, (i * size) // n, -(-((i + 1) * size) // n), axis=axis)
            cells.append(jnp.max(part, axis, keepdims=True) if mode == "max"
                         else jnp.mean(part.astype(jnp.promote_types(part.dtype, jnp.float32)), axis, keepdims=True))
        return jnp.concatenate(cells, axis)

    return reduce(reduce(x, 1, oh), 2, ow).astype(x.dtype)


def spatial_pyramid_pooling(x: jax.Array, levels=(1, 2, 4), mode: str = "max") -> jax.Array:
    """Spatial pyramid pooling (He et al. 2014, SPP-net §2.3): pool the map into n × n cells for each pyramid level
    n and concatenate, so that images of any size give one fixed-length vector, C · Σ n².

    The paper's windows (size ceil(H/n), stride floor(H/n)) do not always give n cells (H = 7, n = 4 gives 6),
    so the cells are `adaptive_pool`'s, which always do. x: (B, H, W, C), any H, W >= 1; levels: positive ints;
    mode: "max" (the paper's) or "avg". Returns (B, C · Σ n²) in x's dtype: level by level in the given order,
    each level's (n, n, C) cells flattened row-major (cell by cell, channels innermost).
    """
    _check_image(x)
    if not levels:
        raise ValueError("levels must name at least one pyramid level, got an empty sequence")
    levels = [positive_int(f"levels[{i}]", n) for i, n in enumerate(levels)]
    return jnp.concatenate([adaptive_pool(x, n, mode).reshape(x.shape[0], -1) for n in levels], axis=-1)


# ------------------------------------------------------------------------------------------- resampling

def depth_to_space(x: jax.Array, factor: int) -> jax.Array:
    """Pixel shuffle (Shi et al. 2016, "Real-Time Single Image and Video Super-Resolution Using an
    Efficient Sub-Pixel CNN", eq. 4), channels-last: (B, H, W, r²·C) -> (B, r·H, r·W, C) with

        out[b, r·h + i, r·w + j, c] = x[b, h, w, (r·i + j)·C + c]

    (TensorFlow's `depth_to_space` order; PyTorch's channels-first `pixel_shuffle` reads channel
    c·r² + r·i + j instead). Any dtype; returns x's dtype. Inverse: `space_to_depth`.
    """
    _check_image(x)
    positive_int("factor", factor)
    b, h, w, c = x.shape
    if c % (factor * factor):
        raise ValueError(f"channels ({c}) must be divisible by factor² = {factor * factor}")
    c_out = c // (factor * factor)
    x = x.reshape(b, h, w, factor, factor, c_out).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * factor, w * factor, c_out)


def space_to_depth(x: jax.Array, factor: int) -> jax.Array:
    """Inverse of `depth_to_space` (pixel unshuffle): (B, r·H, r·W, C) -> (B, H, W, r²·C) with
    out[b, h, w, (r·i + j)·C + c] = x[b, r·h + i, r·w + j, c]. Returns x's dtype."""
    _check_image(x)
    positive_int("factor", factor)
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"height and width must be divisible by factor {factor}, got shape {x.shape}")
    x = x.reshape(b, h // factor, factor, w // factor, factor, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // factor, w // factor, factor * factor * c)


def _nearest_matrix(n_in, n_out):
    src = np.minimum(np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)
    return np.eye(n_in)[src]


def _linear_matrix(n_in, n_out, align_corners):
    dst = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = dst * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    else:
        src = np.maximum((dst + 0.5) * n_in / n_out - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = src - low
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.arange(n_out), low), 1 - frac)
    np.add.at(matrix, (np.arange(n_out), high), frac)
    return matrix


def _separable(x, rows, cols):
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    y = jnp.einsum("oh,bhwc->bowc", rows.astype(dtype), x.astype(dtype), precision=jax.lax.Precision.HIGHEST)
    y = jnp.einsum("pw,bowc->bopc", cols.astype(dtype), y, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def resize_nearest(x: jax.Array, size) -> jax.Array:
    """Nearest-neighbour resizing with half-pixel centres: out[i] = x[floor((i + 0.5)·H/H')] (clamped), likewise
    in width — `jax.image.resize(method="nearest")` and PyTorch's mode="nearest-exact". For an integer factor r
    this is repeating each pixel r × r times (and PyTorch's legacy mode="nearest" agrees; for other ratios that
    mode reads floor(i·H/H') instead).

    x: (B, H, W, C) float; size: (H', W') (or one int for both). Returns (B, H', W', C) in x's dtype.
    """
    _check_image(x)
    out_h, out_w = _pair("size", size)
    return _separable(x, jnp.asarray(_nearest_matrix(x.shape[1], out_h)),
                      jnp.asarray(_nearest_matrix(x.shape[2], out_w)))


def resize_bilinear(x: jax.Array, size, *, align_corners: bool = False) -> jax.Array:
    """Bilinear resizing, separable in height and width, with PyTorch's `interpolate(mode="bilinear")` geometry:

      align_corners=False (half-pixel centres): output pixel i reads input position (i + 0.5)·H/H' - 0.5, clamped
        to [0, H - 1] — equal to `jax.image.resize(method="bilinear")` when upsampling (which antialiases when
        downsampling; this function does not);
      align_corners=True: output pixel i reads i·(H - 1)/(H' - 1), so the corner pixels of input and output
        coincide (position 0 when H' = 1).

    x: (B, H, W, C) float; size: (H', W') or an int. Returns (B, H', W', C) in x's dtype (computed in float32 or
    wider). Linear in x.
    """
    _check_image(x)
    out_h, out_w = _pair("size", size)
    return _separable(x, jnp.asarray(_linear_matrix(x.shape[1], out_h, align_corners)),
                      jnp.asarray(_linear_matrix(x.shape[2], out_w, align_corners)))


def conv_transpose(x: jax.Array, kernel: jax.Array, stride=1, padding=0, *, output_padding=0,
                   dilation=1) -> jax.Array:
    """Transposed ("fractionally strided") convolution (Dumoulin & Visin 2016, §4), PyTorch's `conv_transpose2d`
    channels-last: the adjoint (gradient with respect to its input) of the strided convolution
    `conv(z, kernelᵀ, stride, padding, dilation)` with kernelᵀ[.., o, i] = kernel[.., i, o].

    x: (B, H, W, Cin); kernel: (kh, kw, Cin, Cout) (PyTorch's weight (Cin, Cout, kh, kw) permuted (2, 3, 0, 1));
    stride, padding, dilation: int or (h, w); output_padding: extra rows/columns at the bottom/right, each
    < max(stride, dilation) as in PyTorch, which picks among the input sizes that the forward convolution maps
    to (H, W). Output H' = (H - 1)·stride - 2·padding + dilation·(kh - 1) + output_padding + 1, likewise W'.
    Returns (B, H', W', Cout) in the promoted dtype.
    """
    _check_image(x)
    if kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
        raise ValueError(f"kernel must be (kh, kw, Cin = {x.shape[3]}, Cout), got shape {kernel.shape}")
    stride, dilation = _pair("stride", stride), _pair("dilation", dilation)
    padding = _pair("padding", padding, non_negative_int)
    output_padding = _pair("output_padding", output_padding, non_negative_int)
    for axis in range(2):
        if output_padding[axis] >= max(stride[axis], dilation[axis]):
            raise ValueError(f"output_padding must be smaller than max(stride, dilation) = "
                             f"{max(stride[axis], dilation[axis])} along each axis, got {output_padding}")
    pads = [(d * (k - 1) - p, d * (k - 1) - p + op)
            for k, p, d, op in zip(kernel.shape[:2], padding, dilation, output_padding)]
    return jax.lax.conv_general_dilated(x, kernel[::-1, ::-1], (1, 1), pads, lhs_dilation=stride,
                                        rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


# ------------------------------------------------------------------------------------------------- Swin

def _window(window_size):
    return _pair("window_size", window_size)


def _check_divisible(x_shape, window, what="window_size"):
    if x_shape[1] % window[0] or x_shape[2] % window[1]:
        raise ValueError(f"x height and width must be divisible by {what} {window}, got shape {x_shape}; "
                         f"pad the image first")


def window_partition(x: jax.Array, window_size) -> jax.Array:
    """Split into non-overlapping windows (Liu et al. 2021, Swin Transformer §3.2, the official `window_partition`):
    (B, H, W, C) -> (B·nH·nW, wh, ww, C), windows in row-major order within each image and images outermost
    (window index b·nH·nW + i·nW + j), nH = H / wh, nW = W / ww. window_size: int or (wh, ww) dividing H and W."""
    _check_image(x)
    wh, ww = window = _window(window_size)
    _check_divisible(x.shape, window)
    b, h, w, c = x.shape
    x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh, ww, c)


def window_reverse(windows: jax.Array, window_size, height: int, width: int) -> jax.Array:
    """Inverse of `window_partition`: (B·nH·nW, wh, ww, C) -> (B, height, width, C)."""
    wh, ww = window = _window(window_size)
    _check_divisible((None, height, width), window)
    per_image = (height // wh) * (width // ww)
    if windows.ndim != 4 or windows.shape[1:3] != (wh, ww) or windows.shape[0] % per_image:
        raise ValueError(f"windows must be (B·{per_image}, {wh}, {ww}, C) for a {height}x{width} image, "
                         f"got shape {windows.shape}")
    b, c = windows.shape[0] // per_image, windows.shape[3]
    x = windows.reshape(b, height // wh, width // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


def cyclic_shift(x: jax.Array, shift) -> jax.Array:
    """Swin's cyclic shift (§3.2, Figure 4): roll the image up and left by `shift` = s or (sh, sw) pixels,
    x'[i, j] = x[(i + sh) mod H, (j + sw) mod W]; a negative shift rolls back. (B, H, W, C) -> same."""
    _check_image(x)
    sh, sw = (shift, shift) if isinstance(shift, int) else tuple(shift)
    return jnp.roll(x, (-sh, -sw), axis=(1, 2))


def shifted_window_mask(height: int, width: int, window_size, shift_size) -> jax.Array:
    """Attention mask of shifted-window attention (Swin §3.2, "efficient batch computation for shifted
    configuration"): after `cyclic_shift` by shift_size, a window can hold pixels from up to 4 regions that were
    not adjacent in the image; a token may attend only to tokens of its own region. Regions are the 3 × 3 pieces
    cut at H - wh and H - sh (likewise W), the official code's slices.

    Returns (nH·nW, wh·ww, wh·ww) bool, True = may attend (the official code adds -100 where False). Tokens are
    a window's pixels in row-major order, as `window_partition(...).reshape(-1, wh·ww, C)`; for a batch of B
    images tile it B times along the first axis. shift_size 0 gives all True. Needs 0 <= shift < window.
    """
    wh, ww = window = _window(window_size)
    sh, sw = _pair("shift_size", shift_size, non_negative_int)
    positive_int("height", height)
    positive_int("width", width)
    _check_divisible((None, height, width), window)
    if sh >= wh or sw >= ww:
        raise ValueError(f"shift_size must be smaller than window_size {window}, got {(sh, sw)}")
    rows = np.arange(height)
    cols = np.arange(width)
    region_h = (rows >= height - wh).astype(int) + (rows >= height - sh if sh else 0)
    region_w = (cols >= width - ww).astype(int) + (cols >= width - sw if sw else 0)
    labels = (3 * region_h[:, None] + region_w[None, :])[None, :, :, None]
    windows = labels.reshape(1, height // wh, wh, width // ww, ww).transpose(1, 3, 2, 4, 0).reshape(-1, wh * ww)
    return jnp.asarray(windows[:, :, None] == windows[:, None, :])


def relative_position_index(window_size) -> jax.Array:
    """Swin's relative position index (§3.2, eq. 4; the official `relative_position_index`): for tokens p, q of a
    wh × ww window (row-major), the row of the bias table holding B̂[Δy, Δx], Δ = p - q:

        index[p, q] = (Δy + wh - 1)·(2·ww - 1) + (Δx + ww - 1)  in [0, (2wh - 1)(2ww - 1)).

    Returns (wh·ww, wh·ww) int32."""
    wh, ww = _window(window_size)
    y, x = np.divmod(np.arange(wh * ww), ww)
    index = (y[:, None] - y[None, :] + wh - 1) * (2 * ww - 1) + (x[:, None] - x[None, :] + ww - 1)
    return jnp.asarray(index, jnp.int32)


def relative_position_bias(table: jax.Array, window_size) -> jax.Array:
    """Gather Swin's relative position bias B (eq. 4, Attention = SoftMax(QKᵀ/√d + B)V) from its learned table.

    table: ((2wh - 1)·(2ww - 1), heads). Returns (heads, wh·ww, wh·ww), table's dtype, to add to the scores of
    every window (broadcast over windows and batch)."""
    wh, ww = _window(window_size)
    if table.ndim != 2 or table.shape[0] != (2 * wh - 1) * (2 * ww - 1):
        raise ValueError(f"table must be ((2·{wh} - 1)·(2·{ww} - 1), heads) = ({(2 * wh - 1) * (2 * ww - 1)}, heads), "
                         f"got shape {table.shape}")
    index = relative_position_index((wh, ww))
    return jnp.moveaxis(table[index], -1, 0)


def patch_merging(x: jax.Array) -> jax.Array:
    """Swin's patch merging (§3.1) without its LayerNorm and linear reduction (the layer owns those): concatenate
    each 2 × 2 neighbourhood's features, (B, H, W, C) -> (B, H/2, W/2, 4C), in the official order
    [x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]] (top-left, bottom-left, top-right,
    bottom-right). H and W must be even."""
    _check_image(x)
    _check_divisible(x.shape, (2, 2), "the 2x2 merge")
    return jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)


def num_windows(height: int, width: int, window_size) -> int:
    """nH·nW, the windows per image of `window_partition`."""
    wh, ww = _window(window_size)
    _check_divisible((None, height, width), (wh, ww))
    return math.prod((height // wh, width // ww))
