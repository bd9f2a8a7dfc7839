"""Axis-aligned box geometry for detection: formats, area, pairwise IoU and GIoU, and Faster R-CNN box coding.

Boxes are float arrays with a last axis of 4: "xyxy" = (x1, y1, x2, y2) corners (x to the right, y down, in
pixels or normalised units, continuous coordinates: a box's width is x2 - x1, no "+1"), or "cxcywh" = (centre x,
centre y, width, height) as DETR predicts them. Functions that need corners take xyxy.

Concrete boxes with x2 < x1 or y2 < y1 (degenerate) raise ValueError naming the argument (`checks.check_boxes`);
traced boxes cannot be checked, and the docstrings say what they give. Zero-size boxes (x2 == x1) are valid.
"""

import math

import jax
import jax.numpy as jnp

from jaxmodels.ops.checks import check_boxes, real_in_range

# Faster R-CNN / torchvision's `BoxCoder` clip on the decoded log-scale (dw, dh): exp(dw) <= 1000 / 16, so a box
# grows at most 62.5x its anchor (Detectron's BBOX_XFORM_CLIP).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _check_shape(name, boxes):
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (..., 4), got shape {boxes.shape}")


def box_cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
    """(cx, cy, w, h) -> (cx - w/2, cy - h/2, cx + w/2, cy + h/2). boxes: (..., 4) float; returns (..., 4), same
    dtype. Negative widths give degenerate corners (not checked here; `check_boxes` checks corners)."""
    _check_shape("boxes", boxes)
    centre, size = boxes[..., :2], boxes[..., 2:]
    return jnp.concatenate([centre - 0.5 * size, centre + 0.5 * size], axis=-1)


def box_xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
    """(x1, y1, x2, y2) -> ((x1 + x2)/2, (y1 + y2)/2, x2 - x1, y2 - y1). boxes: (..., 4) float; returns (..., 4),
    same dtype. Inverse of `box_cxcywh_to_xyxy` (up to rounding)."""
    _check_shape("boxes", boxes)
    low, high = boxes[..., :2], boxes[..., 2:]
    return jnp.concatenate([0.5 * (low + high), high - low], axis=-1)


def box_area(boxes: jax.Array) -> jax.Array:
    """(x2 - x1)·(y2 - y1). boxes: (..., 4) xyxy float; returns (...), same dtype. Concrete degenerate boxes raise
    ValueError; traced ones give a signed (possibly negative) product."""
    check_boxes("boxes", boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _pairwise(boxes1, boxes2):
    check_boxes("boxes1", boxes1)
    check_boxes("boxes2", boxes2)
    if boxes1.shape[:-2] != boxes2.shape[:-2] or boxes1.ndim < 2 or boxes2.ndim < 2:
        raise ValueError(f"boxes1 (..., N, 4) and boxes2 (..., M, 4) must have the same leading dims, "
                         f"got {boxes1.shape} and {boxes2.shape}")
    a, b = boxes1[..., :, None, :], boxes2[..., None, :, :]
    area1, area2 = box_area(boxes1)[..., :, None], box_area(boxes2)[..., None, :]
    wh = jnp.clip(jnp.minimum(a[..., 2:], b[..., 2:]) - jnp.maximum(a[..., :2], b[..., :2]), 0)
    inter = wh[..., 0] * wh[..., 1]
    return a, b, inter, area1 + area2 - inter


def _safe_divide(num, den):
    """num / den where den > 0, else 0, with finite gradients everywhere."""
    positive = den > 0
    return jnp.where(positive, num / jnp.where(positive, den, 1), 0)


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """Pairwise intersection over union |A ∩ B| / |A ∪ B|.

    boxes1: (..., N, 4), boxes2: (..., M, 4) xyxy float with equal leading dims. Returns (..., N, M), the dtype of
    the inputs, in [0, 1]. N = 0 or M = 0 gives an empty (..., 0, M) / (..., N, 0) array. A pair whose union is 0
    (two zero-area boxes) has IoU 0 (torchvision's `box_iou` gives NaN there), with finite gradients.
    """
    _, _, inter, union = _pairwise(boxes1, boxes2)
    return _safe_divide(inter, union)


def generalized_box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """Pairwise generalised IoU (Rezatofighi et al. 2019, "Generalized Intersection over Union", Algorithm 1):
    GIoU = IoU - |C \\ (A ∪ B)| / |C|, C the smallest box enclosing A and B; in [-1, 1], and 1 - GIoU is DETR's box
    loss (Carion et al. 2020, eq. 2 and appendix A.2).

    boxes1: (..., N, 4), boxes2: (..., M, 4) xyxy float with equal leading dims. Returns (..., N, M), input dtype;
    empty for N = 0 or M = 0. Where |C| = 0 (both boxes the same point) the penalty is 0 and GIoU = IoU = 0.
    """
    a, b, inter, union = _pairwise(boxes1, boxes2)
    wh = jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2])
    enclosing = wh[..., 0] * wh[..., 1]
    return _safe_divide(inter, union) - _safe_divide(enclosing - union, enclosing)


def _check_weights(weights):
    if len(weights) != 4:
        raise ValueError(f"weights must be 4 numbers (wx, wy, ww, wh), got {weights!r}")
    return [real_in_range(f"weights[{i}]", w, 0, include_low=False) for i, w in enumerate(weights)]


def encode_boxes(boxes: jax.Array, anchors: jax.Array, weights=(1.0, 1.0, 1.0, 1.0)) -> jax.Array:
    """Faster R-CNN box regression targets (Ren et al. 2015, eq. 2; Girshick et al. 2014, R-CNN appendix C) of
    `boxes` relative to `anchors` (proposals), as torchvision's `BoxCoder.encode_single`:

        dx = wx·(x - x_a)/w_a,  dy = wy·(y - y_a)/h_a,  dw = ww·log(w/w_a),  dh = wh·log(h/h_a)

    with (x, y, w, h) the centre and size of a box (w = x2 - x1, no "+1"). Fast/Faster R-CNN's second stage uses
    weights (10, 10, 5, 5), the RPN (1, 1, 1, 1).

    boxes, anchors: (..., 4) xyxy float, broadcastable; weights: 4 positive numbers. Returns deltas (..., 4) =
    (dx, dy, dw, dh). Concrete boxes or anchors of zero or negative width or height raise ValueError (the log and
    the division need positive sizes); traced ones give inf / NaN there.
    """
    check_boxes("boxes", boxes, positive=True)
    check_boxes("anchors", anchors, positive=True)
    wx, wy, ww, wh = _check_weights(weights)
    b, a = box_xyxy_to_cxcywh(boxes), box_xyxy_to_cxcywh(anchors)
    return jnp.stack([wx * (b[..., 0] - a[..., 0]) / a[..., 2], wy * (b[..., 1] - a[..., 1]) / a[..., 3],
                      ww * jnp.log(b[..., 2] / a[..., 2]), wh * jnp.log(b[..., 3] / a[..., 3])], axis=-1)


def decode_boxes(deltas: jax.Array, anchors: jax.Array, weights=(1.0, 1.0, 1.0, 1.0), *,
                 clip: float = BBOX_XFORM_CLIP) -> jax.Array:
    """Inverse of `encode_boxes` (torchvision's `BoxCoder.decode_single`): boxes from regression `deltas` =
    (dx, dy, dw, dh) applied to `anchors`:

        x = x_a + w_a·dx/wx,  y = y_a + h_a·dy/wy,  w = w_a·exp(min(dw/ww, clip)),  h = h_a·exp(min(dh/wh, clip))

    The clip (default `BBOX_XFORM_CLIP` = log(1000/16)) keeps exp from overflowing on wild predictions; below it
    decode ∘ encode is the identity. deltas, anchors: (..., 4) float, broadcastable (anchors xyxy). Returns
    (..., 4) xyxy boxes in the promoted dtype. Concrete degenerate anchors (x2 < x1) raise ValueError.
    """
    _check_shape("deltas", deltas)
    check_boxes("anchors", anchors)
    wx, wy, ww, wh = _check_weights(weights)
    clip = real_in_range("clip", clip)
    a = box_xyxy_to_cxcywh(anchors)
    cx = a[..., 0] + a[..., 2] * deltas[..., 0] / wx
    cy = a[..., 1] + a[..., 3] * deltas[..., 1] / wy
    w = a[..., 2] * jnp.exp(jnp.minimum(deltas[..., 2] / ww, clip))
    h = a[..., 3] * jnp.exp(jnp.minimum(deltas[..., 3] / wh, clip))
    return box_cxcywh_to_xyxy(jnp.stack([cx, cy, w, h], axis=-1))


def clip_boxes_to_image(boxes: jax.Array, height: int, width: int) -> jax.Array:
    """Clamp xyxy boxes (..., 4) into the image [0, width] × [0, height] (torchvision's `clip_boxes_to_image`).
    Returns (..., 4), same dtype."""
    _check_shape("boxes", boxes)
    bound = jnp.asarray([width, height, width, height], boxes.dtype)
    return jnp.clip(boxes, 0, bound)
