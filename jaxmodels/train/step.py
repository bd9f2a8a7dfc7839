"""The generic train and eval steps: pure functions of (state, batch), jitted with explicit shardings.

A train state is a dict {"step": int32 scalar, "params": pure dict of arrays, "opt_state": optax state}.
The model structure (an NNX GraphDef) is static; parameters flow in as arrays (the functional
`nnx.split` -> `jax.jit` -> `nnx.merge` pattern), so one compiled step serves every task.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

LossFn = Callable[[nnx.Module, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def _model(graphdef: nnx.GraphDef, params) -> nnx.Module:
    return nnx.merge(graphdef, nnx.State(params))


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum_steps: int = 1):
    """Returns step(state, batch) -> (state, metrics).

    The batch (global_batch, ...) is split into grad_accum_steps micro-batches whose gradients
    are averaged (same update as one large batch). If the loss or gradient norm is not finite
    the parameters and optimizer state are kept unchanged (metrics["nonfinite"] = 1) and the
    step counter still advances; the loop decides whether to skip or halt.
    """

    def loss_and_grad(params, batch):
        def f(p):
            return loss_fn(_model(graphdef, p), batch)

        return jax.value_and_grad(f, has_aux=True)(params)

    def accumulated(params, batch):
        if grad_accum_steps == 1:
            return loss_and_grad(params, batch)
        # Micro-batch m takes rows m, m + A, m + 2A, ...: each device's shard splits evenly.
        micro = batch.reshape(batch.shape[0] // grad_accum_steps, grad_accum_steps, *batch.shape[1:]).swapaxes(0, 1)

        def body(acc, mb):
            out = loss_and_grad(params, mb)
            return jax.tree.map(jnp.add, acc, out), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(loss_and_grad, params, micro[0]))
        total, _ = jax.lax.scan(body, zeros, micro)
        return jax.tree.map(lambda x: x / grad_accum_steps, total)

    def step(state, batch):
        (loss, metrics), grads = accumulated(state["params"], batch)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = {"step": state["step"] + 1, "params": keep(params, state["params"]),
                     "opt_state": keep(opt_state, state["opt_state"])}
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, learning_rate=schedule(state["step"]),
                       nonfinite=(~finite).astype(jnp.int32))
        return new_state, metrics

    return step


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn):
    """Returns eval_step(params, batch) -> metrics (the task's loss metrics on one batch)."""

    def eval_step(params, batch):
        return loss_fn(_model(graphdef, params), batch)[1]

    return eval_step
