import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops.deformable import bilinear_sample, deform_conv2d, multi_scale_deformable_attention
from tests.ops.vision_reference import check_vjp_against_finite_differences, torchvision_case


def _sample_loop(image, y, x):
    """Zero-padded bilinear interpolation of one (H, W, C) map at (y, x), corner by corner, float64."""
    h, w = image.shape[:2]
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    out = np.zeros(image.shape[2])
    for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yi < h and 0 <= xi < w:
                out += wy * wx * image[yi, xi].astype(np.float64)
    return out


def _deform_conv_loop(x, offset, kernel, mask, stride, padding, dilation, groups):
    """Deformable convolution (Dai et al. 2017 eq. 2; Zhu et al. 2019 eq. 1), output pixel by pixel, tap by tap,
    offset group by offset group; stride, padding, dilation are (row, column) pairs."""
    b, _, _, cin = x.shape
    kh, kw, cin_g, cout = kernel.shape
    _, ho, wo, _ = offset.shape
    og, taps = offset.shape[3] // (2 * kh * kw), kh * kw
    out = np.zeros((b, ho, wo, cout))
    for n, i, j, di, dj, g in np.ndindex(b, ho, wo, kh, kw, og):
        t = di * kw + dj
        dy, dx = offset[n, i, j, g * 2 * taps + 2 * t], offset[n, i, j, g * 2 * taps + 2 * t + 1]
        m = 1.0 if mask is None else mask[n, i, j, g * taps + t]
        channels = range(g * cin // og, (g + 1) * cin // og)
        v = m * _sample_loop(x[n][:, :, list(channels)], i * stride[0] - padding[0] + di * dilation[0] + dy,
                             j * stride[1] - padding[1] + dj * dilation[1] + dx)
        for c, value in zip(channels, v):
            group = c // cin_g
            outs = slice(group * cout // groups, (group + 1) * cout // groups)
            out[n, i, j, outs] += value * kernel[di, dj, c - group * cin_g, outs]
    return out


def _random(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in shapes]


@pytest.mark.parametrize("stride,padding,dilation,groups,offset_groups", [(1, 1, 1, 1, 1), (2, 0, 1, 2, 2),
                                                                           (1, 2, 2, 2, 4)])
def test_zero_offsets_and_unit_mask_equal_lax_convolution(stride, padding, dilation, groups, offset_groups):
    x, kernel = _random(stride + dilation, (2, 7, 6, 4), (3, 3, 4 // groups, 6))

    def both(x, kernel):
        reference = jax.lax.conv_general_dilated(x, kernel, (stride,) * 2, ((padding, padding),) * 2,
                                                 rhs_dilation=(dilation,) * 2, feature_group_count=groups,
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                 precision=jax.lax.Precision.HIGHEST)
        offset = jnp.zeros(reference.shape[:3] + (2 * offset_groups * 9,))
        mask = jnp.ones(reference.shape[:3] + (offset_groups * 9,))
        kw = dict(stride=stride, padding=padding, dilation=dilation, feature_group_count=groups)
        return reference, deform_conv2d(x, offset, kernel, **kw), deform_conv2d(x, offset, kernel, mask, **kw)

    reference, v1, v2 = jax.jit(both)(x, kernel)
    np.testing.assert_allclose(v1, reference, atol=1e-5)
    np.testing.assert_allclose(v2, reference, atol=1e-5)


def test_random_offsets_match_naive_loop():
    """Unequal strides, 2 groups, 2 offset groups, offsets reaching past the border, a modulation mask."""
    x, kernel, offset, mask = _random(1, (1, 5, 8, 4), (2, 3, 2, 4), (1, 6, 2, 2 * 2 * 6), (1, 6, 2, 2 * 6))
    kw = dict(stride=(1, 2), padding=(1, 0), dilation=(1, 2), feature_group_count=2)
    out = jax.jit(lambda *a: deform_conv2d(*a, **kw))(x, 1.5 * offset, kernel, mask)
    assert out.shape == (1, 6, 2, 4)
    reference = _deform_conv_loop(x, 1.5 * offset, kernel, mask, (1, 2), (1, 0), (1, 2), 2)
    np.testing.assert_allclose(out, reference, atol=1e-4)


@pytest.mark.parametrize("case", ["deform_v1", "deform_v2_groups", "deform_v2_dilated"])
def test_matches_torchvision_deform_conv2d_outputs_and_gradients(case):
    """torchvision 0.29.1's deform_conv2d in float64 (tests/ops/torchvision_reference.py): output and the
    gradients in x, offset, kernel and mask equal to 1e-12."""
    arrays, options = torchvision_case(case)
    names = ["x", "offset", "kernel"] + (["mask"] if "mask" in arrays else [])
    with jax.enable_x64(True):
        f = lambda *args: deform_conv2d(*args, **options)
        out, grads = jax.jit(lambda t, *a: (f(*a), jax.vjp(f, *a)[1](t)))(arrays["cotangent"],
                                                                           *(arrays[n] for n in names))
    np.testing.assert_allclose(out, arrays["out"], atol=1e-12)
    for name, grad in zip(names, grads):
        np.testing.assert_allclose(grad, arrays[f"grad_{name}"], atol=1e-11, err_msg=name)


def test_offset_gradient_matches_finite_differences():
    x, kernel, offset, mask = _random(3, (1, 4, 4, 2), (2, 2, 2, 3), (1, 3, 3, 8), (1, 3, 3, 4))
    cotangent = np.random.default_rng(4).normal(size=(1, 3, 3, 3))
    loss = lambda x, o, k, m: jnp.sum(cotangent * deform_conv2d(x, o, k, m))
    for argnum in (1, 3):
        check_vjp_against_finite_differences(loss, (x, offset + 0.37, kernel, mask), argnum, eps=1e-6)


def test_bilinear_sample_matches_loop_at_integers_and_outside():
    image, = _random(5, (1, 3, 4, 2))
    y = np.asarray([[0.0, 1.0, 2.5, -0.5, -1.0, 2.9, 10.0]], np.float32)
    x = np.asarray([[0.0, 3.0, 1.25, 0.5, 0.0, 3.5, 1.0]], np.float32)
    out = jax.jit(bilinear_sample)(image, y, x)
    np.testing.assert_allclose(out[0], [_sample_loop(image[0], a, b) for a, b in zip(y[0], x[0])], atol=1e-6)
    np.testing.assert_array_equal(out[0, :2], image[0, [0, 1], [0, 3]])  # integer positions read the pixel
    np.testing.assert_array_equal(out[0, 4], 0.0)  # one pixel outside: all four neighbours missing


def _msda_loop(value, shapes, locations, weights):
    """Multi-scale deformable attention (Zhu et al. 2021, eq. 3) query by query, head by head, point by point."""
    b, _, heads, d = value.shape
    q, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    out = np.zeros((b, q, heads, d))
    for n, i, m, lvl, p in np.ndindex(b, q, heads, levels, points):
        h, w = shapes[lvl]
        level_map = value[n, starts[lvl]:starts[lvl + 1], m].reshape(h, w, d)
        u, v = locations[n, i, m, lvl, p]
        out[n, i, m] += weights[n, i, m, lvl, p] * _sample_loop(level_map, v * h - 0.5, u * w - 0.5)
    return out.reshape(b, q, heads * d)


def _torch_grid_sample_msda(value, shapes, locations, weights):
    """The official pure-PyTorch `ms_deform_attn_core_pytorch` of Deformable DETR, on the installed torch."""
    torch = pytest.importorskip("torch")
    value, locations, weights = (torch.tensor(a, dtype=torch.float64) for a in (value, locations, weights))
    b, _, heads, d = value.shape
    _, q, _, levels, points, _ = locations.shape
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(b * heads, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(torch.nn.functional.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                                       align_corners=False))
    weights = weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(b, heads * d, q)
    return out.transpose(1, 2).numpy()


def test_multi_scale_deformable_attention_matches_loop_and_pytorch_reference():
    shapes = ((4, 5), (2, 3), (1, 1))
    rng = np.random.default_rng(6)
    value = rng.normal(size=(2, sum(h * w for h, w in shapes), 2, 3)).astype(np.float32)
    locations = rng.uniform(-0.1, 1.1, size=(2, 4, 2, 3, 2, 2)).astype(np.float32)
    weights = jax.nn.softmax(rng.normal(size=(2, 4, 2, 6)), -1).reshape(2, 4, 2, 3, 2).astype(np.float32)
    f = jax.jit(lambda v, l, a: multi_scale_deformable_attention(v, shapes, l, a))
    out = f(value, locations, np.asarray(weights))
    assert out.shape == (2, 4, 6) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _msda_loop(value, shapes, locations, np.asarray(weights)), atol=1e-5)
    np.testing.assert_allclose(out, _torch_grid_sample_msda(value, shapes, locations, np.asarray(weights)), atol=1e-5)
    cotangent = rng.normal(size=out.shape)
    loss = lambda v, l, a: jnp.sum(cotangent * multi_scale_deformable_attention(v, shapes, l, a))
    check_vjp_against_finite_differences(loss, (value, locations, np.asarray(weights)), 1, eps=1e-7, samples=3)


def test_bad_input_raises_naming_the_argument():
    x, kernel = jnp.zeros((1, 5, 5, 4)), jnp.zeros((3, 3, 4, 2))
    with pytest.raises(ValueError, match=r"offset must be \(B, H', W', 2·G·kh·kw\) = \(1, 3, 3, 2·G·9\)"):
        deform_conv2d(x, jnp.zeros((1, 3, 3, 17)), kernel)
    with pytest.raises(ValueError, match="offset must be"):
        deform_conv2d(x, jnp.zeros((1, 5, 5, 18)), kernel)  # the size of a padded output, without padding
    with pytest.raises(ValueError, match="offset must be"):
        deform_conv2d(x, jnp.zeros((1, 3, 3, 54)), kernel)  # 3 offset groups do not divide 4 channels
    with pytest.raises(ValueError, match=r"mask must be \(B, H', W', G·kh·kw\)"):
        deform_conv2d(x, jnp.zeros((1, 3, 3, 18)), kernel, jnp.ones((1, 3, 3, 18)))
    with pytest.raises(ValueError, match="feature_group_count=3"):
        deform_conv2d(x, jnp.zeros((1, 3, 3, 18)), kernel, feature_group_count=3)
    with pytest.raises(ValueError, match="stride"):
        deform_conv2d(x, jnp.zeros((1, 3, 3, 18)), kernel, stride=0)
    with pytest.raises(ValueError, match="value must be"):
        multi_scale_deformable_attention(jnp.zeros((1, 5, 1, 2)), ((2, 2),), jnp.zeros((1, 1, 1, 1, 1, 2)),
                                         jnp.zeros((1, 1, 1, 1, 1)))
    with pytest.raises(ValueError, match="attention_weights must be"):
        multi_scale_deformable_attention(jnp.zeros((1, 4, 1, 2)), ((2, 2),), jnp.zeros((1, 1, 1, 1, 3, 2)),
                                         jnp.zeros((1, 1, 1, 1, 2)))
