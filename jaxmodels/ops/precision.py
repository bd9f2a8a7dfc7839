"""Mixed precision as pure functions: a precision policy and loss scaling (Micikevicius et al. 2018, "Mixed
Precision Training").

A `Policy` names three dtypes: parameters are stored in `param` (float32 master weights), arithmetic runs in
`compute`, and a model's outputs are returned in `output`. Its casts touch only floating leaves of a pytree, so
integer token ids and masks pass through.

float16 has 5 exponent bits: gradients below 2^-24 flush to zero. Loss scaling (§3.2) multiplies the loss by S
before differentiation, so the gradients are S times larger and stay representable, and divides them by S before
the optimizer. Dynamic loss scaling picks S as large as overflow allows (NVIDIA apex, PyTorch `GradScaler`): on
a step whose gradients hold inf or NaN, skip the update, halve S and restart the count; after `growth_interval`
finite steps in a row, double S. bfloat16 has float32's exponent range and needs no scaling (`NoOpLossScale`).

The loss-scale state is a NamedTuple of arrays (a pytree), so it lives in the train state, passes through
`jax.jit` and is checkpointed with it. The functions dispatch on its type (static), never on its values. Skipping
the optimizer update is the train step's non-finite guard (`jaxmodels.train.step`, or `optax.apply_if_finite`
around an optimizer); these functions give it the scaled loss, the unscaled gradients and the next scale.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmodels.ops.checks import one_of, positive_int, real_in_range

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _cast_floating(tree, dtype):
    """Cast every leaf of `tree` with a floating dtype to `dtype`; other leaves are returned as they are."""
    cast = lambda x: x.astype(dtype) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(cast, tree)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Precision policy from dtype names in DTYPES: `param` (storage of parameters), `compute` (arithmetic) and
    `output` (what a model returns; None means `compute`). Hashable, so it can be a static argument of jit.
    Raises ValueError for an unknown name, naming the field."""
    param: str = "float32"
    compute: str = "float32"
    output: str | None = None

    def __post_init__(self):
        for field in ("param", "compute"):
            one_of(field, getattr(self, field), DTYPES)
        object.__setattr__(self, "output", one_of("output", self.output or self.compute, DTYPES))

    @property
    def param_dtype(self) -> jnp.dtype:
        return jnp.dtype(DTYPES[self.param])

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(DTYPES[self.compute])

    @property
    def output_dtype(self) -> jnp.dtype:
        return jnp.dtype(DTYPES[self.output])

    @property
    def needs_loss_scaling(self) -> bool:
        """Whether gradients pass through float16 (parameters or arithmetic), where small ones underflow."""
        return "float16" in (self.param, self.compute)

    def cast_to_param(self, tree):
        """`tree` with its floating leaves in the param dtype (e.g. gradients back onto master weights)."""
        return _cast_floating(tree, self.param_dtype)

    def cast_to_compute(self, tree):
        """`tree` with its floating leaves in the compute dtype (parameters and inputs before the forward pass)."""
        return _cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree):
        """`tree` with its floating leaves in the output dtype (a model's outputs)."""
        return _cast_floating(tree, self.output_dtype)


class NoOpLossScale(NamedTuple):
    """No loss scaling (float32, bfloat16): the loss and gradients pass unchanged and `update` keeps it."""


class StaticLossScale(NamedTuple):
    """A fixed loss scale S (Micikevicius et al. 2018, §3.2): `scale` float32 ()."""
    scale: jax.Array


class DynamicLossScale(NamedTuple):
    """Dynamic loss scale: `scale` float32 () and `good_steps` int32 (), the finite steps since the last change."""
    scale: jax.Array
    good_steps: jax.Array


LossScale = NoOpLossScale | StaticLossScale | DynamicLossScale


def _initial_scale(scale: float) -> jax.Array:
    return jnp.asarray(real_in_range("scale", scale, 0.0, include_low=False), jnp.float32)


def static_loss_scale(scale: float) -> StaticLossScale:
    """A `StaticLossScale` of `scale` (> 0, finite)."""
    return StaticLossScale(_initial_scale(scale))


def dynamic_loss_scale(scale: float = 2.0**15) -> DynamicLossScale:
    """A `DynamicLossScale` starting at `scale` (> 0, finite; 2^15 as PyTorch's GradScaler starts at 2^16
    and the float16 maximum is 65504) with no good steps."""
    return DynamicLossScale(_initial_scale(scale), jnp.zeros((), jnp.int32))


def loss_scale_for(policy: Policy, scale: float = 2.0**15) -> LossScale:
    """The loss scale a policy needs: dynamic from `scale` when gradients pass through float16, else no-op."""
    return dynamic_loss_scale(scale) if policy.needs_loss_scaling else NoOpLossScale()


def scale_loss(loss: jax.Array, state: LossScale) -> jax.Array:
    """S * loss in the loss's dtype (any shape; S = 1 for `NoOpLossScale`, which returns `loss` itself)."""
    if isinstance(state, NoOpLossScale):
        return loss
    return loss * state.scale.astype(loss.dtype)


def unscale_grads(grads, state: LossScale):
    """Gradients of the scaled loss divided by S, each leaf multiplied by 1/S in float32 and cast back to its
    own dtype (the pytree `grads` is returned as it is for `NoOpLossScale`). Inf and NaN stay non-finite."""
    if isinstance(state, NoOpLossScale):
        return grads
    inv_scale = 1.0 / state.scale
    return jax.tree.map(lambda g: (g.astype(jnp.float32) * inv_scale).astype(g.dtype), grads)


def all_finite(tree) -> jax.Array:
    """bool (): whether every element of every leaf of `tree` is finite (True for an empty tree)."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves], bool)) if leaves else jnp.asarray(True)


def update(state: LossScale, finite: jax.Array, *, growth_interval: int = 2000, growth_factor: float = 2.0,
           backoff_factor: float = 0.5, min_scale: float = 1.0) -> LossScale:
    """The loss scale after a step whose gradients were `finite` (bool (), from `all_finite`).

    Dynamic (Micikevicius et al. 2018, §3.2; the schedule of apex and PyTorch's GradScaler): if not finite,
    S <- max(backoff_factor * S, min_scale) and good_steps <- 0; if finite and this is the `growth_interval`-th
    finite step in a row, S <- growth_factor * S (unless that overflows float32) and good_steps <- 0; else
    good_steps + 1. Static and no-op states come back unchanged. Arguments are checked for every state:
    growth_interval an int >= 1, growth_factor > 1, backoff_factor in (0, 1), min_scale > 0.
    """
    positive_int("growth_interval", growth_interval)
    real_in_range("growth_factor", growth_factor, 1.0, include_low=False)
    real_in_range("backoff_factor", backoff_factor, 0.0, 1.0, include_low=False, include_high=False)
    real_in_range("min_scale", min_scale, 0.0, include_low=False)
    if not isinstance(state, DynamicLossScale):
        return state
    good_steps = state.good_steps + 1
    grow = good_steps >= growth_interval
    grown = state.scale * growth_factor
    grown = jnp.where(grow & jnp.isfinite(grown), grown, state.scale)
    backed_off = jnp.maximum(state.scale * backoff_factor, min_scale)
    return DynamicLossScale(scale=jnp.where(finite, grown, backed_off).astype(jnp.float32),
                            good_steps=jnp.where(finite & ~grow, good_steps, 0).astype(jnp.int32))
