import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmodels.ops.losses import (
    arcface_logits,
    cosface_logits,
    cosine_logits,
    detr_set_loss,
    info_nce,
    info_nce_with_negatives,
    softmax_cross_entropy,
)


def _reference(logits, labels):
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, labels[..., None], -1)[..., 0]


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 11), (1, 256)])
def test_matches_float64_reference_and_gradient(shape):
    rng = np.random.default_rng(sum(shape))
    logits = rng.normal(size=shape).astype(np.float32) * 4
    labels = rng.integers(0, shape[-1], size=shape[:-1])
    out = softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _reference(logits, labels), rtol=1e-5, atol=1e-5)
    # d/dlogits of sum CE = softmax - onehot
    g = jax.grad(lambda z: softmax_cross_entropy(z, jnp.asarray(labels)).sum())(jnp.asarray(logits))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(g, p - np.eye(shape[-1])[labels], atol=1e-5)


def test_bfloat16_logits_computed_in_float32():
    logits = jax.random.normal(jax.random.key(0), (4, 300)).astype(jnp.bfloat16) * 10
    labels = jnp.arange(4)
    out = softmax_cross_entropy(logits, labels)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _reference(np.asarray(logits.astype(jnp.float32)), np.arange(4)), rtol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="labels"):
        softmax_cross_entropy(jnp.zeros((3, 4)), jnp.zeros((4,), jnp.int32))
    with pytest.raises(TypeError, match="integer"):
        softmax_cross_entropy(jnp.zeros((3, 4)), jnp.zeros((3,)))


def _info_nce_reference(positive, negatives):
    """Float64 NumPy InfoNCE (van den Oord et al. 2018, eq. 4): mean of -log(exp(f+) / sum of exp over candidates)."""
    candidates = np.concatenate([positive[..., None], negatives], -1).astype(np.float64)
    return np.mean(np.log(np.exp(candidates).sum(-1)) - positive)


@pytest.mark.parametrize("n", [1, 9])
def test_info_nce_in_batch_matches_float64_formula_and_gradient(n):
    scores = np.random.default_rng(n).normal(size=(n, n)).astype(np.float32) * 3
    off_diagonal = scores[~np.eye(n, dtype=bool)].reshape(n, n - 1)
    loss = info_nce(jnp.asarray(scores))
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, _info_nce_reference(np.diag(scores), off_diagonal), rtol=1e-5)
    p = np.exp(scores - scores.max(1, keepdims=True))
    np.testing.assert_allclose(jax.grad(info_nce)(jnp.asarray(scores)), (p / p.sum(1, keepdims=True) - np.eye(n)) / n,
                               atol=1e-6)
    assert np.log(n) - loss <= np.log(n)  # the mutual-information bound log N - L never exceeds log N


def test_info_nce_bound_ends():
    """Uninformative scores give L = log N (bound 0); well-separated positives give L -> 0 (bound -> log N)."""
    n = 8
    np.testing.assert_allclose(info_nce(jnp.zeros((n, n))), np.log(n), rtol=1e-6)
    np.testing.assert_allclose(np.log(n) - info_nce(30 * jnp.eye(n)), np.log(n), atol=1e-6)


@pytest.mark.parametrize("shape,k", [((5,), 1), ((2, 3), 7)])
def test_info_nce_with_negatives_matches_float64_formula(shape, k):
    rng = np.random.default_rng(k)
    positive, negatives = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape + (k,)).astype(np.float32)
    loss = info_nce_with_negatives(jnp.asarray(positive), jnp.asarray(negatives))
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, _info_nce_reference(positive, negatives), rtol=1e-5)
    grad_positive = jax.grad(info_nce_with_negatives)(jnp.asarray(positive), jnp.asarray(negatives))
    candidates = np.concatenate([positive[..., None], negatives], -1).astype(np.float64)
    softmax_positive = np.exp(positive) / np.exp(candidates).sum(-1)
    np.testing.assert_allclose(grad_positive, (softmax_positive - 1) / positive.size, atol=1e-6)


def test_info_nce_errors():
    with pytest.raises(ValueError, match=r"square \(N, N\)"):
        info_nce(jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="negative_scores"):
        info_nce_with_negatives(jnp.zeros((3,)), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="K >= 1"):
        info_nce_with_negatives(jnp.zeros((3,)), jnp.zeros((3, 0)))


def _arcface_float64(cosine, labels, s, m, easy):
    """ArcFace (Deng et al. 2019, eq. 3) through the angle itself: s·cos(arccos(c) + m) for the target, with the
    official code's fallbacks where θ + m >= π (or cos θ <= 0 with easy_margin)."""
    c = cosine.astype(np.float64)
    theta = np.arccos(c)
    with_margin = np.cos(theta + m)
    if easy:
        target = np.where(c > 0, with_margin, c)
    else:
        target = np.where(theta + m < np.pi, with_margin, c - m * np.sin(m))
    onehot = np.eye(c.shape[-1], dtype=bool)[labels]
    return s * np.where(onehot, target, c)


@pytest.mark.parametrize("margin,easy", [(0.5, False), (0.5, True), (0.2, False)])
def test_arcface_matches_float64_angle_formula(margin, easy):
    rng = np.random.default_rng(int(margin * 10) + easy)
    cosine = np.tanh(rng.normal(size=(6, 5)) * 2).astype(np.float32)
    labels = rng.integers(0, 5, 6)
    cosine[np.arange(3), labels[:3]] = [-0.95, 0.05, 0.999]  # beyond pi - m, near 0, near 1
    f = jax.jit(lambda c, y: arcface_logits(c, y, scale=30.0, margin=margin, easy_margin=easy))
    out = f(cosine, labels)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _arcface_float64(cosine, labels, 30.0, margin, easy), rtol=1e-5, atol=2e-5)
    # Gradient of the loss against the float64 reference's gradient by central differences, elementwise.
    with jax.enable_x64(True):
        c64 = jnp.asarray(cosine, jnp.float64)
        grad = jax.jit(jax.grad(lambda c: arcface_logits(c, jnp.asarray(labels), scale=30.0, margin=margin,
                                                         easy_margin=easy).sum()))(c64)
    eps = 1e-7
    numeric = (_arcface_float64(cosine.astype(np.float64) + eps, labels, 30.0, margin, easy)
               - _arcface_float64(cosine.astype(np.float64) - eps, labels, 30.0, margin, easy)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-4)


def test_margin_losses_properties():
    rng = np.random.default_rng(9)
    cosine = jnp.asarray(np.tanh(rng.normal(size=(4, 7))), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 7, 4))
    arc_zero, cos_zero, cos_face, arc, ce_margin, ce_plain = jax.jit(lambda c, y: (
        arcface_logits(c, y, scale=16.0, margin=0.0), cosface_logits(c, y, scale=16.0, margin=0.0),
        cosface_logits(c, y, scale=64.0, margin=0.35), arcface_logits(c, y, scale=16.0, margin=0.3),
        softmax_cross_entropy(arcface_logits(c, y, scale=16.0, margin=0.3), y),
        softmax_cross_entropy(16 * c, y)))(cosine, labels)
    np.testing.assert_allclose(arc_zero, 16 * cosine, rtol=1e-6)
    np.testing.assert_allclose(cos_zero, 16 * cosine, rtol=1e-6)
    np.testing.assert_allclose(cos_face, 64 * (np.asarray(cosine) - 0.35 * np.eye(7)[np.asarray(labels)]), rtol=1e-6)
    # A margin only lowers the target logit and leaves the others, so it raises the cross entropy.
    others = ~np.eye(7, dtype=bool)[np.asarray(labels)]
    np.testing.assert_array_equal(np.asarray(arc)[others], 16 * np.asarray(cosine)[others])
    assert np.all(np.asarray(arc)[~others] < 16 * np.asarray(cosine)[~others])
    assert np.all(ce_margin > ce_plain)
    # Finite gradients where sin θ = 0 (cos θ = ±1).
    edge = jnp.asarray([[1.0, -1.0]])
    g = jax.jit(jax.grad(lambda c: arcface_logits(c, jnp.asarray([0]), scale=2.0).sum()))(edge)
    assert np.isfinite(g).all()


def test_cosine_logits_normalise_both_sides():
    rng = np.random.default_rng(10)
    x, w = rng.normal(size=(3, 4)), rng.normal(size=(4, 5))
    expected = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0, keepdims=True))
    np.testing.assert_allclose(jax.jit(cosine_logits)(jnp.asarray(x * 7, jnp.float32), jnp.asarray(w, jnp.float32)),
                               expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must agree in D"):
        cosine_logits(jnp.zeros((3, 4)), jnp.zeros((5, 5)))
    with pytest.raises(ValueError, match="margin"):
        arcface_logits(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), margin=2.0)
    with pytest.raises(ValueError, match="labels"):
        cosface_logits(jnp.zeros((2, 3)), jnp.zeros((3,), jnp.int32))


def _giou_float64(a, b):
    """GIoU of two cxcywh boxes, the slow way."""
    a = [a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2]
    b = [b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2]
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def _detr_set_loss_float64(logits, boxes, labels, target_boxes, valid, eos_coef, weights):
    """DETR's matching by brute force over every injective map of an image's targets into its predictions, then
    SetCriterion's weighted CE, L1 and GIoU losses, in float64 loops."""
    logits, boxes, target_boxes = (np.asarray(a, np.float64) for a in (logits, boxes, target_boxes))
    batch, n, num_logits = logits.shape
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    classes, pairs = np.full((batch, n), num_logits - 1), []
    for b in range(batch):
        targets = list(np.flatnonzero(valid[b]))

        def cost(i, t):
            return (-weights[0] * prob[b, i, labels[b, t]] + weights[1] * np.abs(boxes[b, i] - target_boxes[b, t]).sum()
                    - weights[2] * _giou_float64(boxes[b, i], target_boxes[b, t]))

        best = min(itertools.permutations(range(n), len(targets)),
                   key=lambda preds: sum(cost(i, t) for i, t in zip(preds, targets)))
        for i, t in zip(best, targets):
            classes[b, i] = labels[b, t]
            pairs.append((b, i, t))
    log_p = np.log(prob)
    w = np.where(classes == num_logits - 1, eos_coef, 1.0)
    ce = np.sum(-w * np.take_along_axis(log_p, classes[..., None], -1)[..., 0]) / w.sum()
    num_boxes = max(int(valid.sum()), 1)
    l1 = sum(np.abs(boxes[b, i] - target_boxes[b, t]).sum() for b, i, t in pairs) / num_boxes
    giou = sum(1 - _giou_float64(boxes[b, i], target_boxes[b, t]) for b, i, t in pairs) / num_boxes
    return {"loss_ce": ce, "loss_bbox": l1, "loss_giou": giou,
            "loss": weights[0] * ce + weights[1] * l1 + weights[2] * giou}


def _set_loss_case(seed, batch=3, n=4, m=3, num_classes=3, counts=(3, 1, 0)):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, n, num_classes + 1)).astype(np.float32) * 2
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (batch, n, 2)), rng.uniform(0.1, 0.4, (batch, n, 2))], -1)
    target_boxes = np.concatenate([rng.uniform(0.2, 0.8, (batch, m, 2)), rng.uniform(0.1, 0.4, (batch, m, 2))], -1)
    labels = rng.integers(0, num_classes, (batch, m))
    valid = np.arange(m)[None, :] < np.asarray(counts)[:, None]
    return logits, boxes.astype(np.float32), labels, target_boxes.astype(np.float32), valid


@pytest.mark.parametrize("seed,eos_coef,weights", [(0, 0.1, (1.0, 5.0, 2.0)), (1, 0.5, (2.0, 1.0, 0.5)),
                                                   (2, 1.0, (1.0, 5.0, 2.0))])
def test_detr_set_loss_matches_brute_force_matching_in_float64(seed, eos_coef, weights):
    logits, boxes, labels, target_boxes, valid = _set_loss_case(seed)
    loss = jax.jit(lambda *a: detr_set_loss(*a, eos_coef=eos_coef, class_weight=weights[0], bbox_weight=weights[1],
                                            giou_weight=weights[2]))(
        jnp.asarray(logits), jnp.asarray(boxes), jnp.asarray(labels), jnp.asarray(target_boxes), jnp.asarray(valid))
    expected = _detr_set_loss_float64(logits, boxes, labels, target_boxes, valid, eos_coef, weights)
    for name, value in expected.items():
        np.testing.assert_allclose(loss[name], value, rtol=2e-5, err_msg=name)
    matched = np.asarray(loss["col_for_row"])
    assert [(row >= 0).sum() for row in matched] == [3, 1, 0]


def test_detr_set_loss_gradients_are_finite_and_match_finite_differences():
    logits, boxes, labels, target_boxes, valid = _set_loss_case(3, batch=2, counts=(2, 3))
    args = [jnp.asarray(a) for a in (logits, boxes, labels, target_boxes, valid)]
    def loss(lg, bx):
        out = detr_set_loss(lg, bx, *args[2:])
        return out["loss"], out["col_for_row"]

    grads, matching = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(*args[:2])
    assert all(np.isfinite(g).all() and np.abs(g).sum() > 0 for g in grads)
    with jax.enable_x64(True):  # the matching is piecewise constant: differentiate with it fixed
        fixed = jax.jit(lambda lg, bx: detr_set_loss(lg, bx, args[2], args[3].astype(jnp.float64), args[4],
                                                     col_for_row=matching)["loss"])
        check_grads(fixed, (jnp.asarray(logits, jnp.float64), jnp.asarray(boxes, jnp.float64)), order=1,
                    modes=("rev",), eps=1e-6)


def test_detr_set_loss_bad_input():
    logits, boxes, labels, target_boxes, valid = (jnp.asarray(a) for a in _set_loss_case(0))
    with pytest.raises(ValueError, match="pred_boxes"):
        detr_set_loss(logits, boxes[:, :2], labels, target_boxes, valid)
    with pytest.raises(ValueError, match="target_valid"):
        detr_set_loss(logits, boxes, labels, target_boxes, valid[:, :2])
    with pytest.raises(TypeError, match="target_valid must be bool"):
        detr_set_loss(logits, boxes, labels, target_boxes, valid.astype(jnp.int32))
    with pytest.raises(ValueError, match="eos_coef"):
        detr_set_loss(logits, boxes, labels, target_boxes, valid, eos_coef=-1.0)
