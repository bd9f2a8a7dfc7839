"""Bipartite matching for set prediction: the Hungarian algorithm and DETR's matching cost.

`linear_sum_assignment` solves the assignment problem (Kuhn 1955, Munkres 1957) with SciPy's
`scipy.optimize.linear_sum_assignment` on the host through `jax.pure_callback`, so it works under `jit` and
`vmap` (a batch of images is solved one cost matrix at a time on the CPU). Padding masks let a batch of images
with unequal numbers of targets share one array shape. The indices it returns are integers: no gradient flows
through the matching, only through the costs of the pairs it chose (as in DETR).
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from jaxmodels.ops.checks import real_in_range


def _solve(cost, row_mask, col_mask, maximize):
    """Host side: cost (..., N, M) float, masks (..., N) / (..., M) bool -> (..., N), (..., M) int32."""
    from scipy.optimize import linear_sum_assignment as scipy_lsa  # imported on first use: ops stays light

    cost = np.asarray(cost, np.float64)
    batch, (n, m) = cost.shape[:-2], cost.shape[-2:]
    col_for_row = np.full(batch + (n,), -1, np.int32)
    row_for_col = np.full(batch + (m,), -1, np.int32)
    for index in np.ndindex(*batch):
        rows, cols = np.flatnonzero(row_mask[index]), np.flatnonzero(col_mask[index])
        if not rows.size or not cols.size:
            continue
        sub = cost[index][np.ix_(rows, cols)]
        finite = np.isfinite(sub)
        if not finite.all():  # +-inf (or NaN under jit): worse than any finite cost, so avoided where possible
            big = (np.abs(sub[finite]).max() if finite.any() else 0.0) * 2 * max(sub.shape) + 1.0
            sub = np.where(finite, sub, -big if maximize else big)
        r, c = scipy_lsa(sub, maximize=maximize)
        col_for_row[index][rows[r]] = cols[c]
        row_for_col[index][cols[c]] = rows[r]
    return col_for_row, row_for_col


def linear_sum_assignment(cost: jax.Array, row_mask: jax.Array | None = None, col_mask: jax.Array | None = None, *,
                          maximize: bool = False) -> tuple[jax.Array, jax.Array]:
    """Minimum-cost bipartite matching (the Hungarian / Kuhn-Munkres algorithm; SciPy's solver on the host).

    For each cost matrix, among the valid rows (`row_mask`) and valid columns (`col_mask`), chooses
    K = min(#rows, #cols) pairs, no row or column twice, with the smallest total cost (largest with `maximize`).

    Args:
      cost: (..., N, M) float, e.g. N predictions × M targets. Leading dims are a batch, solved one by one.
      row_mask: optional (..., N) bool, True = the row takes part (default all).
      col_mask: optional (..., M) bool, True = the column takes part, e.g. False for padded targets of an image
        with fewer than M objects (default all).
      maximize: maximise the total instead.

    Returns:
      (col_for_row, row_for_col): int32 (..., N) and (..., M); col_for_row[..., i] is the column matched to row
      i or -1 if row i is unmatched or masked; row_for_col likewise. N or M = 0 gives all -1 (possibly empty).

    Costs of ±inf (and NaN under `jit`) are replaced by a finite cost worse than any sum of finite ones, so they
    are matched only when unavoidable; concrete NaN costs raise ValueError. jit-, vmap- (the callback is called
    once per batch) and grad-safe (the integer result has no gradient; `cost` is not differentiated).
    """
    if cost.ndim < 2:
        raise ValueError(f"cost must be at least 2-D (..., N, M), got shape {cost.shape}")
    if not jnp.issubdtype(cost.dtype, jnp.floating):
        raise TypeError(f"cost must be floating point, got {cost.dtype}")
    batch, (n, m) = cost.shape[:-2], cost.shape[-2:]
    masks = []
    for name, mask, size in (("row_mask", row_mask, n), ("col_mask", col_mask, m)):
        if mask is None:
            mask = jnp.ones(batch + (size,), bool)
        elif mask.shape != batch + (size,) or mask.dtype != jnp.bool_:
            raise ValueError(f"{name} must be bool with shape {batch + (size,)} (cost {cost.shape}), "
                             f"got {mask.dtype} {mask.shape}")
        masks.append(mask)
    if not isinstance(cost, jax.core.Tracer) and np.isnan(np.asarray(cost)).any():
        raise ValueError("cost must not hold NaN")
    out_shapes = (jax.ShapeDtypeStruct(batch + (n,), jnp.int32), jax.ShapeDtypeStruct(batch + (m,), jnp.int32))
    return jax.pure_callback(lambda c, r, k: _solve(c, r, k, maximize), out_shapes, jax.lax.stop_gradient(cost),
                             *masks, vmap_method="broadcast_all")


def detr_matching_cost(pred_logits: jax.Array, pred_boxes: jax.Array, target_labels: jax.Array,
                       target_boxes: jax.Array, *, class_weight: float = 1.0, bbox_weight: float = 5.0,
                       giou_weight: float = 2.0) -> jax.Array:
    """DETR's pairwise matching cost (Carion et al. 2020, eq. 1 and §3.1; `HungarianMatcher` of the official code):

        C[i, j] = -class_weight · p̂_i(c_j) + bbox_weight · ||b_i - b̂_j||_1 - giou_weight · GIoU(b_i, b̂_j)

    with p̂_i = softmax of prediction i's logits (the "no object" class included, as the last logit in DETR),
    the L1 distance on (cx, cy, w, h) boxes, and GIoU on their corners. Defaults are DETR's (1, 5, 2).

    pred_logits: (..., N, num_classes) float; pred_boxes: (..., N, 4) cxcywh; target_labels: (..., M) int in
    [0, num_classes); target_boxes: (..., M, 4) cxcywh. Returns (..., N, M) float32 (or wider). Use with
    `linear_sum_assignment(cost, col_mask=valid_targets)`.
    """
    if pred_logits.ndim < 2 or pred_boxes.shape != pred_logits.shape[:-1] + (4,):
        raise ValueError(f"pred_logits (..., N, num_classes) and pred_boxes (..., N, 4) must agree, "
                         f"got {pred_logits.shape} and {pred_boxes.shape}")
    if target_boxes.shape != target_labels.shape + (4,) or target_labels.shape[:-1] != pred_logits.shape[:-2]:
        raise ValueError(f"target_labels must be (..., M) and target_boxes (..., M, 4) with the leading dims of "
                         f"pred_logits {pred_logits.shape}, got {target_labels.shape} and {target_boxes.shape}")
    if not jnp.issubdtype(target_labels.dtype, jnp.integer):
        raise TypeError(f"target_labels must be integer class ids, got {target_labels.dtype}")
    weights = [real_in_range(name, w, 0) for name, w in (("class_weight", class_weight),
                                                         ("bbox_weight", bbox_weight), ("giou_weight", giou_weight))]
    dtype = jnp.promote_types(jnp.promote_types(pred_logits.dtype, pred_boxes.dtype), jnp.float32)
    prob = jax.nn.softmax(pred_logits.astype(dtype), axis=-1)
    labels = jnp.broadcast_to(target_labels[..., None, :], prob.shape[:-1] + target_labels.shape[-1:])
    class_cost = -jnp.take_along_axis(prob, labels, axis=-1)
    pred, target = pred_boxes.astype(dtype), target_boxes.astype(dtype)
    l1 = jnp.abs(pred[..., :, None, :] - target[..., None, :, :]).sum(-1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))
    return weights[0] * class_cost + weights[1] * l1 - weights[2] * giou
