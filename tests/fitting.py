"""A few Adam steps on a model, for the tests that check a module or task can learn."""

import jax
import optax
from flax import nnx


def adam_losses(model, loss_fn, steps, learning_rate=1e-2):
    """Loss before each of `steps` jitted Adam steps on model's nnx.Param leaves (other state held fixed).

    loss_fn(model) -> scalar loss.
    """
    graphdef, params = nnx.split(model, nnx.Param)
    rest = nnx.state(model, nnx.Not(nnx.Param))
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest)))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = optimizer.init(params), []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return losses
