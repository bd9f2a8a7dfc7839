import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmodels.ops import spatial as sp
from jaxmodels.ops.spatial import depth_to_space, space_to_depth
from tests.ops.vision_reference import check_vjp_against_finite_differences

torch = pytest.importorskip("torch")  # the test extra's CPU torch: PyTorch's functional ops as references


def _torch_nhwc(fn, x, *args, **kwargs):
    """Run a channels-first torch op on a channels-last array, in float64."""
    out = fn(torch.tensor(np.asarray(x, np.float64)).permute(0, 3, 1, 2), *args, **kwargs)
    return out.permute(0, 2, 3, 1).numpy()


def _depth_to_space_reference(x, r):
    b, h, w, c = x.shape
    c_out = c // (r * r)
    out = np.zeros((b, h * r, w * r, c_out), x.dtype)
    for i in range(h):
        for j in range(w):
            for di in range(r):
                for dj in range(r):
                    for k in range(c_out):
                        out[:, r * i + di, r * j + dj, k] = x[:, i, j, (r * di + dj) * c_out + k]
    return out


@pytest.mark.parametrize("shape,r", [((2, 3, 4, 8), 2), ((1, 2, 2, 18), 3)])
def test_depth_to_space_matches_loop_reference_and_inverts(shape, r):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    y = depth_to_space(jnp.asarray(x), r)
    np.testing.assert_array_equal(y, _depth_to_space_reference(x, r))
    np.testing.assert_array_equal(space_to_depth(y, r), x)
    z = np.random.default_rng(1).normal(size=y.shape).astype(np.float32)
    np.testing.assert_array_equal(depth_to_space(space_to_depth(jnp.asarray(z), r), r), z)
    check_grads(lambda a: depth_to_space(a, r), (jnp.asarray(x),), order=1, modes=("rev",))


def test_depth_to_space_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible by factor"):
        depth_to_space(jnp.zeros((1, 2, 2, 6)), 2)
    with pytest.raises(ValueError, match="divisible by factor"):
        space_to_depth(jnp.zeros((1, 3, 4, 1)), 2)
    with pytest.raises(ValueError, match="4-D"):
        space_to_depth(jnp.zeros((3, 4, 1)), 2)


def test_depth_to_space_equals_torch_pixel_shuffle_up_to_the_channel_order():
    """PyTorch reads channel c·r² + r·i + j where we read (r·i + j)·C + c."""
    r, c = 2, 3
    x = np.random.default_rng(2).normal(size=(1, 2, 3, r * r * c)).astype(np.float32)
    ours_to_torch = x.reshape(1, 2, 3, r * r, c).transpose(0, 1, 2, 4, 3).reshape(x.shape)
    np.testing.assert_allclose(depth_to_space(jnp.asarray(x), r),
                               _torch_nhwc(torch.nn.functional.pixel_shuffle, ours_to_torch, r), rtol=1e-6)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_adaptive_pool_and_spp_match_torch_for_several_input_sizes(mode):
    torch_pool = {"max": torch.nn.functional.adaptive_max_pool2d, "avg": torch.nn.functional.adaptive_avg_pool2d}
    levels = (1, 2, 4)
    for seed, (h, w) in enumerate([(7, 9), (4, 4), (3, 5)]):  # 3 < 4: cells repeat rows
        x = np.random.default_rng(seed).normal(size=(2, h, w, 3)).astype(np.float32)
        out = jax.jit(lambda v: sp.spatial_pyramid_pooling(v, levels, mode))(x)
        assert out.shape == (2, 3 * (1 + 4 + 16)) and out.dtype == jnp.float32
        expected = np.concatenate([_torch_nhwc(torch_pool[mode], x, n).reshape(2, -1) for n in levels], -1)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sp.adaptive_pool(jnp.asarray(x), (2, 3), mode), _torch_nhwc(torch_pool[mode], x, (2, 3)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(8, 6), (5, 7), (2, 3)])
def test_resize_nearest_matches_jax_image_resize_and_torch_nearest_exact(size):
    x = np.random.default_rng(3).normal(size=(2, 4, 3, 2)).astype(np.float32)
    out = jax.jit(lambda v: sp.resize_nearest(v, size))(x)
    np.testing.assert_array_equal(out, jax.image.resize(x, (2, *size, 2), "nearest"))
    np.testing.assert_allclose(out, _torch_nhwc(torch.nn.functional.interpolate, x, size=size, mode="nearest-exact"),
                               rtol=1e-6)
    if size == (8, 6):  # integer factor: plain repetition
        np.testing.assert_array_equal(out, np.repeat(np.repeat(x, 2, 1), 2, 2))


@pytest.mark.parametrize("size,align_corners", [((8, 7), False), ((8, 7), True), ((3, 2), False), ((1, 5), True)])
def test_resize_bilinear_matches_torch_interpolate(size, align_corners):
    x = np.random.default_rng(4).normal(size=(1, 4, 3, 2)).astype(np.float32)
    f = jax.jit(lambda v: sp.resize_bilinear(v, size, align_corners=align_corners))
    out = f(x)
    expected = _torch_nhwc(torch.nn.functional.interpolate, x, size=size, mode="bilinear", align_corners=align_corners)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    if not align_corners and size[0] >= 4 and size[1] >= 3:  # upsampling: no antialiasing in jax.image.resize
        np.testing.assert_allclose(out, jax.image.resize(x, (1, *size, 2), "bilinear"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stride,padding,output_padding,dilation", [(2, 1, 1, 1), (3, 0, 2, 1), (1, 2, 0, 2),
                                                                    ((2, 1), (0, 1), (1, 0), 1)])
def test_conv_transpose_is_the_gradient_of_conv_and_matches_torch(stride, padding, output_padding, dilation):
    rng = np.random.default_rng(5)
    x, kernel = rng.normal(size=(2, 4, 3, 3)).astype(np.float32), rng.normal(size=(3, 2, 3, 5)).astype(np.float32)
    kw = dict(output_padding=output_padding, dilation=dilation)
    out = jax.jit(lambda a, k: sp.conv_transpose(a, k, stride, padding, **kw))(x, kernel)
    pair = lambda v: (v, v) if isinstance(v, int) else v
    s, p, op, d = pair(stride), pair(padding), pair(output_padding), pair(dilation)
    expected_shape = [(n - 1) * s[i] - 2 * p[i] + d[i] * (kernel.shape[i] - 1) + op[i] + 1
                      for i, n in enumerate((4, 3))]
    assert out.shape == (2, *expected_shape, 5)
    # The adjoint of z -> conv(z, kernelᵀ) at the output's size, applied to x.
    conv = lambda z: jax.lax.conv_general_dilated(z, kernel.transpose(0, 1, 3, 2), s, [(p[0], p[0]), (p[1], p[1])],
                                                  rhs_dilation=d, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                  precision=jax.lax.Precision.HIGHEST)
    z = jnp.zeros(out.shape)
    assert conv(z).shape == x.shape
    np.testing.assert_allclose(out, jax.vjp(conv, z)[1](jnp.asarray(x))[0], rtol=1e-5, atol=1e-5)
    weight = torch.tensor(kernel.transpose(2, 3, 0, 1), dtype=torch.float64)
    np.testing.assert_allclose(out, _torch_nhwc(torch.nn.functional.conv_transpose2d, x, weight, stride=s, padding=p,
                                                output_padding=op, dilation=d), rtol=1e-5, atol=1e-5)


def _official_swin_mask(h, w, ws, shift):
    """Swin's `calculate_mask`: label the 9 regions by slices, partition, compare labels."""
    img = np.zeros((1, h, w, 1))
    count = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = count
            count += 1
    windows = np.asarray(sp.window_partition(jnp.asarray(img), ws)).reshape(-1, ws * ws)
    return (windows[:, None, :] - windows[:, :, None]) == 0


def test_window_partition_reverse_and_shifted_window_mask():
    x = np.random.default_rng(6).normal(size=(2, 6, 9, 3)).astype(np.float32)
    windows = sp.window_partition(jnp.asarray(x), 3)
    assert windows.shape == (2 * 2 * 3, 3, 3, 3) and sp.num_windows(6, 9, 3) == 6
    np.testing.assert_array_equal(windows[6 + 3 + 2], x[1, 3:6, 6:9])  # image 1, window row 1, column 2
    np.testing.assert_array_equal(sp.window_reverse(windows, 3, 6, 9), x)
    rect = sp.window_partition(jnp.asarray(x), (2, 3))
    np.testing.assert_array_equal(rect[4], x[0, 2:4, 3:6])
    np.testing.assert_array_equal(sp.window_reverse(rect, (2, 3), 6, 9), x)
    shifted = sp.cyclic_shift(jnp.asarray(x), 1)
    np.testing.assert_array_equal(shifted[:, 0, 0], x[:, 1, 1])
    np.testing.assert_array_equal(sp.cyclic_shift(shifted, -1), x)
    for h, w, ws, shift in [(8, 8, 4, 2), (6, 9, 3, 1), (14, 7, 7, 3)]:
        mask = sp.shifted_window_mask(h, w, ws, shift)
        assert mask.shape == ((h // ws) * (w // ws), ws * ws, ws * ws) and mask.dtype == jnp.bool_
        np.testing.assert_array_equal(mask, _official_swin_mask(h, w, ws, shift))
    assert np.all(sp.shifted_window_mask(8, 8, 4, 0))
    # Windows of the unshifted image never straddle regions: only the last row/column of windows is split.
    assert np.all(np.asarray(sp.shifted_window_mask(8, 8, 4, 2))[0])


def test_relative_position_index_and_bias_match_loops():
    for wh, ww in [(3, 3), (2, 4)]:
        index = np.asarray(sp.relative_position_index((wh, ww)))
        tokens = [(y, x) for y in range(wh) for x in range(ww)]
        loop = [[(p[0] - q[0] + wh - 1) * (2 * ww - 1) + (p[1] - q[1] + ww - 1) for q in tokens] for p in tokens]
        np.testing.assert_array_equal(index, loop)
        assert index.min() == 0 and index.max() == (2 * wh - 1) * (2 * ww - 1) - 1
        table = np.random.default_rng(7).normal(size=((2 * wh - 1) * (2 * ww - 1), 2)).astype(np.float32)
        bias = sp.relative_position_bias(jnp.asarray(table), (wh, ww))
        assert bias.shape == (2, wh * ww, wh * ww)
        for p, q in [(0, 0), (1, wh * ww - 1), (wh * ww - 1, 2)]:
            dy, dx = tokens[p][0] - tokens[q][0], tokens[p][1] - tokens[q][1]
            np.testing.assert_array_equal(bias[:, p, q], table[(dy + wh - 1) * (2 * ww - 1) + dx + ww - 1])
    # The same displacement gives the same bias wherever it occurs.
    index = np.asarray(sp.relative_position_index(3))
    assert index[0, 4] == index[4, 8] == index[1, 5]


def test_patch_merging_order_and_gradient():
    x = np.arange(2 * 4 * 6 * 2, dtype=np.float32).reshape(2, 4, 6, 2)
    out = sp.patch_merging(jnp.asarray(x))
    assert out.shape == (2, 2, 3, 8)
    np.testing.assert_array_equal(out[1, 1, 2], np.concatenate([x[1, 2, 4], x[1, 3, 4], x[1, 2, 5], x[1, 3, 5]]))
    check_grads(jax.jit(sp.patch_merging), (jnp.asarray(x) / x.size,), order=1, modes=("rev",))


def test_bad_input_raises_naming_the_argument():
    x = jnp.zeros((1, 7, 8, 2))
    with pytest.raises(ValueError, match=r"x height and width must be divisible by window_size \(4, 4\)"):
        sp.window_partition(x, 4)
    with pytest.raises(ValueError, match="divisible by the 2x2 merge"):
        sp.patch_merging(x)
    with pytest.raises(ValueError, match="shift_size must be smaller than window_size"):
        sp.shifted_window_mask(8, 8, 4, 4)
    with pytest.raises(ValueError, match="divisible by window_size"):
        sp.shifted_window_mask(9, 8, 4, 2)
    with pytest.raises(ValueError, match="windows must be"):
        sp.window_reverse(jnp.zeros((3, 4, 4, 2)), 4, 8, 8)
    with pytest.raises(ValueError, match=r"table must be \(\(2·3 - 1\)·\(2·3 - 1\), heads\) = \(25, heads\)"):
        sp.relative_position_bias(jnp.zeros((24, 2)), 3)
    with pytest.raises(ValueError, match=r"levels\[1\]"):
        sp.spatial_pyramid_pooling(x, (1, 0))
    with pytest.raises(ValueError, match="mode='sum' is not valid"):
        sp.adaptive_pool(x, 2, "sum")
    with pytest.raises(ValueError, match="output_padding must be smaller"):
        sp.conv_transpose(x, jnp.zeros((3, 3, 2, 1)), 2, output_padding=2)
    with pytest.raises(ValueError, match=r"kernel must be \(kh, kw, Cin = 2, Cout\)"):
        sp.conv_transpose(x, jnp.zeros((3, 3, 3, 1)))
    with pytest.raises(ValueError, match=r"size\[0\]"):
        sp.resize_bilinear(x, (0, 3))


def test_gradients_of_the_resampling_and_pooling_ops_match_finite_differences():
    """One float64 check through all of them (each is linear or piecewise linear in x)."""
    rng = np.random.default_rng(8)
    x, kernel = rng.normal(size=(1, 4, 6, 2)), rng.normal(size=(2, 2, 2, 3))

    def f(x, kernel):
        up = sp.resize_bilinear(x, (7, 5)).sum() + (sp.resize_nearest(x, (3, 9)) ** 2).sum()
        pooled = (sp.spatial_pyramid_pooling(x, (1, 3)) ** 2).sum() + sp.adaptive_pool(x, 2, "avg").sum() ** 2
        swin = (sp.window_reverse(sp.window_partition(sp.cyclic_shift(x, 1), 2), 2, 4, 6) ** 3).sum()
        return up + pooled + swin + (sp.conv_transpose(x, kernel, 2, 1, output_padding=1) ** 2).sum()

    check_vjp_against_finite_differences(f, (x, kernel), 0, eps=1e-6)
    check_vjp_against_finite_differences(f, (x, kernel), 1, eps=1e-6)
