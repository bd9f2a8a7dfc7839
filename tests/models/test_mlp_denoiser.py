"""MLPDenoiser: shapes, dtype policy, parameter count, zero output at init, errors, a few steps reduce a loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxmodels.models.mlp_denoiser import MLPDenoiser, mlp_denoiser_parameter_count


def _perturbed(model, seed=0):
    """The model with every parameter moved off its init (so zero-initialised layers carry signal)."""
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return nnx.merge(graphdef, jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                                         for x, k in zip(leaves, keys)]))


@pytest.mark.parametrize("num_classes", [0, 3])
def test_shapes_count_and_zero_init(num_classes):
    kw = dict(in_features=3, hidden_dim=32, num_layers=2, frequency_dim=16, num_classes=num_classes)
    model = MLPDenoiser(**kw, rngs=nnx.Rngs(0))
    x, t = jax.random.normal(jax.random.key(1), (5, 3)), jnp.arange(5) * 100.0
    labels = jnp.array([0, 1, 2, 3, 0]) if num_classes else None
    out = model(x, t, labels)
    assert out.shape == (5, 3) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)  # zero-initialised output layer
    count = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == mlp_denoiser_parameter_count(**kw)


def test_bfloat16_compute_returns_float32_and_conditioning_matters():
    model = _perturbed(MLPDenoiser(in_features=2, hidden_dim=16, num_layers=1, frequency_dim=8, num_classes=2,
                                   dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    x = jnp.ones((2, 2))
    out = model(x, jnp.array([10.0, 10.0]), jnp.array([0, 1]))
    assert out.dtype == jnp.float32
    assert not np.allclose(out[0], out[1])  # labels change the output
    other_t = model(x, jnp.array([500.0, 500.0]), jnp.array([0, 1]))
    assert not np.allclose(out, other_t)  # so does the noise level


def test_errors():
    model = MLPDenoiser(in_features=2, hidden_dim=8, num_layers=1, frequency_dim=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x must be"):
        model(jnp.ones((4, 3)), jnp.ones(4))
    with pytest.raises(ValueError, match="t must be"):
        model(jnp.ones((4, 2)), jnp.ones(3))
    with pytest.raises(ValueError, match="num_classes=0"):
        model(jnp.ones((4, 2)), jnp.ones(4), jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="frequency_dim"):
        MLPDenoiser(frequency_dim=7, rngs=nnx.Rngs(0))


def test_a_few_steps_reduce_a_regression_loss():
    model = MLPDenoiser(in_features=2, hidden_dim=32, num_layers=2, frequency_dim=16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (64, 2))
    t = jax.random.uniform(jax.random.key(1), (64,)) * 1000
    target = jnp.sin(x) * (t[:, None] / 1000)
    graphdef, params = nnx.split(model)
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    def loss_fn(p):
        return jnp.mean((nnx.merge(graphdef, p)(x, t) - target) ** 2)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    first = float(loss_fn(params))
    for _ in range(30):
        params, opt_state, _ = step(params, opt_state)
    assert float(loss_fn(params)) < 0.5 * first
