"""jaxmodels.tasks.fit: the auxiliary-model training loop reduces a loss, and is one plain optax loop."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxmodels.tasks.fit import fit


def _regression(seed=0, n=64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3).astype(np.float32)
    return x, y


def _mse(model, batch):
    return jnp.mean(jnp.square(model(batch["x"]) - batch["y"])), {}


def test_fit_reduces_a_loss_and_reports_every_step():
    x, y = _regression()
    batches = itertools.repeat({"x": x, "y": y})
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    before = float(_mse(model, {"x": x, "y": y})[0])
    seen = []
    trained = fit(model, _mse, batches, num_steps=200, optimizer=optax.adamw(0.05),
                  callback=lambda i, loss: seen.append((i, float(loss))))
    assert [i for i, _ in seen] == list(range(200))
    assert seen[0][1] == pytest.approx(before, rel=1e-6)  # the loss is taken before each update
    assert float(_mse(trained, {"x": x, "y": y})[0]) < 1e-3 * before
    np.testing.assert_array_equal(model.kernel.value, nnx.Linear(3, 1, rngs=nnx.Rngs(0)).kernel.value)  # untouched


def test_fit_equals_a_hand_written_optax_loop():
    x, y = _regression(1)
    optimizer = optax.adamw(optax.cosine_decay_schedule(0.01, 5), weight_decay=1e-4)
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model)
    opt_state = optimizer.init(params)
    for _ in range(5):
        grads = jax.grad(lambda p: _mse(nnx.merge(graphdef, p), {"x": x, "y": y})[0])(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    trained = fit(model, _mse, itertools.repeat({"x": x, "y": y}), num_steps=5, optimizer=optimizer)
    np.testing.assert_allclose(trained.kernel.value, params["kernel"].value, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(trained.bias.value, params["bias"].value, rtol=1e-6, atol=1e-7)


def test_fit_checks_steps_and_batches():
    x, y = _regression()
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    assert fit(model, _mse, [], num_steps=0, optimizer=optax.sgd(0.1)).kernel.shape == (3, 1)
    with pytest.raises(ValueError, match="ran out after 2 of num_steps=3"):
        fit(model, _mse, [{"x": x, "y": y}] * 2, num_steps=3, optimizer=optax.sgd(0.1))
    with pytest.raises(ValueError, match="num_steps"):
        fit(model, _mse, [], num_steps=-1, optimizer=optax.sgd(0.1))
