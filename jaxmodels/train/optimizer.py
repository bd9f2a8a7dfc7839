"""Optimizer from config: AdamW with linear warmup then cosine/linear/constant decay, clipping."""

import jax
import ml_collections
import optax

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to config.learning_rate over warmup_steps, then decay to
    learning_rate * min_lr_ratio at num_steps (cosine: Loshchilov & Hutter 2017)."""
    if config.schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={config.schedule!r}; valid: {list(SCHEDULES)}")
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


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """AdamW (Loshchilov & Hutter 2019) after global-norm clipping (config.grad_clip_norm, 0 = off)."""
    schedule = learning_rate_schedule(config, num_steps)
    parts = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
