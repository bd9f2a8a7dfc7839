"""Loss functions as pure functions on arrays (and the mask IoU that Segment Anything regresses)."""

import math

import jax
import jax.numpy as jnp

from jaxmodels.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from jaxmodels.ops.checks import positive_int, real_in_range
from jaxmodels.ops.matching import detr_matching_cost, linear_sum_assignment


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cross entropy -log softmax(logits)[label], in float32 for any input dtype.

    logits: (..., num_classes) float; labels: (...) int in [0, num_classes). Returns (...) float32 nats.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {logits.shape} must be labels {labels.shape} + (num_classes,)")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class ids, got {labels.dtype}")
    logits = logits.astype(jnp.float32)
    label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - label_logits


def info_nce(scores: jax.Array) -> jax.Array:
    """InfoNCE with in-batch negatives (van den Oord et al. 2018, CPC, eq. 4): row i scores N candidates of which
    the one on the diagonal is the positive, so L_N = mean_i [logsumexp_j scores[i, j] - scores[i, i]].

    log N - L_N is the lower bound on the mutual information I(x; c) (eq. 5, §2.3), tight only as N grows; it
    is at most log N. `scores[i, j]` is log f_k(x_j, c_i), e.g. z_j^T W_k c_i (eq. 3).

    scores: (N, N) float. Returns the loss, a float32 scalar in nats (>= 0).
    """
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be a square (N, N) matrix with positives on the diagonal, got {scores.shape}")
    return jnp.mean(softmax_cross_entropy(scores, jnp.arange(scores.shape[0])))


def info_nce_with_negatives(positive_scores: jax.Array, negative_scores: jax.Array) -> jax.Array:
    """InfoNCE with explicit negatives (van den Oord et al. 2018, CPC, eq. 4), e.g. drawn from other time steps
    (cross-time) or other sequences: each positive competes with its own K negatives, N = K + 1 candidates,
    L_N = mean [logsumexp(positive, negatives) - positive]; log N - L_N <= I(x; c) (eq. 5, §2.3).

    positive_scores: (...) float; negative_scores: (..., K) float, K >= 1. Returns a float32 scalar in nats.
    """
    if negative_scores.shape[:-1] != positive_scores.shape or negative_scores.ndim < 1 or not negative_scores.shape[-1]:
        raise ValueError(f"negative_scores must be positive_scores {positive_scores.shape} + (K,) with K >= 1, "
                         f"got {negative_scores.shape}")
    scores = jnp.concatenate([positive_scores[..., None], negative_scores], axis=-1)
    return jnp.mean(softmax_cross_entropy(scores, jnp.zeros(positive_scores.shape, jnp.int32)))


def cosine_logits(embeddings: jax.Array, class_weights: jax.Array, *, eps: float = 1e-12) -> jax.Array:
    """Cosine similarity of L2-normalised embeddings and class centres, the input of the margin losses below:
    cos θ_j = x·W_j / (|x| |W_j|) (Wang et al. 2018, NormFace / CosFace §3.1; Deng et al. 2019, ArcFace §2.1).

    embeddings: (..., D) float; class_weights: (D, num_classes) float. Returns (..., num_classes) in [-1, 1], in
    float32 or wider. A zero vector (norm below `eps`) gives cosines 0.
    """
    if embeddings.ndim < 1 or class_weights.ndim != 2 or class_weights.shape[0] != embeddings.shape[-1]:
        raise ValueError(f"embeddings (..., D) and class_weights (D, num_classes) must agree in D, "
                         f"got {embeddings.shape} and {class_weights.shape}")
    dtype = jnp.promote_types(jnp.promote_types(embeddings.dtype, class_weights.dtype), jnp.float32)
    x, w = embeddings.astype(dtype), class_weights.astype(dtype)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    w = w / jnp.maximum(jnp.linalg.norm(w, axis=0, keepdims=True), eps)
    return jnp.clip(jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST), -1.0, 1.0)


def _check_margin_inputs(cosine, labels):
    if cosine.ndim < 1 or cosine.shape[:-1] != labels.shape:
        raise ValueError(f"cosine {cosine.shape} must be labels {labels.shape} + (num_classes,)")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class ids, got {labels.dtype}")
    if not jnp.issubdtype(cosine.dtype, jnp.floating):
        raise TypeError(f"cosine must be floating point, got {cosine.dtype}")
    return cosine.astype(jnp.promote_types(cosine.dtype, jnp.float32))


def arcface_logits(cosine: jax.Array, labels: jax.Array, *, scale: float = 64.0, margin: float = 0.5,
                   easy_margin: bool = False) -> jax.Array:
    """ArcFace logits (Deng et al. 2019, "Additive Angular Margin Loss", eq. 3): the target class's angle is
    increased by the margin m, every logit scaled by s,

        logit_y = s·cos(θ_y + m),  logit_j = s·cos θ_j (j ≠ y),

    to be fed to `softmax_cross_entropy`. cos(θ + m) = cos θ cos m - sin θ sin m is not monotone in θ beyond
    θ = π - m; as the official code, for cos θ <= cos(π - m) the target logit is instead s·(cos θ - m·sin m)
    (CosFace-like, keeps it decreasing in θ), or with `easy_margin` the margin is applied only where cos θ > 0
    (logit s·cos θ elsewhere). margin = 0 gives scaled cosine logits s·cos θ.

    cosine: (..., num_classes) in [-1, 1] (e.g. `cosine_logits`; clipped here); labels: (...) int in
    [0, num_classes). Returns (..., num_classes) float32 (or float64 for float64 input). Gradients stay finite at
    cos θ = ±1.
    """
    cosine = jnp.clip(_check_margin_inputs(cosine, labels), -1.0, 1.0)
    scale = real_in_range("scale", scale, 0, include_low=False)
    margin = real_in_range("margin", margin, 0, math.pi / 2)
    target = jax.nn.one_hot(labels, cosine.shape[-1], dtype=bool)
    sin_squared = 1.0 - jnp.square(cosine)
    positive = sin_squared > 0
    sine = jnp.where(positive, jnp.sqrt(jnp.where(positive, sin_squared, 1.0)), 0.0)
    phi = cosine * math.cos(margin) - sine * math.sin(margin)
    if easy_margin:
        phi = jnp.where(cosine > 0, phi, cosine)
    else:
        phi = jnp.where(cosine > math.cos(math.pi - margin), phi, cosine - math.sin(math.pi - margin) * margin)
    return scale * jnp.where(target, phi, cosine)


def cosface_logits(cosine: jax.Array, labels: jax.Array, *, scale: float = 64.0, margin: float = 0.35) -> jax.Array:
    """CosFace / large margin cosine logits (Wang et al. 2018, eq. 4): logit_y = s·(cos θ_y - m) for the target
    class, s·cos θ_j otherwise; feed to `softmax_cross_entropy`. The paper's face setting is s = 64, m = 0.35;
    margin = 0 gives scaled cosine logits.

    cosine: (..., num_classes); labels: (...) int in [0, num_classes). Returns (..., num_classes) float32 (or
    float64 for float64 input).
    """
    cosine = _check_margin_inputs(cosine, labels)
    scale = real_in_range("scale", scale, 0, include_low=False)
    margin = real_in_range("margin", margin, 0)
    return scale * (cosine - margin * jax.nn.one_hot(labels, cosine.shape[-1], dtype=cosine.dtype))


def _check_mask_pair(logits, targets, names=("logits", "targets")):
    if logits.shape != targets.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {logits.shape} and "
                         f"{targets.shape}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"{names[0]} must be floating point, got {logits.dtype}")


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, *, alpha: float | None = 0.25,
                       gamma: float = 2.0) -> jax.Array:
    """Focal loss of independent binary predictions (Lin et al. 2017, "Focal Loss for Dense Object Detection",
    eq. 5; torchvision's `sigmoid_focal_loss` with reduction="none"), element by element:

        FL = -α_t (1 - p_t)^γ log p_t,  p = sigmoid(logits), p_t = p where the target is 1 and 1 - p where it is 0,
        α_t = α for targets 1 and 1 - α for targets 0 (alpha=None: α_t = 1).

    For soft targets t in [0, 1], log p_t is replaced by -BCE(logits, t) and p_t = p·t + (1 - p)(1 - t), as
    torchvision. Segment Anything's mask loss is 20·FL + dice (`dice_loss`; Kirillov et al. 2023, §3).
    logits, targets: the same shape (...), targets in [0, 1]. Returns (...) float32 (float64 for float64 logits).
    gamma = 0 and alpha=None give the binary cross entropy.
    """
    _check_mask_pair(logits, targets)
    gamma = real_in_range("gamma", gamma, 0)
    if alpha is not None:
        alpha = real_in_range("alpha", alpha, 0, 1)
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    x, t = logits.astype(dtype), targets.astype(dtype)
    # BCE with logits, stable: max(x, 0) - x t + log(1 + exp(-|x|))
    ce = jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
    p = jax.nn.sigmoid(x)
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma if gamma else ce
    if alpha is not None:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss


def dice_loss(logits: jax.Array, targets: jax.Array, *, num_mask_dims: int = 2, smooth: float = 1.0) -> jax.Array:
    """Soft Dice loss of a mask (Milletari et al. 2016, V-Net, eq. 1; DETR's and Segment Anything's mask loss
    with +1 smoothing), per mask over its last `num_mask_dims` axes:

        1 - (2 Σ p·t + smooth) / (Σ p + Σ t + smooth),  p = sigmoid(logits).

    logits, targets: the same shape (..., *mask_shape), targets in [0, 1]. Returns (...) float32 (float64 for
    float64 logits), in [0, 1).
    """
    _check_mask_pair(logits, targets)
    positive_int("num_mask_dims", num_mask_dims)
    if num_mask_dims > logits.ndim:
        raise ValueError(f"num_mask_dims={num_mask_dims} exceeds the rank of logits {logits.shape}")
    smooth = real_in_range("smooth", smooth, 0, include_low=False)
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    p, t = jax.nn.sigmoid(logits.astype(dtype)), targets.astype(dtype)
    axes = tuple(range(-num_mask_dims, 0))
    return 1 - (2 * jnp.sum(p * t, axes) + smooth) / (jnp.sum(p, axes) + jnp.sum(t, axes) + smooth)


def mask_iou(masks: jax.Array, targets: jax.Array, *, num_mask_dims: int = 2) -> jax.Array:
    """Intersection over union of binary masks (the Jaccard index), per mask over its last `num_mask_dims` axes:
    |m ∧ t| / |m ∨ t|, and 1 where both masks are empty (identical). The target of Segment Anything's IoU
    prediction head and its mIoU metric (Kirillov et al. 2023, §3, §7.1).

    masks, targets: the same shape (..., *mask_shape), bool or {0, 1} numbers (a number counts as set when > 0.5;
    threshold logits at 0 first). Returns (...) float32. No gradient (a count).
    """
    if masks.shape != targets.shape:
        raise ValueError(f"masks and targets must have the same shape, got {masks.shape} and {targets.shape}")
    positive_int("num_mask_dims", num_mask_dims)
    if num_mask_dims > masks.ndim:
        raise ValueError(f"num_mask_dims={num_mask_dims} exceeds the rank of masks {masks.shape}")
    m = masks if masks.dtype == jnp.bool_ else masks > 0.5
    t = targets if targets.dtype == jnp.bool_ else targets > 0.5
    axes = tuple(range(-num_mask_dims, 0))
    inter = jnp.sum(m & t, axes, dtype=jnp.float32)
    union = jnp.sum(m | t, axes, dtype=jnp.float32)
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


def detr_set_loss(pred_logits: jax.Array, pred_boxes: jax.Array, target_labels: jax.Array, target_boxes: jax.Array,
                  target_valid: jax.Array, *, eos_coef: float = 0.1, class_weight: float = 1.0,
                  bbox_weight: float = 5.0, giou_weight: float = 2.0,
                  col_for_row: jax.Array | None = None) -> dict[str, jax.Array]:
    """DETR's set prediction loss (Carion et al. 2020, §3.1, eq. 1-2; `SetCriterion` of the official code with
    the labels and boxes losses) of one decoder output, after Hungarian matching per image.

    Matching: σ̂ = argmin_σ Σ_j C[σ(j), j] over injective maps of each image's valid targets into its
    predictions, C = `detr_matching_cost` with the same weights (`linear_sum_assignment`, SciPy on the host; no
    gradient flows through it), unless `col_for_row` is given. Then, with B the batch and num_boxes = max(Σ valid, 1)
    the targets of the whole batch:

        loss_ce   = Σ_i w_i CE(logits_i, c_i) / Σ_i w_i  over all B·N predictions, c_i the matched target's
                    class or "no object" (the last logit, index C) for unmatched predictions, w_i = eos_coef for
                    no object and 1 otherwise (PyTorch's weighted mean, as DETR's `empty_weight`)
        loss_bbox = Σ_matched ||b_i - b̂_σ(i)||_1 / num_boxes   (cxcywh)
        loss_giou = Σ_matched (1 - GIoU(b_i, b̂_σ(i))) / num_boxes
        loss      = class_weight·loss_ce + bbox_weight·loss_bbox + giou_weight·loss_giou

    Defaults are DETR's (eos_coef 0.1; weights 1, 5, 2).

    pred_logits: (B, N, C + 1) float; pred_boxes: (B, N, 4) cxcywh (DETR: sigmoid outputs in [0, 1]);
    target_labels: (B, M) int in [0, C); target_boxes: (B, M, 4) cxcywh; target_valid: (B, M) bool (padding
    False); col_for_row: optional (B, N) int32 matching (target index per prediction, -1 unmatched).
    Returns {"loss", "loss_ce", "loss_bbox", "loss_giou": float32 scalars (float64 for float64 predictions),
    "col_for_row": (B, N) int32}.
    """
    if pred_logits.ndim != 3 or pred_boxes.shape != pred_logits.shape[:2] + (4,) or pred_logits.shape[-1] < 2:
        raise ValueError(f"pred_logits must be (B, N, C + 1) with C >= 1 and pred_boxes (B, N, 4), got "
                         f"{pred_logits.shape} and {pred_boxes.shape}")
    b, n = pred_boxes.shape[:2]
    if (target_labels.ndim != 2 or target_labels.shape[0] != b or target_boxes.shape != target_labels.shape + (4,)
            or target_valid.shape != target_labels.shape):
        raise ValueError(f"target_labels (B, M), target_boxes (B, M, 4) and target_valid (B, M) must agree with "
                         f"B = {b}, got {target_labels.shape}, {target_boxes.shape} and {target_valid.shape}")
    if target_valid.dtype != jnp.bool_:
        raise TypeError(f"target_valid must be bool, got {target_valid.dtype}")
    eos_coef = real_in_range("eos_coef", eos_coef, 0)
    class_weight, bbox_weight, giou_weight = (real_in_range(name, w, 0) for name, w in (
        ("class_weight", class_weight), ("bbox_weight", bbox_weight), ("giou_weight", giou_weight)))
    no_object = pred_logits.shape[-1] - 1
    if col_for_row is None:
        cost = detr_matching_cost(pred_logits, pred_boxes, target_labels, target_boxes, class_weight=class_weight,
                                  bbox_weight=bbox_weight, giou_weight=giou_weight)
        col_for_row, _ = linear_sum_assignment(cost, col_mask=target_valid)
    elif col_for_row.shape != (b, n):
        raise ValueError(f"col_for_row must be (B, N) = {(b, n)}, got {col_for_row.shape}")
    matched = col_for_row >= 0
    index = jnp.maximum(col_for_row, 0)
    classes = jnp.where(matched, jnp.take_along_axis(target_labels, index, axis=1), no_object)
    weights = jnp.where(matched, 1.0, eos_coef)
    dtype = jnp.promote_types(jnp.promote_types(pred_logits.dtype, pred_boxes.dtype), jnp.float32)
    log_p = jax.nn.log_softmax(pred_logits.astype(dtype), axis=-1)
    ce = -jnp.take_along_axis(log_p, classes[..., None], axis=-1)[..., 0]
    loss_ce = jnp.sum(weights * ce) / jnp.sum(weights)
    num_boxes = jnp.maximum(jnp.sum(target_valid), 1).astype(dtype)
    pred = pred_boxes.astype(dtype)
    target = jnp.take_along_axis(target_boxes.astype(dtype), index[..., None], axis=1)  # (B, N, 4)
    l1 = jnp.sum(jnp.abs(pred - target), axis=-1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pred)[..., None, :], box_cxcywh_to_xyxy(target)[..., None, :])
    loss_bbox = jnp.sum(jnp.where(matched, l1, 0.0)) / num_boxes
    loss_giou = jnp.sum(jnp.where(matched, 1.0 - giou[..., 0, 0], 0.0)) / num_boxes
    loss = class_weight * loss_ce + bbox_weight * loss_bbox + giou_weight * loss_giou
    return {"loss": loss, "loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou,
            "col_for_row": col_for_row}
