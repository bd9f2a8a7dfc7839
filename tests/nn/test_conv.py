import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from jaxmodels.nn.conv import Conv2D, ConvTranspose2D, Downsample, GroupNorm, Upsample


def _conv_reference(x, k, b, stride, pad):
    x = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw, _, co = k.shape
    ho, wo = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, co))
    for i in range(ho):
        for j in range(wo):
            patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, k) + b
    return out


@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 1)])
def test_conv2d_matches_loop_reference_with_gradient(kernel, stride):
    conv = Conv2D(3, 5, kernel, stride=stride, rngs=nnx.Rngs(0))
    conv.bias.value = jnp.arange(5, dtype=jnp.float32) / 5
    x = np.random.default_rng(2).normal(size=(2, 6, 6, 3)).astype(np.float32)
    k, b = np.asarray(conv.kernel.value), np.asarray(conv.bias.value)
    y = conv(jnp.asarray(x))
    assert y.shape == (2, 6 // stride, 6 // stride, 5)
    np.testing.assert_allclose(y, _conv_reference(x, k, b, stride, kernel // 2), rtol=1e-5, atol=1e-5)
    graphdef, state = nnx.split(conv)
    check_grads(lambda a, s: nnx.merge(graphdef, s)(a), (jnp.asarray(x), state), order=1, modes=("rev",),
                atol=1e-2, rtol=1e-2)


def test_conv2d_zero_init_and_dtype_policy():
    conv = Conv2D(2, 4, 3, zero_init=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y = conv(jnp.ones((1, 4, 4, 2)))
    assert y.dtype == jnp.bfloat16 and conv.kernel.value.dtype == jnp.float32
    assert not np.any(np.asarray(y, np.float32))
    with pytest.raises(ValueError, match="input channels"):
        conv(jnp.ones((1, 4, 4, 3)))


def test_group_norm_matches_numpy():
    x = np.random.default_rng(4).normal(size=(2, 3, 5, 8)).astype(np.float32) * 2 + 1
    gn = GroupNorm(4, 8, rngs=nnx.Rngs(0))
    gn.scale.value = jnp.linspace(0.5, 2, 8)
    gn.bias.value = jnp.linspace(-1, 1, 8)
    g = x.astype(np.float64).reshape(2, 3, 5, 4, 2)
    ref = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + 1e-6)
    ref = ref.reshape(x.shape) * np.linspace(0.5, 2, 8) + np.linspace(-1, 1, 8)
    np.testing.assert_allclose(gn(jnp.asarray(x)), ref, rtol=1e-4, atol=1e-5)
    assert GroupNorm(4, 8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(jnp.asarray(x)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="divisible by num_groups"):
        GroupNorm(3, 8, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("method", ["nearest_conv", "pixel_shuffle", "transposed"])
def test_upsample_shapes_and_dtypes(method):
    up = Upsample(4, 6, method=method, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y = up(jnp.ones((2, 3, 5, 4)))
    assert y.shape == (2, 6, 10, 6) and y.dtype == jnp.bfloat16


def test_nearest_upsample_is_conv_of_repeated_pixels():
    up = Upsample(2, 3, method="nearest_conv", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (1, 2, 2, 2))
    np.testing.assert_allclose(up(x), up.conv(jnp.repeat(jnp.repeat(x, 2, 1), 2, 2)), rtol=1e-6)


@pytest.mark.parametrize("method", ["conv", "avg_pool", "pixel_unshuffle"])
def test_downsample_shapes_and_dtypes(method):
    down = Downsample(4, 6, method=method, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y = down(jnp.ones((2, 6, 4, 4)))
    assert y.shape == (2, 3, 2, 6) and y.dtype == jnp.bfloat16


def test_avg_pool_downsample_is_block_mean():
    x = np.random.default_rng(6).normal(size=(1, 4, 6, 3)).astype(np.float32)
    y = Downsample(3, 3, method="avg_pool", rngs=nnx.Rngs(0))(jnp.asarray(x))
    np.testing.assert_allclose(y, x.reshape(1, 2, 2, 3, 2, 3).mean(axis=(2, 4)), rtol=1e-6)


def test_unknown_methods_are_rejected():
    with pytest.raises(ValueError, match="method='bilinear' is not valid; choose one of \\['nearest_conv'"):
        Upsample(2, 2, method="bilinear", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="method='max' is not valid; choose one of \\['conv'"):
        Downsample(2, 2, method="max", rngs=nnx.Rngs(0))


def test_conv_transpose2d_with_kernel_equal_to_stride_paints_one_block_per_input_pixel():
    """Segment Anything's upscaling (kernel 2, stride 2): out[2i + a, 2j + b] = x[i, j] @ K[a, b] + bias."""
    conv = ConvTranspose2D(3, 4, 2, stride=2, rngs=nnx.Rngs(0))
    conv.bias.value = jnp.arange(4, dtype=jnp.float32)
    x = np.random.default_rng(5).normal(size=(2, 3, 5, 3))
    k = np.asarray(conv.kernel.value, np.float64)
    expected = np.einsum("nijc,abco->niajbo", x, k).reshape(2, 6, 10, 4) + np.arange(4)
    with jax.default_matmul_precision("float32"):
        y = conv(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    # LeCun normal with one output pixel's fan-in, in_channels · (kernel / stride)² = 3
    big = ConvTranspose2D(50, 40, 2, stride=2, rngs=nnx.Rngs(1))
    assert abs(float(jnp.std(big.kernel.value)) * np.sqrt(50) - 1) < 0.1
    with pytest.raises(ValueError, match="stride"):
        ConvTranspose2D(3, 4, 2, stride=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expected 3 input channels"):
        conv(jnp.ones((1, 2, 2, 4)))
