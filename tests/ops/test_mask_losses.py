"""Segment Anything's mask losses and IoU: sigmoid focal loss, soft Dice loss and mask IoU against float64 NumPy,
gradients included, and their argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmodels.ops.losses import dice_loss, mask_iou, sigmoid_focal_loss


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _focal_reference(x, t, alpha, gamma):
    """Lin et al. 2017 eq. 5 written out: -α_t (1 - p_t)^γ log p_t with the soft-target cross entropy."""
    x, t = x.astype(np.float64), t.astype(np.float64)
    p = _sigmoid(x)
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    a_t = 1.0 if alpha is None else alpha * t + (1 - alpha) * (1 - t)
    return a_t * (1 - p_t) ** gamma * ce


def _dice_reference(x, t, smooth=1.0):
    p = _sigmoid(x.astype(np.float64)).reshape(*x.shape[:-2], -1)
    t = t.astype(np.float64).reshape(p.shape)
    return 1 - (2 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)


def _inputs(shape, seed, soft=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 3
    t = rng.uniform(size=shape) if soft else (rng.uniform(size=shape) < 0.4).astype(np.float64)
    return x, t


@pytest.mark.parametrize("alpha,gamma,soft", [(0.25, 2.0, False), (None, 1.5, True), (0.7, 0.0, False)])
def test_focal_loss_matches_float64_reference_with_gradient(alpha, gamma, soft):
    x, t = _inputs((3, 5, 6), 0, soft)
    out = sigmoid_focal_loss(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32), alpha=alpha, gamma=gamma)
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _focal_reference(x, t, alpha, gamma), rtol=1e-5, atol=1e-6)
    with jax.enable_x64(True):
        f = lambda v: jnp.sum(sigmoid_focal_loss(v, jnp.asarray(t), alpha=alpha, gamma=gamma))
        check_grads(f, (jnp.asarray(x),), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(sigmoid_focal_loss(jnp.asarray(x), jnp.asarray(t), alpha=alpha, gamma=gamma),
                                   _focal_reference(x, t, alpha, gamma), rtol=1e-12)


def test_focal_loss_without_focusing_is_the_binary_cross_entropy_and_large_logits_stay_finite():
    x, t = _inputs((4, 7), 1)
    bce = -(t * np.log(_sigmoid(x)) + (1 - t) * np.log(1 - _sigmoid(x)))
    np.testing.assert_allclose(sigmoid_focal_loss(jnp.asarray(x), jnp.asarray(t), alpha=None, gamma=0.0), bce,
                               rtol=1e-5)
    big = sigmoid_focal_loss(jnp.asarray([100.0, -100.0]), jnp.asarray([0.0, 1.0]))
    np.testing.assert_allclose(big, 0.25 * 100.0 * np.array([3.0, 1.0]) * (1.0 - 0.0) ** 2, rtol=1e-5)
    # a confident correct prediction is down-weighted by (1 - p_t)^γ far more than by plain cross entropy
    easy = sigmoid_focal_loss(jnp.asarray([3.0]), jnp.asarray([1.0]), alpha=None, gamma=2.0)
    assert float(easy[0]) < 0.003 * -np.log(_sigmoid(3.0))


@pytest.mark.parametrize("shape,soft", [((2, 3, 4, 5), False), ((6, 6), True)])
def test_dice_loss_matches_float64_reference_with_gradient(shape, soft):
    x, t = _inputs(shape, 2, soft)
    out = dice_loss(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32))
    assert out.shape == shape[:-2] and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _dice_reference(x, t), rtol=1e-5, atol=1e-6)
    with jax.enable_x64(True):
        check_grads(lambda v: jnp.sum(dice_loss(v, jnp.asarray(t))), (jnp.asarray(x),), order=1, modes=("rev",),
                    atol=1e-6, rtol=1e-6)
    one_axis = dice_loss(jnp.asarray(x.reshape(*shape[:-2], -1)), jnp.asarray(t.reshape(*shape[:-2], -1)),
                         num_mask_dims=1)
    np.testing.assert_allclose(one_axis, _dice_reference(x, t), rtol=1e-5)
    # a perfect prediction of a large mask approaches 0
    perfect = dice_loss(jnp.full((1, 8, 8), 30.0), jnp.ones((1, 8, 8)))
    assert float(perfect[0]) < 1e-6


def test_mask_iou_matches_counts_and_defines_two_empty_masks_as_identical():
    rng = np.random.default_rng(3)
    m, t = rng.uniform(size=(2, 3, 5, 5)) < 0.5, rng.uniform(size=(2, 3, 5, 5)) < 0.5
    expected = (m & t).sum((-2, -1)) / (m | t).sum((-2, -1))
    np.testing.assert_allclose(mask_iou(jnp.asarray(m), jnp.asarray(t)), expected, rtol=1e-6)
    np.testing.assert_allclose(mask_iou(jnp.asarray(m, jnp.float32), jnp.asarray(t, jnp.uint8)), expected, rtol=1e-6)
    empty, full = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    np.testing.assert_array_equal(mask_iou(jnp.asarray(np.stack([empty, empty, full])),
                                           jnp.asarray(np.stack([empty, full, full]))), [1.0, 0.0, 1.0])


def test_bad_arguments_raise_naming_them():
    x = jnp.zeros((2, 4, 4))
    with pytest.raises(ValueError, match="logits and targets must have the same shape"):
        sigmoid_focal_loss(x, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="gamma"):
        sigmoid_focal_loss(x, x, gamma=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        sigmoid_focal_loss(x, x, alpha=1.5)
    with pytest.raises(TypeError, match="logits must be floating"):
        dice_loss(jnp.zeros((2, 4, 4), jnp.int32), x)
    with pytest.raises(ValueError, match="num_mask_dims=4"):
        dice_loss(x, x, num_mask_dims=4)
    with pytest.raises(ValueError, match="masks and targets"):
        mask_iou(x, jnp.zeros((4, 4)))
