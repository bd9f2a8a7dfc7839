"""Region-of-interest feature extraction for two-stage detectors: RoI pooling and RoIAlign.

Both take a channels-last feature map (B, H, W, C), K boxes in input-image coordinates (x1, y1, x2, y2) with the
image of each box (`batch_indices`), and return (K, ph, pw, C): one fixed-size feature per box. `spatial_scale`
maps image coordinates onto the feature map (1/16 for a stride-16 backbone). The semantics, rounding and border
rules are torchvision's (`torchvision.ops.roi_pool` / `roi_align`, themselves Detectron's), so results agree with
it to float rounding; tests/ops/test_roi.py checks both against torchvision's outputs and gradients.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.ops.checks import check_boxes, concrete, positive_int, real_in_range, values_in_range


def _output_size(output_size):
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(size) != 2:
        raise ValueError(f"output_size must be an int or (height, width), got {output_size!r}")
    return tuple(positive_int(f"output_size[{i}]", s) for i, s in enumerate(size))


def _check_inputs(features, boxes, batch_indices):
    if features.ndim != 4:
        raise ValueError(f"features must be 4-D (batch, height, width, channels), got shape {features.shape}")
    if not jnp.issubdtype(features.dtype, jnp.floating):
        raise TypeError(f"features must be floating point, got {features.dtype}")
    check_boxes("boxes", boxes)
    if boxes.ndim != 2 or batch_indices.shape != boxes.shape[:1]:
        raise ValueError(f"boxes must be (K, 4) and batch_indices (K,), got {boxes.shape} and {batch_indices.shape}")
    if not jnp.issubdtype(batch_indices.dtype, jnp.integer):
        raise TypeError(f"batch_indices must be integer, got {batch_indices.dtype}")
    values_in_range("batch_indices", batch_indices, 0, features.shape[0])


def _align_axis(start, length, size, bins, grid, max_grid):
    """Sample indices and weights along one axis of RoIAlign: start, length (K,) in feature pixels; size = H or W;
    grid (K,) samples per bin (traced int), max_grid its static bound. Returns int32 indices (K, bins, 2·max_grid)
    and weights (K, bins, 2·max_grid) that already hold the 1/grid average, the grid mask and the border rule."""
    bin_size = length / bins
    p = jnp.arange(bins, dtype=start.dtype)[None, :, None]
    g = jnp.arange(max_grid, dtype=start.dtype)[None, None, :]
    gridf = grid.astype(start.dtype)[:, None, None]
    y = start[:, None, None] + p * bin_size[:, None, None] + (g + 0.5) * bin_size[:, None, None] / jnp.maximum(gridf, 1)
    inside = (y >= -1.0) & (y <= size) & (g < gridf)           # torchvision: y < -1 or y > size -> 0
    y = jnp.maximum(y, 0)
    low = jnp.floor(y)
    at_edge = low >= size - 1
    low = jnp.where(at_edge, size - 1, low)
    y = jnp.where(at_edge, low, y)
    frac = y - low
    weight = jnp.where(inside, 1.0 / jnp.maximum(gridf, 1), 0.0)
    low = low.astype(jnp.int32)
    high = jnp.minimum(low + 1, size - 1)
    index = jnp.concatenate([low, high], axis=-1)
    weights = jnp.concatenate([weight * (1 - frac), weight * frac], axis=-1)
    return index, weights


def roi_align(features: jax.Array, boxes: jax.Array, batch_indices: jax.Array, output_size, *,
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
              max_sampling_ratio: int | None = None) -> jax.Array:
    """RoIAlign (He et al. 2017, Mask R-CNN §3): each box is split into ph × pw bins without quantisation; a bin's
    value is the mean of a regular grid of bilinearly interpolated samples, as torchvision's `roi_align`.

    A box (x1, y1, x2, y2) becomes x1·spatial_scale - o ... on the feature map, o = 0.5 with `aligned` (pixel
    centres at integer + 0.5, Detectron2's correction) else 0, where sizes are also clamped to >= 1. Each bin has
    gh × gw samples at (i + 0.5)/gh of the bin (likewise in x): gh = `sampling_ratio` if > 0, else adaptive,
    ceil(box height / ph) per box (torchvision's -1 / 0). Bilinear interpolation reads the four neighbouring
    pixels, clamping to the border; a sample further than one pixel outside the map is 0.

    Args:
      features: (B, H, W, C) float.
      boxes: (K, 4) float (x1, y1, x2, y2) in image coordinates; concrete degenerate boxes raise ValueError.
      batch_indices: (K,) int in [0, B), the image of each box (concrete values out of range raise ValueError;
        traced ones are clamped by the gather).
      output_size: int or (ph, pw).
      spatial_scale: feature-map size / image size, e.g. 1/16.
      sampling_ratio: samples per bin along each axis; <= 0 for adaptive.
      aligned: shift by half a pixel (see above).
      max_sampling_ratio: static bound on the adaptive grid. Default: exact when `boxes` is concrete; under
        `jit` ceil(H / ph) × ceil(W / pw), exact for every box inside the feature map (a larger box is averaged
        over that many samples per bin instead of torchvision's more).

    Returns:
      (K, ph, pw, C) in features' dtype (arithmetic in the promoted dtype of features and boxes).
    Differentiable in features and boxes (torchvision gives no box gradient).
    """
    _check_inputs(features, boxes, batch_indices)
    ph, pw = _output_size(output_size)
    spatial_scale = real_in_range("spatial_scale", spatial_scale, 0, include_low=False)
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise TypeError(f"sampling_ratio must be an int (<= 0 for adaptive), got {sampling_ratio!r}")
    positive_int("max_sampling_ratio", max_sampling_ratio, allow_none=True)
    _, height, width, _ = features.shape
    dtype = jnp.promote_types(features.dtype, boxes.dtype)
    offset = 0.5 if aligned else 0.0
    b = boxes.astype(dtype) * spatial_scale - offset
    x1, y1, roi_w, roi_h = b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    if not aligned:
        roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
    if sampling_ratio > 0:
        grid_h = grid_w = jnp.full(boxes.shape[:1], sampling_ratio, jnp.int32)
        max_h = max_w = sampling_ratio
    else:
        grid_h = jnp.ceil(roi_h / ph).astype(jnp.int32)
        grid_w = jnp.ceil(roi_w / pw).astype(jnp.int32)
        values = concrete(boxes)
        if max_sampling_ratio is not None:
            max_h = max_w = max_sampling_ratio
        elif values is not None:  # exact bound (+1 against rounding differences; extra samples are masked)
            v = values.astype(np.float64) * spatial_scale - offset
            sizes = np.maximum(v[:, 2:] - v[:, :2], 0 if aligned else 1)
            max_w, max_h = (int(np.ceil(sizes[:, i] / s).max(initial=0)) + 1 for i, s in ((0, pw), (1, ph)))
        else:
            max_h, max_w = math.ceil(height / ph), math.ceil(width / pw)
        grid_h, grid_w = jnp.minimum(grid_h, max_h), jnp.minimum(grid_w, max_w)
    iy, wy = _align_axis(y1, roi_h, height, ph, grid_h, max(max_h, 1))
    ix, wx = _align_axis(x1, roi_w, width, pw, grid_w, max(max_w, 1))
    k = batch_indices[:, None, None, None, None]
    values = features[k, iy[:, :, :, None, None], ix[:, None, None, :, :]].astype(dtype)  # (K, ph, Sy, pw, Sx, C)
    out = jnp.einsum("kps,kqt,kpsqtc->kpqc", wy, wx, values, precision=jax.lax.Precision.HIGHEST)
    return out.astype(features.dtype)


def _round_half_away(x):
    """C's round(): halves away from zero (jnp.round rounds them to even)."""
    return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def _pool_bins(start, end, size, bins, dtype):
    """Integer bin bounds [lo, hi) of RoI pooling along one axis, clipped to [0, size]: (K, bins) each."""
    length = jnp.maximum(end - start + 1, 1).astype(dtype)
    bin_size = length / bins
    p = jnp.arange(bins, dtype=dtype)[None, :]
    lo = jnp.floor(p * bin_size[:, None]).astype(jnp.int32) + start[:, None]
    hi = jnp.ceil((p + 1) * bin_size[:, None]).astype(jnp.int32) + start[:, None]
    return jnp.clip(lo, 0, size), jnp.clip(hi, 0, size)


def roi_pool(features: jax.Array, boxes: jax.Array, batch_indices: jax.Array, output_size, *,
             spatial_scale: float = 1.0, max_bin_size: int | None = None) -> jax.Array:
    """RoI max pooling (Girshick 2015, Fast R-CNN §2.1), as torchvision's `roi_pool`: each box is quantised to the
    feature grid, x1' = round(x1·spatial_scale) (halves away from zero), width = max(x2' - x1' + 1, 1) pixels (the
    end pixel included), split into ph × pw bins [floor(i·width/pw), ceil((i+1)·width/pw)) clipped to the map;
    each output is the maximum over its bin, 0 for an empty bin.

    Args:
      features: (B, H, W, C) float.
      boxes: (K, 4) float (x1, y1, x2, y2) in image coordinates; concrete degenerate boxes raise ValueError.
      batch_indices: (K,) int in [0, B), the image of each box.
      output_size: int or (ph, pw).
      spatial_scale: feature-map size / image size.
      max_bin_size: static bound on a bin's extent in pixels; default exact (from concrete boxes, else H and W,
        which is exact too but gathers more).

    Returns:
      (K, ph, pw, C) in features' dtype. The gradient goes to each bin's maximum (a tie, unlike torchvision's
      first-index rule, shares it); boxes get none (the quantisation is piecewise constant).
    """
    _check_inputs(features, boxes, batch_indices)
    ph, pw = _output_size(output_size)
    spatial_scale = real_in_range("spatial_scale", spatial_scale, 0, include_low=False)
    positive_int("max_bin_size", max_bin_size, allow_none=True)
    _, height, width, _ = features.shape
    dtype = boxes.dtype
    q = _round_half_away(jax.lax.stop_gradient(boxes) * jnp.asarray(spatial_scale, dtype)).astype(jnp.int32)
    h_lo, h_hi = _pool_bins(q[:, 1], q[:, 3], height, ph, dtype)
    w_lo, w_hi = _pool_bins(q[:, 0], q[:, 2], width, pw, dtype)
    if max_bin_size is not None:
        extent_h = extent_w = max_bin_size
    elif concrete(boxes) is not None:
        extent_h = max(int(np.max(np.asarray(h_hi - h_lo), initial=0)), 1)
        extent_w = max(int(np.max(np.asarray(w_hi - w_lo), initial=0)), 1)
    else:
        extent_h, extent_w = height, width
    t_h, t_w = jnp.arange(extent_h, dtype=jnp.int32), jnp.arange(extent_w, dtype=jnp.int32)
    # Rows first: (K, ph, extent_h, W, C) -> max over the bin's rows -> (K, ph, W, C).
    rows = h_lo[..., None] + t_h
    valid = (rows < h_hi[..., None])[..., None, None]
    values = features[batch_indices[:, None, None], jnp.minimum(rows, height - 1)]
    row_max = jnp.max(jnp.where(valid, values, -jnp.inf), axis=2)
    # Then columns: (K, ph, pw, extent_w, C) -> (K, ph, pw, C).
    cols = w_lo[..., None] + t_w
    valid = (cols < w_hi[..., None])[:, None, :, :, None]
    k = jnp.arange(boxes.shape[0])[:, None, None, None]
    values = row_max[k, jnp.arange(ph)[None, :, None, None], jnp.minimum(cols, width - 1)[:, None]]
    out = jnp.max(jnp.where(valid, values, -jnp.inf), axis=3)
    empty = (h_hi <= h_lo)[:, :, None, None] | (w_hi <= w_lo)[:, None, :, None]
    return jnp.where(empty, 0, out).astype(features.dtype)
