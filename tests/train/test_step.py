import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from jaxmodels.train.optimizer import learning_rate_schedule, make_optimizer
from jaxmodels.train.step import make_train_step


class Linear(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.arange(6.0).reshape(3, 2) / 10)


def loss_fn(model, batch):
    pred = batch[:, :3] @ model.w.value
    loss = jnp.mean((pred - batch[:, 3:]) ** 2)
    return loss, {"loss": loss}


def _setup(accum=1, lr=0.1):
    model = Linear()
    graphdef, params = nnx.split(model)
    params = params.to_pure_dict()
    tx = optax.sgd(lr)
    schedule = optax.constant_schedule(lr)
    step = jax.jit(make_train_step(graphdef, loss_fn, tx, schedule, accum))
    state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params)}
    return step, state


def test_step_is_sgd_on_the_loss():
    step, state = _setup()
    batch = jax.random.normal(jax.random.key(0), (8, 5))
    new, metrics = step(state, batch)
    grad = jax.grad(lambda w: loss_fn(type("M", (), {"w": nnx.Param(w)})(), batch)[0])(state["params"]["w"])
    np.testing.assert_allclose(new["params"]["w"], state["params"]["w"] - 0.1 * grad, rtol=1e-6)
    assert int(new["step"]) == 1 and int(metrics["nonfinite"]) == 0
    np.testing.assert_allclose(metrics["grad_norm"], jnp.linalg.norm(grad), rtol=1e-6)


def test_gradient_accumulation_equals_full_batch():
    batch = jax.random.normal(jax.random.key(1), (8, 5))
    (s1, st1), (s4, st4) = _setup(1), _setup(4)
    a, ma = s1(st1, batch)
    b, mb = s4(st4, batch)
    np.testing.assert_allclose(a["params"]["w"], b["params"]["w"], rtol=1e-6)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)


def test_nonfinite_loss_keeps_state_and_is_reported():
    step, state = _setup()
    batch = jnp.ones((4, 5)).at[0, 0].set(jnp.nan)
    new, metrics = step(state, batch)
    assert int(metrics["nonfinite"]) == 1
    np.testing.assert_array_equal(new["params"]["w"], state["params"]["w"])
    assert int(new["step"]) == 1


def _opt_config(**kw):
    return ml_collections.ConfigDict(dict(learning_rate=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1,
                                          b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0) | kw)


def test_schedule_warmup_then_decay():
    sched = learning_rate_schedule(_opt_config(), 110)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(sched(5), 0.5)
    np.testing.assert_allclose(sched(10), 1.0)
    np.testing.assert_allclose(sched(110), 0.1, rtol=1e-5)
    np.testing.assert_allclose(learning_rate_schedule(_opt_config(schedule="linear"), 110)(60), 0.55, rtol=1e-5)
    with pytest.raises(ValueError, match="valid"):
        learning_rate_schedule(_opt_config(schedule="step"), 10)


def test_weight_decay_skips_vectors():
    params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
    tx = make_optimizer(_opt_config(warmup_steps=0, schedule="constant", learning_rate=0.1), 10)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.1 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["scale"], 0.0)
