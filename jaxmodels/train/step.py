"""The generic train and eval steps: pure functions of (state, batch), jitted with explicit shardings.

A train state is a dict {"step": int32 scalar, "params": pure dict of arrays, "opt_state": optax state}, and
"loss_scale" (`jaxmodels.ops.precision` state) when config.precision scales the loss (`jaxmodels.train.loss_scaling`).
The model structure (an NNX GraphDef) is static; parameters flow in as arrays (the functional
`nnx.split` -> `jax.jit` -> `nnx.merge` pattern), so one compiled step serves every task.
`make_train_step` is the step of every data-parallel strategy (`jaxmodels.parallel.strategy`): XLA partitions
it by the state's shardings, and the strategy's hooks add explicit collectives where it has them (ZeRO).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxmodels.ops import precision
from jaxmodels.parallel.strategy import Strategy
from jaxmodels.train.loss_scaling import LossScaling
from jaxmodels.train.optimizer import global_norm

# loss_fn(model, batch) -> (loss, metrics); a batch is a pytree of arrays with the examples on axis 0.
LossFn = Callable[[nnx.Module, Any], tuple[jax.Array, dict[str, jax.Array]]]


def _model(graphdef: nnx.GraphDef, params) -> nnx.Module:
    return nnx.merge(graphdef, nnx.State(params))


def _model_of(graphdef: nnx.GraphDef, reparametrize: Callable | None, frozen) -> Callable[..., nnx.Module]:
    """(params, draw) -> the model: `graphdef` merged with the params, or with reparametrize(params, frozen, draw)
    (fine-tuning: the trained params are adapters, `frozen` the pre-trained ones, `draw` the int32 (step,
    micro-batch, data shard) that its randomness, e.g. LoRA's dropout, is drawn from; `jaxmodels.train.finetune`)."""
    if reparametrize is None:
        return lambda params, draw: _model(graphdef, params)
    return lambda params, draw: _model(graphdef, reparametrize(params, frozen, draw))


def _loss_and_grad(model_of: Callable[..., nnx.Module], loss_fn: LossFn, grad_accum_steps: int):
    """f(params, batch, loss_scale, draw) -> ((loss, metrics), grads) of the model `model_of(params, draw)` for
    batch (b, ...), averaged over grad_accum_steps micro-batches of b / grad_accum_steps rows (the same update as
    one batch of b rows; micro-batch m sees draw with draw[1] = m). The gradients are those of the loss times the
    scale of `loss_scale` (an `ops.precision` state), divided by it; the loss is the task's."""

    def loss_and_grad(params, batch, loss_scale, draw):
        def scaled(p):
            loss, metrics = loss_fn(model_of(p, draw), batch)
            return precision.scale_loss(loss, loss_scale), (loss, metrics)

        (_, aux), grads = jax.value_and_grad(scaled, has_aux=True)(params)
        return aux, precision.unscale_grads(grads, loss_scale)

    if grad_accum_steps == 1:
        return loss_and_grad

    def accumulated(params, batch, loss_scale, draw):
        # Micro-batch m takes rows m, m + A, m + 2A, ...: each device's shard splits evenly.
        micro = jax.tree.map(
            lambda x: x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

        def body(acc, mb_and_index):
            mb, m = mb_and_index
            return jax.tree.map(jnp.add, acc, loss_and_grad(params, mb, loss_scale, draw.at[1].set(m))), None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(loss_and_grad, params, first, loss_scale, draw))
        total, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum_steps, dtype=jnp.int32)))
        return jax.tree.map(lambda x: x / grad_accum_steps, total)

    return accumulated


def _keep_if(finite: jax.Array, new, old):
    """`new` where `finite` (a scalar bool) else `old`, leaf by leaf: the non-finite guard."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum_steps: int = 1, *, strategy: Strategy | None = None,
                    state_specs=None, batch_spec=None, loss_scaling: LossScaling = LossScaling(),
                    reparametrize: Callable | None = None):
    """Returns step(state, batch) -> (state, metrics) of a data-parallel `strategy` (default: plain
    `Strategy`, "replicated", which XLA partitions by the state's shardings; "fsdp" is the same step).

    The batch (global_batch, ...) is split into grad_accum_steps micro-batches whose gradients
    are averaged (same update as one large batch). If the loss or gradient norm is not finite
    the parameters and optimizer state are kept unchanged (metrics["nonfinite"] = 1) and the
    step counter still advances; the loop decides whether to skip or halt.

    The strategy's hooks say where the update happens: `ZeRO` reduce-scatters the gradients, updates this
    device's 1/D shard of the flattened parameters with its shard of the optimizer state (which must then be
    built on `strategy.opt_layout(params)`, and `optimizer` made with axis_name=strategy.update_axis so that
    clipping sees the full norm) and all-gathers the result, inside `jax.shard_map` with `state_specs` and
    `batch_spec`. Metrics that are means over examples (loss, bits/byte), grad_norm, learning_rate and
    nonfinite are the same under every strategy.

    `loss_scaling` (config.precision, `jaxmodels.train.loss_scaling`), when enabled, reads the scale S from
    state["loss_scale"]: the gradients are those of S * loss divided by S, and the guard above is what skips an
    overflowing step; the scale's next value (backed off after such a step, grown after enough finite ones) is
    new_state["loss_scale"], and metrics["loss_scale"] the S of this step.

    Fine-tuning (`reparametrize`, e.g. `jaxmodels.train.finetune.FineTune.combine`): the state also holds
    "frozen", the pre-trained parameters, and the model is reparametrize(state["params"], state["frozen"], draw);
    only state["params"] (the adapters) is differentiated and updated, "frozen" comes back as it went in. draw is
    an int32 (3,): (step, micro-batch, data shard (the device's index along `strategy.update_axis`, 0 where XLA
    partitions the step)), distinct for every micro-batch and shard of the run, for the randomness of the
    reparametrisation (LoRA's dropout).
    """
    strategy = strategy or Strategy(mesh=None)

    def step(state, batch):
        params = state["params"]
        loss_scale = state["loss_scale"] if loss_scaling.enabled else precision.NoOpLossScale()
        loss_and_grad = _loss_and_grad(_model_of(graphdef, reparametrize, state.get("frozen")), loss_fn,
                                       grad_accum_steps)
        shard = jax.lax.axis_index(strategy.update_axis) if strategy.update_axis else 0
        draw = jnp.stack([state["step"], jnp.int32(0), jnp.asarray(shard, jnp.int32)]).astype(jnp.int32)
        (loss, metrics), grads = loss_and_grad(params, batch, loss_scale, draw)
        loss, metrics = strategy.mean_over_shards((loss, metrics))
        grads, param_shard = strategy.shard_update(grads, params)
        grad_norm = global_norm(grads, strategy.update_axis)
        updates, opt_state = optimizer.update(grads, state["opt_state"], param_shard)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_shard = _keep_if(finite, optax.apply_updates(param_shard, updates), param_shard)
        new_state = {**state, "step": state["step"] + 1, "params": strategy.gather_params(new_shard, params),
                     "opt_state": _keep_if(finite, opt_state, state["opt_state"])}
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, learning_rate=schedule(state["step"]),
                       nonfinite=(~finite).astype(jnp.int32))
        if loss_scaling.enabled:
            new_state["loss_scale"] = loss_scaling.update(loss_scale, finite)
            metrics["loss_scale"] = loss_scale.scale
        return new_state, metrics

    return strategy.wrap_step(step, state_specs=state_specs, batch_spec=batch_spec)


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn):
    """Returns eval_step(params, batch) -> metrics (the task's loss metrics on one batch)."""

    def eval_step(params, batch):
        return loss_fn(_model(graphdef, params), batch)[1]

    return eval_step
