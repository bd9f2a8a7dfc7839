"""The generic train and eval steps: pure functions of (state, batch), jitted with explicit shardings.

A train state is a dict {"step": int32 scalar, "params": pure dict of arrays, "opt_state": optax state}.
The model structure (an NNX GraphDef) is static; parameters flow in as arrays (the functional
`nnx.split` -> `jax.jit` -> `nnx.merge` pattern), so one compiled step serves every task.
`make_train_step` is the step of the "replicated" and "fsdp" strategies (XLA partitions it by the
state's shardings); `make_zero_train_step` is the "zero" strategy's, with explicit collectives.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from jaxmodels.parallel import zero
from jaxmodels.train.optimizer import global_norm

# loss_fn(model, batch) -> (loss, metrics); a batch is a pytree of arrays with the examples on axis 0.
LossFn = Callable[[nnx.Module, Any], tuple[jax.Array, dict[str, jax.Array]]]


def _model(graphdef: nnx.GraphDef, params) -> nnx.Module:
    return nnx.merge(graphdef, nnx.State(params))


def _loss_and_grad(graphdef: nnx.GraphDef, loss_fn: LossFn, grad_accum_steps: int):
    """f(params, batch) -> ((loss, metrics), grads) for batch (b, ...), averaged over grad_accum_steps
    micro-batches of b / grad_accum_steps rows (the same update as one batch of b rows)."""

    def loss_and_grad(params, batch):
        return jax.value_and_grad(lambda p: loss_fn(_model(graphdef, p), batch), has_aux=True)(params)

    if grad_accum_steps == 1:
        return loss_and_grad

    def accumulated(params, batch):
        # Micro-batch m takes rows m, m + A, m + 2A, ...: each device's shard splits evenly.
        micro = jax.tree.map(
            lambda x: x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

        def body(acc, mb):
            return jax.tree.map(jnp.add, acc, loss_and_grad(params, mb)), None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(loss_and_grad, params, first))
        total, _ = jax.lax.scan(body, zeros, micro)
        return jax.tree.map(lambda x: x / grad_accum_steps, total)

    return accumulated


def _keep_if(finite: jax.Array, new, old):
    """`new` where `finite` (a scalar bool) else `old`, leaf by leaf: the non-finite guard."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum_steps: int = 1):
    """Returns step(state, batch) -> (state, metrics).

    The batch (global_batch, ...) is split into grad_accum_steps micro-batches whose gradients
    are averaged (same update as one large batch). If the loss or gradient norm is not finite
    the parameters and optimizer state are kept unchanged (metrics["nonfinite"] = 1) and the
    step counter still advances; the loop decides whether to skip or halt.
    """
    loss_and_grad = _loss_and_grad(graphdef, loss_fn, grad_accum_steps)

    def step(state, batch):
        (loss, metrics), grads = loss_and_grad(state["params"], batch)
        grad_norm = global_norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = {"step": state["step"] + 1, "params": _keep_if(finite, params, state["params"]),
                     "opt_state": _keep_if(finite, opt_state, state["opt_state"])}
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, learning_rate=schedule(state["step"]),
                       nonfinite=(~finite).astype(jnp.int32))
        return new_state, metrics

    return step


def make_zero_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                         schedule: optax.Schedule, grad_accum_steps: int, *, mesh: Mesh, state_specs,
                         batch_spec, axis_name: str = "data", collectives: str = "ring"):
    """The "zero" strategy's step(state, batch) -> (state, metrics): ZeRO stages 1-2 (Rajbhandari
    et al. 2020) as a `jax.shard_map` over `axis_name` (D devices) with explicit collectives.

    State (global view): "params" replicated; "opt_state" built by `optimizer.init` on
    `zero.padded_flat_tree(params, D)`, its parameter-shaped leaves (D * c,) sharded over
    `axis_name` as `state_specs` says, so each device stores 1/D of it. `optimizer` must have been
    made with `axis_name` (global-norm clipping over the full gradient). On each device:

      1. loss and gradients of its local batch (b / D rows; grad_accum_steps micro-batches),
      2. gradients laid out as one (D, C) bucket (`zero.bucket`), reduce-scattered and divided by
         D: this device keeps row i, the batch-mean gradient of its 1/D shard (ZeRO-2),
      3. grad_norm = sqrt(psum over devices of the shard's sum of squares) (the full norm),
      4. AdamW on the shard: its row of the flattened, padded parameters and its opt-state shard,
      5. the non-finite guard (loss and grad_norm are the same on every device, so all keep or
         all update), then the (C,) parameter rows are all-gathered and unflattened.

    `collectives` picks the reduce-scatter/all-gather pair (`zero.COLLECTIVES`). Metrics are
    averaged over devices (like micro-batches): equal to `make_train_step`'s for metrics that are
    means over examples (loss, bits/byte), as are grad_norm, learning_rate and nonfinite.
    """
    loss_and_grad = _loss_and_grad(graphdef, loss_fn, grad_accum_steps)
    reduce_scatter, all_gather = zero.COLLECTIVES[collectives]

    def local_step(state, batch):
        params, n = state["params"], lax.axis_size(axis_name)
        (loss, metrics), grads = loss_and_grad(params, batch)
        loss, metrics = lax.pmean((loss, metrics), axis_name)
        grad_row = reduce_scatter(zero.bucket(grads, n).reshape(-1), axis_name) / n
        grad_shard = zero.split_row(grad_row, params, n)
        grad_norm = global_norm(grad_shard, axis_name)
        param_shard = zero.local_shard(params, n, lax.axis_index(axis_name))
        updates, opt_state = optimizer.update(grad_shard, state["opt_state"], param_shard)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_shard = _keep_if(finite, optax.apply_updates(param_shard, updates), param_shard)
        gathered = all_gather(jnp.concatenate(jax.tree.leaves(new_shard)), axis_name).reshape(n, -1)
        new_state = {"step": state["step"] + 1, "params": zero.unbucket(gathered, params),
                     "opt_state": _keep_if(finite, opt_state, state["opt_state"])}
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, learning_rate=schedule(state["step"]),
                       nonfinite=(~finite).astype(jnp.int32))
        return new_state, metrics

    # check_vma=False: gradients of the replicated params stay per-device (no implicit psum), and
    # ring collectives (ppermute) are not proven replicated; outputs with spec P() are equal on all devices.
    return jax.shard_map(local_step, mesh=mesh, in_specs=(state_specs, batch_spec),
                         out_specs=(state_specs, P()), check_vma=False)


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn):
    """Returns eval_step(params, batch) -> metrics (the task's loss metrics on one batch)."""

    def eval_step(params, batch):
        return loss_fn(_model(graphdef, params), batch)[1]

    return eval_step
