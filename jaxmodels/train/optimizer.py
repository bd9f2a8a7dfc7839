"""Optimizer from config: AdamW with linear warmup then cosine/linear/constant decay, clipping, and per-parameter
learning-rate multipliers (muP, `scale_by_multipliers`)."""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxmodels.ops.checks import non_negative_int, one_of, real_in_range

SCHEDULES = ("cosine", "linear", "constant")


def check_optimizer_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming config.optimizer.X for a field outside its range: learning_rate > 0, b1 and b2 in
    [0, 1) (Adam's averages diverge at 1 and beyond), eps > 0, weight_decay >= 0, warmup_steps an int >= 0,
    min_lr_ratio in [0, 1], grad_clip_norm >= 0 (0 = off), schedule one of SCHEDULES."""
    prefix = "config.optimizer"
    one_of(f"{prefix}.schedule", config.schedule, SCHEDULES)
    non_negative_int(f"{prefix}.warmup_steps", config.warmup_steps)
    for name, low, high, include_low, include_high in (
            ("learning_rate", 0, float("inf"), False, False), ("b1", 0, 1, True, False), ("b2", 0, 1, True, False),
            ("eps", 0, float("inf"), False, False), ("weight_decay", 0, float("inf"), True, False),
            ("min_lr_ratio", 0, 1, True, True), ("grad_clip_norm", 0, float("inf"), True, False)):
        real_in_range(f"{prefix}.{name}", config[name], low, high, include_low=include_low, include_high=include_high)


def learning_rate_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to config.learning_rate over warmup_steps, then decay to
    learning_rate * min_lr_ratio at num_steps (cosine: Loshchilov & Hutter 2017)."""
    one_of("optimizer.schedule", config.schedule, SCHEDULES)
    peak, warmup = config.learning_rate, config.warmup_steps
    end = peak * config.min_lr_ratio
    decay_steps = max(num_steps - warmup, 1)
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.min_lr_ratio)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
    """Weight decay on matrices only: norms' scales and biases (ndim < 2) are not decayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def global_norm(tree, axis_name: str | None = None) -> jax.Array:
    """sqrt(sum of squares of every element of `tree`) as a float32 scalar.

    With `axis_name` (inside `shard_map`) each device holds a disjoint shard of the tree, and the
    shards' sums of squares are psum'd over that axis: the norm of the whole, unsharded tree.
    """
    squares = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))
    return jnp.sqrt(squares if axis_name is None else jax.lax.psum(squares, axis_name))


def clip_by_global_norm(max_norm: float, axis_name: str | None = None) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` (Pascanu et al. 2013) whose norm may span shards on several devices.

    Updates are scaled by max_norm / norm when norm >= max_norm, with norm = `global_norm(updates,
    axis_name)`: over the full gradient even when each device along `axis_name` holds 1/D of it (ZeRO).
    """

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates, axis_name)
        clip = lambda t: jnp.where(norm < max_norm, t, (t / norm.astype(t.dtype)) * max_norm)
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def scale_by_multipliers(multipliers) -> optax.GradientTransformation:
    """Multiply each leaf of the updates by its multiplier: `multipliers` is a pytree of the parameters' structure
    (a dict of floats for a pure-dict parameter tree) with a real number > 0 per leaf, e.g. a model's
    `lr_multipliers()` (muP's per-layer Adam learning rates, Yang et al. 2021, Tensor Programs V, Table 3).
    Stateless; ValueError naming `multipliers` for a value <= 0 or not finite, or (at trace time) for a tree that
    does not match the updates'."""
    for path, m in jax.tree_util.tree_leaves_with_path(multipliers):
        real_in_range(f"multipliers{jax.tree_util.keystr(path)}", m, 0, include_low=False)
    structure = jax.tree.structure(multipliers)

    def update(updates, state, params=None):
        del params
        if jax.tree.structure(updates) != structure:
            raise ValueError(f"multipliers must have the structure of the updates {jax.tree.structure(updates)}, "
                             f"got {structure}")
        return jax.tree.map(lambda m, u: u * jnp.asarray(m, u.dtype), multipliers, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int, *, decay=decay_mask, lr_multipliers=None,
                   axis_name: str | None = None) -> optax.GradientTransformation:
    """AdamW (Loshchilov & Hutter 2019) after global-norm clipping (config.grad_clip_norm, 0 = off).

    decay: which parameters get weight decay, as optax's `mask` (a function of the params, or a tree
    of bools; ZeRO passes `decay_mask` of the unsharded params because its shards are all 1-D).
    lr_multipliers: None (every parameter at the schedule's learning rate) or a pytree of the parameters'
      structure with one real > 0 per leaf (the model's `lr_multipliers()`, e.g. muP): each parameter's Adam step
      is multiplied by its multiplier (`scale_by_multipliers`); the decoupled weight decay, lr * weight_decay * p,
      is not, as in the `mup` package's MuAdamW, which keeps lr * weight_decay per step.
    axis_name: the mesh axis the updates are sharded over (ZeRO), so that clipping sees the full norm.
    """
    schedule = learning_rate_schedule(config, num_steps)
    parts = [clip_by_global_norm(config.grad_clip_norm, axis_name)] if config.grad_clip_norm > 0 else []
    if lr_multipliers is None:
        parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                                 weight_decay=config.weight_decay, mask=decay))
    else:  # optax.adamw's chain with the multipliers between Adam's step and the weight decay
        parts += [optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
                  scale_by_multipliers(lr_multipliers),
                  optax.add_decayed_weights(config.weight_decay, decay),
                  optax.scale_by_learning_rate(schedule)]
    return optax.chain(*parts)
