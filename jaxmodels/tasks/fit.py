"""`fit`: the one small training loop for auxiliary models (an evaluation classifier, an autoencoder, a
ControlNet) that are trained outside the configured trainer (`jaxmodels.train`).

It uses the functional NNX pattern (`nnx.split` -> a `jax.jit` pure step -> `nnx.merge`) with any optax
optimizer; the caller chooses the optimizer and schedule. No sharding, checkpoints or non-finite guard:
for those, write a config and use the trainer.
"""

from collections.abc import Callable, Iterable
from typing import Any

import jax
import optax
from flax import nnx


def fit(model: nnx.Module, loss_fn: Callable[[nnx.Module, Any], tuple[jax.Array, dict]], batches: Iterable, *,
        num_steps: int, optimizer: optax.GradientTransformation,
        callback: Callable[[int, jax.Array], None] | None = None) -> nnx.Module:
    """Trains `model`'s `nnx.Param`s by `optimizer` on the first `num_steps` batches of `batches`.

    Each step is one jitted update params <- params + optimizer.update(grad loss, ...) (optax's
    `apply_updates`); the model's other state (if any) is passed through unchanged.

    Args:
      model: the module to train (not modified; the trained copy is returned).
      loss_fn: (model, batch) -> (scalar loss, metrics dict), the library's loss convention
        (`jaxmodels.train.step.LossFn`); metrics are ignored.
      batches: an iterable of batches (pytrees of arrays); it must yield at least `num_steps` of them.
      num_steps: the number of updates, >= 0.
      optimizer: an optax transformation, schedule included (e.g. `optax.adamw(schedule, ...)`).
      callback: optional callback(step, loss) after each update, with the 0-based step and the step's loss
        (a device scalar: converting it to float waits for the step).

    Returns:
      the trained model.
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps!r}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, rest, batch):
        (loss, _), grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch),
                                              has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    done = 0
    for i, batch in zip(range(num_steps), batches):
        params, opt_state, loss = step(params, opt_state, rest, batch)
        done += 1
        if callback is not None:
            callback(i, loss)
    if done < num_steps:
        raise ValueError(f"batches ran out after {done} of num_steps={num_steps} batches")
    return nnx.merge(graphdef, params, rest)
