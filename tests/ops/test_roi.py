import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops.roi import roi_align, roi_pool
from tests.ops.vision_reference import check_vjp_against_finite_differences, torchvision_case


def _bilinear_loop(image, y, x):
    """RoIAlign's bilinear interpolation of one (H, W, C) map at (y, x), Detectron/torchvision's rules."""
    h, w = image.shape[:2]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(image.shape[2])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_high = y_low = h - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_high = x_low = w - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    return ((1 - ly) * (1 - lx) * image[y_low, x_low] + (1 - ly) * lx * image[y_low, x_high]
            + ly * (1 - lx) * image[y_high, x_low] + ly * lx * image[y_high, x_high])


def _roi_align_loop(features, boxes, index, size, scale, ratio, aligned):
    """RoIAlign (He et al. 2017) box by box, bin by bin, sample by sample, in float64."""
    ph, pw = size
    out = np.zeros((len(boxes), ph, pw, features.shape[3]))
    offset = 0.5 if aligned else 0.0
    for k, (x1, y1, x2, y2) in enumerate(boxes.astype(np.float64)):
        x1, y1, x2, y2 = x1 * scale - offset, y1 * scale - offset, x2 * scale - offset, y2 * scale - offset
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        gh = ratio if ratio > 0 else math.ceil(rh / ph)
        gw = ratio if ratio > 0 else math.ceil(rw / pw)
        for p in range(ph):
            for q in range(pw):
                total = np.zeros(features.shape[3])
                for iy in range(gh):
                    for ix in range(gw):
                        y = y1 + p * rh / ph + (iy + 0.5) * rh / ph / gh
                        x = x1 + q * rw / pw + (ix + 0.5) * rw / pw / gw
                        total += _bilinear_loop(features[index[k]], y, x)
                out[k, p, q] = total / max(gh * gw, 1)
    return out


def _roi_pool_loop(features, boxes, index, size, scale):
    """RoI max pooling (Girshick 2015) bin by bin with torchvision's quantisation, in float64."""
    ph, pw = size
    h, w = features.shape[1:3]
    out = np.zeros((len(boxes), ph, pw, features.shape[3]))
    c_round = lambda v: int(math.floor(abs(v) + 0.5)) * (1 if v >= 0 else -1)
    for k, box in enumerate(boxes):
        x1, y1, x2, y2 = (c_round(v * scale) for v in box)
        rh, rw = max(y2 - y1 + 1, 1), max(x2 - x1 + 1, 1)
        for p in range(ph):
            for q in range(pw):
                h0 = min(max(math.floor(p * rh / ph) + y1, 0), h)
                h1 = min(max(math.ceil((p + 1) * rh / ph) + y1, 0), h)
                w0 = min(max(math.floor(q * rw / pw) + x1, 0), w)
                w1 = min(max(math.ceil((q + 1) * rw / pw) + x1, 0), w)
                if h1 > h0 and w1 > w0:
                    out[k, p, q] = features[index[k], h0:h1, w0:w1].max(axis=(0, 1))
    return out


def _inputs(seed, k=5, size=(2, 7, 8, 3), extent=8.0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=size).astype(np.float32)
    low = rng.uniform(-0.25 * extent, extent, (k, 2))
    boxes = np.concatenate([low, low + rng.uniform(0.0, extent, (k, 2))], 1).astype(np.float32)
    return features, boxes, rng.integers(0, size[0], k).astype(np.int32)


@pytest.mark.parametrize("size,scale,ratio,aligned", [((2, 3), 1.0, -1, False), ((3, 3), 0.5, 2, True),
                                                      ((2, 2), 0.75, 0, True)])
def test_roi_align_matches_naive_loop(size, scale, ratio, aligned):
    features, boxes, index = _inputs(sum(size) + ratio, extent=8.0 / scale)
    # Jitted with the boxes closed over (concrete while tracing): one compilation instead of many eager ones.
    out = jax.jit(lambda f: roi_align(f, jnp.asarray(boxes), jnp.asarray(index), size, spatial_scale=scale,
                                      sampling_ratio=ratio, aligned=aligned))(features)
    assert out.shape == (5, *size, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _roi_align_loop(features.astype(np.float64), boxes, index, size, scale, ratio,
                                                    aligned), atol=1e-5)


def test_roi_align_adaptive_grid_under_jit():
    """Traced boxes: the adaptive grid's bound is ceil(H / ph), exact for boxes inside the feature map."""
    features, boxes, index = _inputs(1, k=4, extent=6.0)
    boxes = np.clip(boxes, 0, 7.0)
    f = jax.jit(lambda f, b, i: roi_align(f, b, i, 2))
    np.testing.assert_allclose(f(features, boxes, index), _roi_align_loop(features, boxes, index, (2, 2), 1.0, -1,
                                                                          False), atol=1e-5)


def test_roi_pool_matches_naive_loop_eager_and_jitted():
    features, boxes, index = _inputs(4, k=6, extent=5.0)
    boxes[0] = [-3.0, -3.0, -1.0, -1.0]  # entirely outside: empty bins give 0
    reference = _roi_pool_loop(features, boxes, index, (3, 2), 0.5)
    out = jax.jit(lambda f: roi_pool(f, jnp.asarray(boxes), jnp.asarray(index), (3, 2), spatial_scale=0.5))(features)
    np.testing.assert_array_equal(out, reference.astype(np.float32))
    np.testing.assert_array_equal(out[0], 0.0)
    traced = jax.jit(lambda f, b, i: roi_pool(f, b, i, (3, 2), spatial_scale=0.5))(features, boxes, index)
    np.testing.assert_array_equal(traced, out)  # traced boxes: bins bounded by H and W, same result


@pytest.mark.parametrize("case", ["align_adaptive", "align_adaptive_aligned", "align_ratio2", "align_ratio3_aligned",
                                  "pool_scale1", "pool_scale_half"])
def test_matches_torchvision_outputs_and_feature_gradients(case):
    """torchvision 0.29.1's roi_align / roi_pool in float64 (tests/ops/torchvision_reference.py): equal to 1e-12."""
    arrays, options = torchvision_case(case)
    op = roi_pool if case.startswith("pool") else roi_align
    options["output_size"] = tuple(options["output_size"])
    with jax.enable_x64(True):
        f = lambda features: op(features, jnp.asarray(arrays["boxes"]), jnp.asarray(arrays["batch_indices"]),
                                **options)
        out, grad = jax.jit(lambda x, t: (f(x), jax.vjp(f, x)[1](t)[0]))(arrays["features"], arrays["cotangent"])
        np.testing.assert_allclose(out, arrays["out"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(grad, arrays["grad_features"], atol=1e-12)


def test_roi_align_gradients_match_finite_differences_in_features_and_boxes():
    features, boxes, index = _inputs(5, k=3, extent=5.0)
    cotangent = np.random.default_rng(6).normal(size=(3, 2, 2, 3))
    loss = lambda f, b: jnp.sum(cotangent * roi_align(f, b, jnp.asarray(index), 2, sampling_ratio=2, aligned=True))
    check_vjp_against_finite_differences(loss, (features, boxes + 0.123), 0)
    check_vjp_against_finite_differences(loss, (features, boxes + 0.123), 1, eps=1e-6)


def test_bad_input_raises_naming_the_argument():
    features, boxes, index = _inputs(7, k=2)
    f, b, i = jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(index)
    with pytest.raises(ValueError, match="boxes must hold boxes .* degenerate"):
        roi_align(f, b.at[1, 2].set(b[1, 0] - 1), i, 2)
    with pytest.raises(ValueError, match="batch_indices must hold values in"):
        roi_pool(f, b, i.at[0].set(2), 2)
    with pytest.raises(ValueError, match="features must be 4-D"):
        roi_align(f[0], b, i, 2)
    with pytest.raises(ValueError, match="boxes must be"):
        roi_align(f, b, i[:1], 2)
    with pytest.raises(ValueError, match=r"output_size\[1\]"):
        roi_pool(f, b, i, (2, 0))
    with pytest.raises(ValueError, match="spatial_scale"):
        roi_align(f, b, i, 2, spatial_scale=0.0)
