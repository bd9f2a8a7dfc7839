"""Initialisers against theory: fans counted by hand, sample moments against the stated variance (4 standard errors),
bounds of the truncated normal and uniform, and the scales of depth, T5 and muP."""

import hashlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import lm_tiny
from jaxmodels.models import make_model
from jaxmodels.nn.param import fan_in_init
from jaxmodels.ops import init
from jaxmodels.train.loop import init_rngs

# Sample moments of n draws: |mean| <= 4 SE with SE = sqrt(var / n); |sample var - var| <= 4 SE with the SE of a
# variance sqrt((m4 - var^2) / n) from the sample's fourth moment. A correct initialiser fails one check with
# probability about 6e-5.
TOLERANCE_SE = 4.0


def _assert_moments(x, variance):
    x = np.asarray(x, np.float64).ravel()
    n = x.size
    assert abs(x.mean()) <= TOLERANCE_SE * math.sqrt(variance / n), (x.mean(), variance)
    m2, m4 = (x**2).mean(), (x**4).mean()
    assert abs(m2 - variance) <= TOLERANCE_SE * math.sqrt((m4 - m2**2) / n), (m2, variance)


@pytest.mark.parametrize("shape, axes, fans", [
    ((3, 5), {}, (3, 5)),                                               # dense (in, out)
    ((3, 3, 4, 8), {}, (36, 72)),                                        # conv (h, w, in, out)
    ((16, 4, 8), dict(in_axis=0, out_axis=(1, 2)), (16, 32)),           # attention query (embed, heads, head_dim)
    ((4, 8, 16), dict(in_axis=(0, 1), out_axis=2), (32, 16)),           # attention output (heads, head_dim, embed)
    ((6, 16, 32), dict(batch_axis=0), (16, 32)),                         # expert bank (experts, in, out)
    ((6, 16, 32), dict(in_axis=1, out_axis=-1, batch_axis=(0,)), (16, 32)),
    ((7,), dict(in_axis=0, out_axis=()), (7, 1)),                        # a vector: empty out_axis has fan 1
])
def test_compute_fans_for_multi_axis_shapes(shape, axes, fans):
    assert init.compute_fans(shape, **axes) == fans


@pytest.mark.parametrize("shape, axes, match", [
    ((3, 5), dict(in_axis=2), "in_axis"),
    ((3, 5), dict(out_axis=-3), "out_axis"),
    ((3, 5, 2), dict(in_axis=0, out_axis=(0, 1)), "distinct"),
    ((3, 5), dict(in_axis=0, out_axis=1, batch_axis=-1), "distinct"),
    ((0, 5), {}, "fan_in=0"),
])
def test_compute_fans_errors(shape, axes, match):
    with pytest.raises(ValueError, match=match):
        init.compute_fans(shape, **axes)


SHAPE = (512, 128)  # fan_in 512, fan_out 128, fan_avg 320: the modes' variances differ by far more than 4 SE
FAN = {"fan_in": 512, "fan_out": 128, "fan_avg": 320}


@pytest.mark.parametrize("distribution", init.DISTRIBUTIONS)
@pytest.mark.parametrize("family, variance", [
    (lambda d: init.glorot(d), 2 / (512 + 128)),
    (lambda d: init.he(d), 2 / 512),
    (lambda d: init.he(d, "fan_out"), 2 / 128),
    (lambda d: init.he(d, "fan_avg"), 2 / 320),
    (lambda d: init.lecun(d), 1 / 512),
    (lambda d: init.lecun(d, scale=3.0), 3 / 512),
    (lambda d: init.depth_scaled_residual(6, d), 1 / (2 * 6 * 512)),
])
def test_families_match_their_variance(family, variance, distribution):
    x = family(distribution)(jax.random.key(0), SHAPE)
    assert x.shape == SHAPE and x.dtype == jnp.float32
    _assert_moments(x, variance)


@pytest.mark.parametrize("mode", init.FAN_MODES)
def test_variance_scaling_on_an_attention_weight(mode):
    """(embed, heads, head_dim) = (32, 8, 64) with in_axis=0: fan_in 32, fan_out 512."""
    fans = {"fan_in": 32, "fan_out": 8 * 64, "fan_avg": (32 + 8 * 64) / 2}
    x = init.variance_scaling(2.0, mode, "normal", in_axis=0, out_axis=(1, 2))(jax.random.key(1), (32, 8, 64))
    _assert_moments(x, 2.0 / fans[mode])


def test_truncated_normal_has_the_requested_variance_and_its_bounds():
    variance = 0.7 / 256
    x = np.asarray(init.variance_scaling(0.7, "fan_in")(jax.random.key(2), (256, 512)))
    _assert_moments(x, variance)
    bound = 2 * math.sqrt(variance) / init.TRUNCATED_NORMAL_STD
    assert np.abs(x).max() <= bound * (1 + 1e-6)
    assert np.abs(x).max() > 0.95 * bound  # the tails are really there: not a narrower distribution
    # The correction constant is the std of N(0, 1) truncated to [-2, 2], computed independently.
    phi2, mass = math.exp(-2) / math.sqrt(2 * math.pi), math.erf(2 / math.sqrt(2))
    assert init.TRUNCATED_NORMAL_STD == pytest.approx(math.sqrt(1 - 4 * phi2 / mass), rel=1e-12)


def test_uniform_lies_within_its_limit():
    x = np.asarray(init.glorot("uniform")(jax.random.key(3), SHAPE))
    limit = math.sqrt(6 / (512 + 128))  # Glorot & Bengio 2010, eq. 16
    assert np.abs(x).max() <= limit and np.abs(x).max() > 0.99 * limit


def test_fan_in_init_is_lecun_over_the_leading_dims():
    key, shape = jax.random.key(4), (4, 8, 16)
    expected = init.lecun(scale=0.25, in_axis=(0, 1), out_axis=2)(key, shape)
    np.testing.assert_array_equal(fan_in_init(fan_in_dims=2, scale=0.25)(key, shape, jnp.float32), expected)


# lm_tiny's initial parameters from the code before the models took their initialisers from ops/init.py, on the
# CPU under tests/conftest.py's XLA flags: sha256 over (path, float32 bytes) of every tensor, and the float64 sums
# of squares and of absolute values. XLA's optimisation level changes erfinv's last bits (the truncated normal),
# and another backend may too: the digest holds for these flags on the CPU, the sums to 1e-6 anywhere.
LM_TINY_INIT_SHA256 = "f360493801cef8dcd99c2794db82df519eba660f48123f20169d38b3033903a6"
LM_TINY_INIT_SUM_SQUARES, LM_TINY_INIT_SUM_ABS = 38779.79590011832, 72560.48491501175
TEST_XLA_FLAG = "--xla_backend_optimization_level=0"


def test_lm_tiny_initial_params_are_unchanged():
    """The default experiment's model draws the same initial parameters as before the switch to ops/init.py."""
    config = lm_tiny.get_config()
    params = nnx.state(make_model(config.model, init_rngs(config)), nnx.Param).to_pure_dict()
    digest, squares, absolute = hashlib.sha256(), 0.0, 0.0
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        value = np.asarray(value)
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(value.tobytes())
        squares += float(np.sum(value.astype(np.float64) ** 2))
        absolute += float(np.sum(np.abs(value.astype(np.float64))))
    assert (squares, absolute) == pytest.approx((LM_TINY_INIT_SUM_SQUARES, LM_TINY_INIT_SUM_ABS), rel=1e-6)
    if jax.default_backend() == "cpu" and TEST_XLA_FLAG in os.environ.get("XLA_FLAGS", ""):
        assert digest.hexdigest() == LM_TINY_INIT_SHA256


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtype_is_the_requested_one_and_draws_are_the_float32_ones_rounded(dtype):
    key, initializer = jax.random.key(5), init.he("normal")
    x = initializer(key, (64, 32), dtype)
    assert x.dtype == dtype
    np.testing.assert_array_equal(x, initializer(key, (64, 32)).astype(dtype))


def test_jit_and_vmap_over_keys():
    initializer = init.glorot()
    keys = jax.random.split(jax.random.key(6), 3)
    batched = jax.jit(jax.vmap(lambda k: initializer(k, (8, 4))))(keys)
    assert batched.shape == (3, 8, 4)
    np.testing.assert_allclose(batched[1], initializer(keys[1], (8, 4)), rtol=1e-6)
    assert not np.allclose(batched[0], batched[1])


def test_t5_query_compensates_for_the_missing_one_over_sqrt_d():
    """Unscaled logits q·k with T5's query init have the variance of q·k / sqrt(d) with LeCun q (both ~1)."""
    embed, heads, head_dim, n = 64, 2, 32, 4096
    axes = dict(in_axis=0, out_axis=(1, 2))
    kq, kk, kx = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(kx, (n, embed))
    w_k = init.lecun("normal", **axes)(kk, (embed, heads, head_dim))
    k = jnp.einsum("ne,ehd->nhd", x, w_k)
    for w_q, logit_scale in ((init.t5_query(head_dim, **axes)(kq, (embed, heads, head_dim)), 1.0),
                             (init.lecun("normal", **axes)(kq, (embed, heads, head_dim)), head_dim**-0.5)):
        _assert_moments(w_q, 1 / (embed * (head_dim if logit_scale == 1.0 else 1)))
        logits = jnp.einsum("nhd,mhd->hnm", jnp.einsum("ne,ehd->nhd", x, w_q), k[:256]) * logit_scale
        assert 0.6 < float(jnp.var(logits)) < 1.6  # O(1), not O(head_dim) = 32 or O(1 / head_dim)


def test_residual_scale_is_gpt2s():
    assert init.residual_scale(12) == pytest.approx(1 / math.sqrt(24))
    assert init.residual_scale(12, residual_branches_per_layer=1) == pytest.approx(1 / math.sqrt(12))


def test_mup_scale():
    # (init_variance, adam_learning_rate, multiplier): Table 3
    assert init.mup_scale("input", 4.0) == (1.0, 1.0, 1.0)
    assert init.mup_scale("hidden", 4.0) == (1.0, 0.25, 1.0)
    assert init.mup_scale("output", 4.0) == (0.25, 0.25, 1.0)
    assert init.mup_scale("output", 1.0) == (1.0, 1.0, 1.0)  # the base model is standard parametrisation
    # TP-V's Table 8 readout: constant init variance (the base's), a 1/width_mult output multiplier, learning rate 1
    assert init.mup_scale("output", 4.0, output_multiplier=True) == (4.0, 1.0, 0.25)
    assert init.mup_scale("output", 1.0, output_multiplier=True) == (1.0, 1.0, 1.0)
    assert init.mup_scale("input", 4.0, output_multiplier=True) == (1.0, 1.0, 1.0)
    assert init.mup_scale("hidden", 4.0, output_multiplier=True) == (1.0, 0.25, 1.0)


def test_mup_readout_formulations_agree_for_adam():
    """Table 3's readout (variance 1/(m fan_in), Adam lr / m) and Table 8's (variance m / fan_in, multiplier 1/m,
    lr 1) give the same effective weight W' = multiplier * W at init, of variance 1 / (m fan_in), and the same W'
    after Adam steps on a least-squares readout (Adam's update does not depend on the gradient's scale)."""
    m, lr, shape = 4.0, 1e-2, (64, 8)
    kx, ky, kw = jax.random.split(jax.random.key(3), 3)
    x, y = jax.random.normal(kx, (32, shape[0])), jax.random.normal(ky, (32, shape[1]))
    effective = []
    for output_multiplier in (False, True):
        s = init.mup_scale("output", m, output_multiplier=output_multiplier)
        w = init.lecun("normal", scale=s.init_variance)(kw, shape)
        loss = lambda w: jnp.mean((x @ (s.multiplier * w) - y) ** 2)
        tx = optax.adam(lr * s.adam_learning_rate, eps=1e-12)
        state = tx.init(w)
        effective.append([s.multiplier * w])
        for _ in range(3):
            updates, state = tx.update(jax.grad(loss)(w), state)
            w = optax.apply_updates(w, updates)
            effective[-1].append(s.multiplier * w)
    _assert_moments(effective[0][0], 1 / (m * shape[0]))
    for a, b in zip(*effective):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(jnp.max(jnp.abs(effective[0][-1] - effective[0][0]))) > 0.5 * lr / m  # the steps moved W'


@pytest.mark.parametrize("make, error, match", [
    (lambda: init.variance_scaling(1.0, "fan_sum"), ValueError, "mode='fan_sum'"),
    (lambda: init.variance_scaling(1.0, "fan_in", "cauchy"), ValueError, "distribution='cauchy'"),
    (lambda: init.variance_scaling(0.0), ValueError, "scale"),
    (lambda: init.variance_scaling(float("nan")), ValueError, "scale"),
    (lambda: init.variance_scaling("1"), TypeError, "scale"),
    (lambda: init.he(scale=-1.0), ValueError, "scale"),
    (lambda: init.glorot("gaussian"), ValueError, "distribution"),
    (lambda: init.residual_scale(0), ValueError, "num_layers"),
    (lambda: init.depth_scaled_residual(2.5), TypeError, "num_layers"),
    (lambda: init.t5_query(0), ValueError, "head_dim"),
    (lambda: init.mup_scale("readout", 2.0), ValueError, "layer"),
    (lambda: init.mup_scale("output", 0.0), ValueError, "width_mult"),
    (lambda: init.lecun()(jax.random.key(0), (3, 4), jnp.int32), TypeError, "floating"),
    (lambda: init.lecun(in_axis=0, out_axis=0)(jax.random.key(0), (3, 4)), ValueError, "distinct"),
])
def test_errors_name_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()
