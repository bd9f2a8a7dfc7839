import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmodels.ops import flows

VECTOR_AND_IMAGE = [(3, 6), (2, 4, 4, 2)]
IMAGES = [(2, 4, 4, 2), (1, 2, 6, 4)]


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """Round trips to 1e-5 need float32 matmuls, not TF32 (the GPU's default)."""
    with jax.default_matmul_precision("float32"):
        yield


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _mixer(seed, shape):
    """A nonlinear per-example map of the whole example (B, ...) -> (B, ...): leaks through a mask would show."""
    d = math.prod(shape[1:])
    w = _normal(seed, (d, d), 1 / math.sqrt(d))
    return lambda h: jnp.tanh(h.reshape(h.shape[0], -1) @ w.astype(h.dtype)).reshape(h.shape)


def _mask(shape, flip=False):
    return flows.checkerboard_mask(*shape[1:3], flip=flip) if len(shape) == 4 else flows.channel_mask(shape[-1])


def _additive(shape):
    return lambda x, inverse: flows.additive_coupling(x, _mask(shape), _mixer(1, shape), inverse=inverse)


def _affine(mask):
    def build(shape):
        t, s = _mixer(2, shape), _mixer(3, shape)
        return lambda x, inverse: flows.affine_coupling(x, mask(shape), lambda h: (t(h), s(h)), inverse=inverse)
    return build


def _conv_params(shape, seed=4):
    """LU parameters moved away from the orthogonal start, so that the log-det is not 0."""
    P, L, U, s = flows.invertible_conv_1x1_init(jax.random.key(seed), shape[-1])
    c = shape[-1]
    return P, L + _normal(seed, (c, c), 0.3), U + _normal(seed + 1, (c, c), 0.3), s * jnp.exp(_normal(seed + 2, c, .3))


# name -> (shapes, build(shape) -> bijector(x, inverse), the input's sampler(shape))
CASES = {
    "additive_coupling": (VECTOR_AND_IMAGE, _additive, _normal),
    "affine_coupling_checkerboard": (IMAGES, _affine(_mask), _normal),
    "affine_coupling_flipped_channels": (
        VECTOR_AND_IMAGE, _affine(lambda shape: flows.channel_mask(shape[-1], flip=True)), _normal),
    "diagonal_scaling": (VECTOR_AND_IMAGE, lambda shape: lambda x, inverse: flows.diagonal_scaling(
        x, _normal(5, shape[1:], 0.5), inverse=inverse), _normal),
    "actnorm": (VECTOR_AND_IMAGE, lambda shape: lambda x, inverse: flows.actnorm(
        x, _normal(6, shape[-1:]), _normal(7, shape[-1:], 0.5), inverse=inverse), _normal),
    "invertible_conv_1x1": (VECTOR_AND_IMAGE, lambda shape: lambda x, inverse: flows.invertible_conv_1x1(
        x, *_conv_params(shape), inverse=inverse), _normal),
    "squeeze": (IMAGES, lambda shape: lambda x, inverse: flows.squeeze(x, inverse=inverse), _normal),
    "logit_transform": (VECTOR_AND_IMAGE, lambda shape: lambda x, inverse: flows.logit_transform(
        x, alpha=0.05, inverse=inverse),
        lambda seed, shape: jnp.asarray(np.random.default_rng(seed).uniform(0.01, 0.99, shape), jnp.float32)),
}
CASE_SHAPES = [(name, shape) for name, (shapes, _, _) in CASES.items() for shape in shapes]


@functools.cache
def _build(name, shape):
    """The case's bijector, jitted and shared by the tests (one compilation instead of one per operation per test:
    the tests stay fast), and a random input."""
    _, build, sample = CASES[name]
    return jax.jit(build(shape), static_argnames="inverse"), sample(sum(shape), shape)


@pytest.mark.parametrize("name,shape", CASE_SHAPES)
def test_inverse_of_forward_is_identity(name, shape):
    bijector, x = _build(name, shape)
    y, log_det = bijector(x, inverse=False)
    x_again, log_det_inverse = bijector(y, inverse=True)
    assert log_det.shape == log_det_inverse.shape == shape[:1] and log_det.dtype == jnp.float32
    assert y.dtype == x.dtype and math.prod(y.shape) == math.prod(x.shape)
    np.testing.assert_allclose(x_again, x, atol=2e-5)
    np.testing.assert_allclose(log_det + log_det_inverse, 0, atol=2e-5)


def _autodiff_log_dets(bijector, x, inverse):
    """log|det J| of each example's flattened map by jax.jacfwd and slogdet."""
    def flat_map(v):
        return bijector(v.reshape((1,) + x.shape[1:]), inverse=inverse)[0].ravel()
    return jax.jit(lambda x: jnp.linalg.slogdet(jax.vmap(jax.jacfwd(flat_map))(x.reshape(x.shape[0], -1)))[1])(x)


@pytest.mark.parametrize("name,shape", CASE_SHAPES)
def test_log_det_is_slogdet_of_autodiff_jacobian(name, shape):
    bijector, x = _build(name, shape)
    y, log_det = bijector(x, inverse=False)
    np.testing.assert_allclose(log_det, _autodiff_log_dets(bijector, x, False), atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(bijector(y, inverse=True)[1], _autodiff_log_dets(bijector, y, True), atol=2e-4,
                               rtol=1e-5)


@pytest.mark.parametrize("shape", VECTOR_AND_IMAGE)
def test_nice_additive_coupling_has_log_det_zero_and_keeps_masked_half(shape):
    x = _normal(0, shape)
    y, log_det = _additive(shape)(x, inverse=False)
    np.testing.assert_array_equal(log_det, 0)
    mask = _mask(shape)
    np.testing.assert_array_equal(mask * y, mask * x)


def test_bfloat16_input_keeps_its_dtype_and_float32_log_det():
    x = _normal(0, (2, 4, 4, 2)).astype(jnp.bfloat16)
    bias, log_scale = flows.actnorm_init(x)
    for y, log_det in (flows.actnorm(x, bias, log_scale), flows.diagonal_scaling(x, log_scale),
                       flows.invertible_conv_1x1(x, *_conv_params(x.shape)), flows.squeeze(x)):
        assert y.dtype == jnp.bfloat16 and log_det.dtype == jnp.float32


def test_masks():
    np.testing.assert_array_equal(flows.checkerboard_mask(2, 3)[..., 0], [[1, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(flows.checkerboard_mask(2, 3, flip=True)[..., 0], [[0, 1, 0], [1, 0, 1]])
    np.testing.assert_array_equal(flows.channel_mask(4), [1, 1, 0, 0])
    np.testing.assert_array_equal(flows.channel_mask(4, flip=True), [0, 0, 1, 1])


@pytest.mark.parametrize("shape", VECTOR_AND_IMAGE)
def test_actnorm_init_gives_zero_mean_unit_variance_per_channel(shape):
    x = _normal(0, shape, 3.0) + jnp.arange(shape[-1], dtype=jnp.float32) * 2
    bias, log_scale = flows.actnorm_init(x)
    assert bias.shape == log_scale.shape == shape[-1:]
    y, _ = flows.actnorm(x, bias, log_scale)
    axes = tuple(range(len(shape) - 1))
    np.testing.assert_allclose(y.mean(axes), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(axes), 1, atol=1e-4)


@pytest.mark.parametrize("channels", [1, 4])
def test_conv_1x1_starts_orthogonal_and_lu_log_det_is_slogdet(channels):
    P, L, U, s = flows.invertible_conv_1x1_init(jax.random.key(channels), channels)
    w = np.asarray(flows.lu_weight(P, L, U, s), np.float64)
    np.testing.assert_allclose(w @ w.T, np.eye(channels), atol=1e-5)
    assert set(np.unique(P)) <= {0, 1} and (P.sum(0) == 1).all() and (P.sum(1) == 1).all()  # a permutation
    shape = (2, 3, 2, channels)
    P, L, U, s = _conv_params(shape, seed=channels)
    assembled = np.asarray(P, np.float64) @ (np.tril(L, -1) + np.eye(channels)) @ (np.triu(U, 1) + np.diag(s))
    np.testing.assert_allclose(flows.lu_weight(P, L, U, s), assembled, atol=1e-5)
    _, log_det = flows.invertible_conv_1x1(_normal(0, shape), P, L, U, s)
    np.testing.assert_allclose(log_det, 3 * 2 * np.linalg.slogdet(assembled)[1], rtol=1e-5, atol=1e-5)


def test_squeeze_moves_each_2x2_block_into_channels():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    y, _ = flows.squeeze(x)
    assert y.shape == (2, 2, 3, 12)
    np.testing.assert_array_equal(y[1, 1, 2], np.asarray(x[1, 2:4, 4:6]).ravel())


def test_factor_out_and_in():
    x = _normal(0, (2, 2, 2, 6))
    h, z = flows.factor_out(x)
    assert h.shape == z.shape == (2, 2, 2, 3)
    np.testing.assert_array_equal(flows.factor_in(h, z), x)


def test_gaussian_log_prob_matches_float64_formula():
    z, mean, log_scale = _normal(0, (3, 2, 2, 2)), _normal(1, (3, 2, 2, 2)), _normal(2, (2, 2, 2), 0.3)
    zs, m, ls = (np.asarray(a, np.float64) for a in (z, mean, log_scale))
    expected = (-0.5 * ((zs - m) / np.exp(ls)) ** 2 - ls - 0.5 * np.log(2 * np.pi)).sum((1, 2, 3))
    np.testing.assert_allclose(flows.gaussian_log_prob(z, mean, log_scale), expected, rtol=1e-5)
    np.testing.assert_allclose(flows.standard_normal_log_prob(z),
                               (-0.5 * zs**2 - 0.5 * np.log(2 * np.pi)).sum((1, 2, 3)), rtol=1e-5)


def test_bits_per_dim_of_a_standard_normal_flow_is_the_closed_form():
    key = jax.random.key(0)
    pixels = jax.random.randint(key, (3, 4, 4, 1), 0, 256)
    y = flows.uniform_dequantize(jax.random.key(1), pixels)
    assert y.dtype == jnp.float32 and bool(jnp.all((y >= pixels / 256) & (y < (pixels + 1) / 256)))
    d = 16
    bpd = flows.bits_per_dim(flows.standard_normal_log_prob(y), d, num_bins=256)  # the identity flow, z = y
    yd = np.asarray(y, np.float64).reshape(3, d)
    expected = (0.5 * (yd**2).sum(1) + d / 2 * np.log(2 * np.pi) + d * np.log(256)) / (d * np.log(2))
    np.testing.assert_allclose(bpd, expected, rtol=1e-6)
    # y = 0 everywhere: 8 bits for the bins plus log2(2 pi) / 2 for the density at 0
    zero_bpd = flows.bits_per_dim(flows.standard_normal_log_prob(jnp.zeros((1, d))), d, num_bins=256)
    np.testing.assert_allclose(zero_bpd, 8 + 0.5 * np.log2(2 * np.pi), rtol=1e-6)
    np.testing.assert_allclose(flows.bits_per_dim(jnp.array([-d * np.log(2)]), d), 1.0)


def test_variational_dequantize_with_identity_flow_is_logistic_normal():
    x = jnp.array([[0, 255, 17], [3, 4, 5]], jnp.int32)
    y, log_q = flows.variational_dequantize(jax.random.key(0), x, lambda eps, _: (eps, jnp.zeros(eps.shape[:1])))
    assert bool(jnp.all((y >= x / 256) & (y < (x + 1) / 256)))
    u = np.asarray(y, np.float64) * 256 - np.asarray(x)
    h = np.log(u) - np.log1p(-u)
    expected = (-0.5 * h**2 - 0.5 * np.log(2 * np.pi) - np.log(u) - np.log1p(-u)).sum(1)
    np.testing.assert_allclose(log_q, expected, rtol=1e-4, atol=1e-4)


def _composite_log_likelihood(x, params):
    """logit -> actnorm -> affine coupling -> 1x1 conv -> squeeze -> additive coupling -> factor out, with a
    learned Gaussian for the factored half (mean from the kept half) and a standard normal for the rest."""
    shape = x.shape
    z, total = flows.logit_transform(x)
    for step in (
        lambda h: flows.actnorm(h, params["bias"], params["log_scale"]),
        lambda h: flows.affine_coupling(h, _mask(shape), lambda m: (jnp.tanh(m * params["t"]), m * params["s"])),
        lambda h: flows.invertible_conv_1x1(h, params["P"], params["L"], params["U"], params["conv_s"]),
        flows.squeeze,
        lambda h: flows.additive_coupling(h, flows.channel_mask(4 * shape[-1]), jnp.sin),
    ):
        z, log_det = step(z)
        total = total + log_det
    kept, factored = flows.factor_out(z)
    return total + flows.gaussian_log_prob(factored, kept, 0.1) + flows.standard_normal_log_prob(kept)


def test_composite_flow_log_likelihood_gradients_match_finite_differences():
    shape = (2, 2, 2, 2)
    with jax.enable_x64(True):
        P, L, U, s = (a.astype(jnp.float64) for a in _conv_params(shape))
        params = {"bias": _normal(1, 2).astype(jnp.float64), "log_scale": _normal(2, 2, 0.3).astype(jnp.float64),
                  "t": _normal(3, shape[1:]).astype(jnp.float64), "s": _normal(4, shape[1:], 0.3).astype(jnp.float64),
                  "P": P, "L": L, "U": U, "conv_s": s}
        x = jnp.asarray(np.random.default_rng(0).uniform(0.1, 0.9, shape))
        log_likelihood = _composite_log_likelihood(x, params)
        assert log_likelihood.shape == (2,) and log_likelihood.dtype == jnp.float64
        check_grads(jax.jit(lambda x, p: _composite_log_likelihood(x, p).sum()), (x, params), order=1, modes=("rev",),
                    atol=1e-5, rtol=1e-5)


def test_bijectors_jit():
    x = _normal(0, (2, 4, 4, 2))
    y, log_det = jax.jit(lambda x: flows.logit_transform(jax.nn.sigmoid(x)))(x)
    np.testing.assert_allclose(y, flows.logit_transform(jax.nn.sigmoid(x))[0], atol=1e-5)
    assert jax.jit(flows.squeeze)(x)[0].shape == (2, 2, 2, 8)


def test_bad_input():
    with pytest.raises(ValueError, match="channels must be even"):
        flows.channel_mask(5)
    with pytest.raises(ValueError, match="even number of channels"):
        flows.factor_out(jnp.zeros((2, 4, 4, 3)))
    with pytest.raises(ValueError, match="height and width divisible by factor=2"):
        flows.squeeze(jnp.zeros((2, 5, 4, 1)))
    with pytest.raises(ValueError, match="divisible by factor"):
        flows.squeeze(jnp.zeros((2, 4, 4, 6)), inverse=True)
    with pytest.raises(ValueError, match=r"x must be batched, \(B, H, W, C\)"):
        flows.squeeze(jnp.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match=r"x must hold values in \[0.0, 1.0\]"):
        flows.logit_transform(jnp.array([[0.5, jnp.nan]]))
    with pytest.raises(ValueError, match="x must hold values in"):
        flows.logit_transform(jnp.array([[0.5, jnp.inf]]), inverse=True)
    with pytest.raises(ValueError, match="alpha"):
        flows.logit_transform(jnp.full((1, 2), 0.5), alpha=0.5)
    with pytest.raises(ValueError, match="x must hold values"):
        flows.uniform_dequantize(jax.random.key(0), jnp.array([[3, 256]]))
    with pytest.raises(ValueError, match="mask"):
        flows.affine_coupling(jnp.zeros((2, 4, 4, 2)), jnp.ones((3, 3, 1)), lambda h: (h, h))
    with pytest.raises(ValueError, match="log_scale must have shape"):
        flows.actnorm(jnp.zeros((2, 3)), jnp.zeros(3), jnp.zeros(2))
    with pytest.raises(ValueError, match="U must have shape"):
        flows.invertible_conv_1x1(jnp.zeros((2, 3)), jnp.eye(3), jnp.eye(3), jnp.eye(2), jnp.ones(3))
    with pytest.raises(ValueError, match="num_dims"):
        flows.bits_per_dim(jnp.zeros(2), 0)


def _dynamics(seed, d):
    """A nonlinear per-example map (B, d) -> (B, d) and its float64 NumPy Jacobian's trace."""
    w1, w2 = np.random.default_rng(seed).normal(size=(2, d, d)) / math.sqrt(d)
    fn = lambda z: jnp.tanh(z @ jnp.asarray(w1, z.dtype)) @ jnp.asarray(w2, z.dtype)

    def trace(z):  # d/dz [tanh(z W1) W2]_j = sum_k W1[i, k] (1 - tanh^2) W2[k, j]; its trace, per example
        g = 1 - np.tanh(z @ w1) ** 2
        return np.einsum("ik,bk,ki->b", w1, g, w2)

    return fn, trace


@pytest.mark.parametrize("d", [2, 5])
def test_exact_divergence_is_the_jacobian_trace(d):
    fn, trace = _dynamics(0, d)
    z = _normal(1, (3, d))
    out, div = flows.exact_divergence(fn, z)
    np.testing.assert_allclose(out, fn(z), rtol=1e-6)
    np.testing.assert_allclose(div, trace(np.asarray(z, np.float64)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("noise", ["rademacher", "normal"])
def test_hutchinson_divergence_is_unbiased(noise):
    """The mean over many probes is the exact trace, within 4 standard errors; one probe is not."""
    fn, trace = _dynamics(2, 6)
    z = _normal(3, (2, 6))
    draw = jax.random.rademacher if noise == "rademacher" else jax.random.normal
    probes = 4000
    estimates = jax.jit(jax.vmap(lambda k: flows.hutchinson_divergence(fn, z, draw(k, z.shape, jnp.float32))[1]))(
        jax.random.split(jax.random.key(0), probes))
    exact = trace(np.asarray(z, np.float64))
    stderr = np.asarray(estimates.std(0)) / math.sqrt(probes)
    assert np.all(stderr > 1e-3)
    np.testing.assert_array_less(np.abs(np.asarray(estimates.mean(0)) - exact), 4 * stderr)
    assert np.abs(np.asarray(estimates[0]) - exact).max() > 10 * stderr.max()


def test_divergence_bad_input():
    with pytest.raises(ValueError, match="noise must have z's shape"):
        flows.hutchinson_divergence(jnp.sin, jnp.ones((2, 3)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="map z"):
        flows.exact_divergence(lambda z: z[:, :1], jnp.ones((2, 3)))
