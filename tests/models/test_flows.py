"""The flow models: inverse ∘ forward = id, log-det == slogdet of the autodiff Jacobian, log_prob, sampling,
data-dependent init, parameter count, config checks, and a few steps of maximum likelihood."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from jaxmodels.models import MODELS, check_model_config
from jaxmodels.models.flows import CNF, NICE, Glow, RealNVP
from jaxmodels.ops import flows as F


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    with jax.default_matmul_precision("float32"):
        yield


def _random(factory, seed=0, scale=0.2):
    """factory()'s model built abstractly, every parameter then drawn as scale·N(0, 1) on the host: a generic
    invertible map (the zero-initialised last layers would make the identity), without compiling initialisers."""
    graphdef, state = nnx.split(nnx.eval_shape(factory))
    rng = np.random.default_rng(seed)
    return nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(scale * rng.normal(size=a.shape), a.dtype), state))


def _x(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


MODELS_UNDER_TEST = {
    "nice": lambda: NICE(input_shape=(4, 4, 1), num_couplings=4, hidden_dim=8, num_hidden=2, rngs=nnx.Rngs(0)),
    "realnvp_vector": lambda: RealNVP(input_shape=(2,), num_couplings=3, hidden_dim=8, rngs=nnx.Rngs(0)),
    "realnvp_image": lambda: RealNVP(input_shape=(4, 4, 1), num_scales=2, num_couplings=1, hidden_dim=4,
                                     num_blocks=1, rngs=nnx.Rngs(0)),
    "glow": lambda: Glow(input_shape=(4, 4, 1), num_levels=2, num_steps=1, hidden_dim=4, rngs=nnx.Rngs(0)),
    "cnf": lambda: CNF(input_shape=(2,), hidden_dims=(8,), solver="heun", num_steps=8, rngs=nnx.Rngs(0)),
}


def _initialized(model, x):
    """`model.initialize(x)` (actnorm's data-dependent start) in one jitted call."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def initialize(state, x):
        m = nnx.merge(graphdef, state)
        m.initialize(x)
        return nnx.state(m)

    nnx.update(model, initialize(state, x))
    return model


def _built(name):
    """The model with random parameters (actnorm's too: no data-dependent start needed), and x (3, *input_shape)."""
    model = _random(MODELS_UNDER_TEST[name])
    return model, _x((3, *model.input_shape))


def _jit(model, fn):
    """fn(model, *args) jitted with the model's state as an argument (one compilation, no eager dispatch)."""
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
    return lambda *args: jitted(state, *args)


def _round_trip_and_autodiff_log_det(model, x, jacobian):
    """(z, log_det, inverse(z), its log_det, slogdet of each example's autodiff Jacobian of the forward map)."""
    z, log_det = model.forward(x)
    back, log_det_inverse = model.inverse(z)
    flat = lambda v: model.forward(v.reshape(1, *x.shape[1:]))[0].reshape(-1)
    autodiff = jax.vmap(lambda row: jnp.linalg.slogdet(jacobian(flat)(row))[1])(x.reshape(x.shape[0], -1))
    return z, log_det, back, log_det_inverse, autodiff


@pytest.mark.parametrize("name", sorted(MODELS_UNDER_TEST))
def test_inverse_of_forward_is_identity_and_log_det_is_slogdet_of_the_autodiff_jacobian(name):
    model, x = _built(name)
    # diffrax's default adjoint (RecursiveCheckpointAdjoint) is a custom_vjp: the CNF has reverse mode only.
    jacobian = jax.jacrev if name == "cnf" else jax.jacfwd
    z, log_det, back, log_det_inverse, autodiff = _jit(model, lambda m, x: _round_trip_and_autodiff_log_det(
        m, x, jacobian))(x)
    assert z.shape == x.shape and log_det.shape == (3,)
    assert float(jnp.max(jnp.abs(z - x))) > 1e-2  # a real map, not the identity of the zero-initialised start
    assert float(jnp.max(jnp.abs(log_det))) > 1e-2
    # The CNF's backward solve inverts its forward one, and its integrated trace is the discretised map's log-det,
    # up to the solver's error (Heun, 8 steps: ~1e-4 here).
    atol = 5e-4 if name == "cnf" else 2e-4
    np.testing.assert_allclose(back, x, atol=atol)
    np.testing.assert_allclose(log_det_inverse, -log_det, atol=atol)
    np.testing.assert_allclose(log_det, autodiff, atol=atol)


def test_log_prob_is_the_change_of_variables_and_sampling_inverts_the_scaled_prior():
    model, x = _built("realnvp_vector")
    key = jax.random.key(3)
    k_z, _ = jax.random.split(key)

    def run(m, x):
        z, log_det = m.forward(x)
        return (m.log_prob(x), F.standard_normal_log_prob(z) + log_det, m.sample(key, 5, temperature=0.5),
                m.inverse(0.5 * jax.random.normal(k_z, (5, 2)))[0], m.sample(key, 4, temperature=0.0),
                m.inverse(jnp.zeros((1, 2)))[0])

    log_prob, expected, samples, expected_samples, cold, mode_image = _jit(model, run)(x)
    np.testing.assert_allclose(log_prob, expected, rtol=1e-6)
    np.testing.assert_allclose(samples, expected_samples, atol=1e-6)
    # T = 0: every sample is the image of the prior's mode
    np.testing.assert_allclose(cold, jnp.broadcast_to(mode_image, cold.shape), atol=1e-6)
    assert float(jnp.abs(mode_image).max()) > 1e-2


def test_glow_initialize_sets_actnorm_from_the_data():
    model = _random(lambda: Glow(input_shape=(4, 4, 1), num_levels=1, num_steps=1, hidden_dim=4, rngs=nnx.Rngs(0)))
    x = 3.0 + 2.0 * _x((16, 4, 4, 1))
    out = _initialized(model, x).levels[0].post[0](F.squeeze(x)[0])[0]
    np.testing.assert_allclose(out.mean((0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std((0, 1, 2)), 1.0, atol=1e-3)


def test_cnf_hutchinson_needs_a_key_and_estimates_the_exact_log_det():
    kw = dict(input_shape=(2,), hidden_dims=(8,), solver="heun", num_steps=4)
    exact = _random(lambda: CNF(trace="exact", rngs=nnx.Rngs(0), **kw))
    estimated = _random(lambda: CNF(trace="hutchinson", rngs=nnx.Rngs(0), **kw))
    x = _x((2, 2))
    with pytest.raises(ValueError, match="needs key"):
        jax.eval_shape(lambda: estimated.forward(x))
    probes = _jit(estimated, lambda m, keys: jax.vmap(lambda k: m.forward(x, key=k)[1])(keys))(
        jax.random.split(jax.random.key(0), 256))
    z_exact, log_det = _jit(exact, lambda m: m.forward(x))()
    assert float(jnp.std(probes)) > 1e-3  # a real estimate, with variance
    np.testing.assert_allclose(probes.mean(0), log_det, atol=4 * float(probes.std(0).max()) / 16 + 1e-4)
    np.testing.assert_allclose(_jit(estimated, lambda m: m.forward(x, key=jax.random.key(1))[0])(), z_exact, atol=1e-6)
    assert estimated.num_function_evaluations == 8


def test_nice_parameter_count():
    d, h, nh, k = 16, 8, 2, 4
    model = NICE(input_shape=(4, 4, 1), num_couplings=k, hidden_dim=h, num_hidden=nh, rngs=nnx.Rngs(0))
    count = sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == k * (d * h + h + (nh - 1) * (h * h + h) + h * d + d) + d


@pytest.mark.parametrize("name, fields, message", [
    ("realnvp", dict(input_shape=(3,)), "even D"),
    ("realnvp", dict(input_shape=(4, 4, 1), num_scales=3), "divisible by 4"),
    ("glow", dict(input_shape=(6, 6, 1), num_levels=2), "divisible by 4"),
    ("glow", dict(input_shape=(4,)), r"image \(H, W, C\)"),
    ("cnf", dict(solver="rk4"), "config.model.solver"),
    ("cnf", dict(trace="sometimes"), "config.model.trace"),
    ("nice", dict(input_shape=(2, 2)), r"\(D,\) or \(H, W, C\)"),
])
def test_check_config_names_the_field(name, fields, message):
    defaults = {"nice": dict(input_shape=(4,), num_couplings=2, hidden_dim=4, num_hidden=1),
                "realnvp": dict(input_shape=(2,), num_scales=1, num_couplings=2, hidden_dim=4, num_blocks=1),
                "glow": dict(input_shape=(4, 4, 1), num_levels=1, num_steps=1, hidden_dim=4),
                "cnf": dict(input_shape=(2,), hidden_dims=(4,), solver="heun", num_steps=2, rtol=0.0, atol=1e-5,
                            max_steps=10, trace="auto", noise="rademacher", time_length=1.0)}[name]
    config = ml_collections.ConfigDict(dict(name=name, dtype="float32", param_dtype="float32",
                                            **{**defaults, **fields}))
    assert name in MODELS
    with pytest.raises(ValueError, match=message):
        check_model_config(config)


def test_maximum_likelihood_steps_raise_the_log_likelihood():
    model = RealNVP(input_shape=(2,), num_couplings=4, hidden_dim=16, rngs=nnx.Rngs(0))
    data = _x((256, 2)) * jnp.array([2.0, 0.3]) + jnp.array([1.0, -1.0])
    graphdef, params = nnx.split(model)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: -jnp.mean(nnx.merge(graphdef, p).log_prob(data)))(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(30):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.5, losses
