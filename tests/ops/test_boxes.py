import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmodels.ops import boxes as bx
from tests.ops.vision_reference import torchvision_case

# Jitted once per shape: eager calls compile each small op separately, which dominates these tests' time.
_iou_giou = jax.jit(lambda a, b: (bx.box_iou(a, b), bx.generalized_box_iou(a, b)))


def _random_boxes(rng, shape, scale=10.0):
    """xyxy boxes (..., 4) with positive sizes."""
    low = rng.uniform(0, scale, size=shape + (2,))
    return np.concatenate([low, low + rng.uniform(0.1, scale, size=shape + (2,))], -1)


def _iou_giou_loop(a, b):
    """Float64 loop over pairs: IoU and GIoU (Rezatofighi et al. 2019, Algorithm 1)."""
    iou, giou = np.zeros((len(a), len(b))), np.zeros((len(a), len(b)))
    for i, (ax1, ay1, ax2, ay2) in enumerate(a.astype(np.float64)):
        for j, (bx1, by1, bx2, by2) in enumerate(b.astype(np.float64)):
            inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
            union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
            hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
            iou[i, j] = inter / union
            giou[i, j] = iou[i, j] - (hull - union) / hull
    return iou, giou


@pytest.mark.parametrize("n,m", [(1, 1), (5, 3), (4, 7)])
def test_iou_and_giou_match_float64_loop_with_gradients(n, m):
    rng = np.random.default_rng(n * 10 + m)
    a, b = _random_boxes(rng, (n,)), _random_boxes(rng, (m,))
    a[0] = b[0] if m else a[0]  # an identical pair: IoU = GIoU = 1
    iou, giou = _iou_giou_loop(a, b)
    ours = _iou_giou(a.astype(np.float32), b.astype(np.float32))
    np.testing.assert_allclose(ours[0], iou, atol=1e-5)
    np.testing.assert_allclose(ours[1], giou, atol=1e-5)
    assert np.isclose(giou[0, 0], 1.0) and np.all(giou <= iou + 1e-12) and np.all(giou >= -1)
    if n == 4:  # gradients once (compiling them dominates the time)
        with jax.enable_x64(True):
            check_grads(jax.jit(lambda p, q: bx.generalized_box_iou(p, q).sum() + bx.box_iou(p, q).sum()),
                        (jnp.asarray(a + 0.013), jnp.asarray(b)), order=1, modes=("rev",), eps=1e-6)


def test_batched_leading_dims_and_empty_sets():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, (2, 3)), _random_boxes(rng, (2, 4))
    out = _iou_giou(a.astype(np.float32), b.astype(np.float32))[1]
    assert out.shape == (2, 3, 4)
    for i in range(2):
        np.testing.assert_allclose(out[i], _iou_giou_loop(a[i], b[i])[1], atol=1e-5)
    assert _iou_giou(np.zeros((0, 4)), b[0])[0].shape == (0, 4)
    assert _iou_giou(a[0], np.zeros((0, 4)))[1].shape == (3, 0)
    assert bx.box_iou(jnp.zeros((0, 4)), jnp.zeros((0, 4))).shape == (0, 0)  # eager: the concrete checks pass


def test_zero_area_boxes_give_finite_values_and_gradients():
    point = jnp.asarray([[1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(_iou_giou(point, point), [[[0.0]], [[0.0]]])
    g = jax.jit(jax.grad(lambda p: sum(v.sum() for v in _iou_giou(p, point))))(point)
    assert np.isfinite(g).all()
    line = jnp.asarray([[0.0, 0.0, 2.0, 0.0]])  # zero height, nonzero hull with the box below
    np.testing.assert_allclose(_iou_giou(line, jnp.asarray([[0.0, 1.0, 2.0, 2.0]]))[1], [[-0.5]])


def test_format_round_trip_and_area():
    rng = np.random.default_rng(1)
    xyxy = _random_boxes(rng, (3, 5)).astype(np.float32)
    cxcywh, back, area = jax.jit(lambda b: (bx.box_xyxy_to_cxcywh(b), bx.box_cxcywh_to_xyxy(bx.box_xyxy_to_cxcywh(b)),
                                            bx.box_area(b)))(xyxy)
    np.testing.assert_allclose(cxcywh[..., 2:], xyxy[..., 2:] - xyxy[..., :2], rtol=1e-6)
    np.testing.assert_allclose(back, xyxy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(area, (xyxy[..., 2] - xyxy[..., 0]) * (xyxy[..., 3] - xyxy[..., 1]), rtol=1e-6)


def _encode_float64(b, a, w):
    """Faster R-CNN eq. 2 written out per box."""
    out = []
    for (bx1, by1, bx2, by2), (ax1, ay1, ax2, ay2) in zip(b, a):
        aw, ah, bw, bh = ax2 - ax1, ay2 - ay1, bx2 - bx1, by2 - by1
        out.append([w[0] * ((bx1 + bx2) / 2 - (ax1 + ax2) / 2) / aw, w[1] * ((by1 + by2) / 2 - (ay1 + ay2) / 2) / ah,
                    w[2] * np.log(bw / aw), w[3] * np.log(bh / ah)])
    return np.asarray(out)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coding_matches_float64_and_round_trips(weights):
    rng = np.random.default_rng(2)
    b, a = _random_boxes(rng, (6,)), _random_boxes(rng, (6,))
    deltas = bx.encode_boxes(jnp.asarray(b, jnp.float32), jnp.asarray(a, jnp.float32), weights)
    np.testing.assert_allclose(deltas, _encode_float64(b, a, weights), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bx.decode_boxes(deltas, jnp.asarray(a, jnp.float32), weights), b, rtol=1e-4, atol=1e-4)


def test_decode_clips_the_log_scale():
    anchor = jnp.asarray([0.0, 0.0, 2.0, 4.0])
    out = bx.decode_boxes(jnp.asarray([0.0, 0.0, 100.0, 100.0]), anchor)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(bx.box_xyxy_to_cxcywh(out)[2:], [2 * 1000 / 16, 4 * 1000 / 16], rtol=1e-5)
    np.testing.assert_allclose(bx.BBOX_XFORM_CLIP, np.log(1000 / 16))
    np.testing.assert_allclose(bx.clip_boxes_to_image(jnp.asarray([-1.0, 2.0, 9.0, 30.0]), 20, 8), [0, 2, 8, 20])


def test_degenerate_and_malformed_boxes_raise_naming_the_argument():
    good, bad = jnp.asarray([[0.0, 0.0, 1.0, 1.0]]), jnp.asarray([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"boxes2 must hold boxes .* 1 degenerate, the first at index \(1,\)"):
        bx.box_iou(good, bad)
    with pytest.raises(ValueError, match="boxes1 must hold boxes"):
        bx.generalized_box_iou(bad, good)
    with pytest.raises(ValueError, match="anchors must hold boxes .* x2 > x1"):
        bx.encode_boxes(good, jnp.asarray([[0.0, 0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"boxes must have shape \(..., 4\)"):
        bx.box_area(jnp.zeros((3, 5)))
    with pytest.raises(TypeError, match="boxes1 must be floating"):
        bx.box_iou(jnp.zeros((1, 4), jnp.int32), good)
    with pytest.raises(ValueError, match="same leading dims"):
        bx.box_iou(jnp.zeros((2, 1, 4)), jnp.zeros((3, 1, 4)))
    with pytest.raises(ValueError, match=r"weights\[2\]"):
        bx.encode_boxes(good, good, (1.0, 1.0, 0.0, 1.0))
    # Under jit the values are unknown: no error, and the documented signed area.
    np.testing.assert_allclose(jax.jit(bx.box_area)(bad), [1.0, -1.0])


def test_matches_torchvision_box_ops_and_box_coder():
    """torchvision 0.29.1's box_iou, generalized_box_iou and BoxCoder((10, 10, 5, 5)) in float64
    (tests/ops/torchvision_reference.py), decoding included a delta beyond the log(1000/16) clip."""
    arrays, _ = torchvision_case("boxes")
    with jax.enable_x64(True):
        iou, giou = _iou_giou(arrays["a"], arrays["b"])
        coder = jax.jit(lambda a, b, d: (bx.encode_boxes(a, b, (10.0, 10.0, 5.0, 5.0)),
                                         bx.decode_boxes(d, b, (10.0, 10.0, 5.0, 5.0))))
        encoded, decoded = coder(arrays["a"][:4], arrays["b"], arrays["wild_deltas"])
    np.testing.assert_allclose(iou, arrays["iou"], atol=1e-12)
    np.testing.assert_allclose(giou, arrays["giou"], atol=1e-12)
    np.testing.assert_allclose(encoded, arrays["encoded"], atol=1e-12)
    np.testing.assert_allclose(decoded, arrays["decoded"], rtol=1e-12)
