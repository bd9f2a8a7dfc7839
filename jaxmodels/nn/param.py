"""Parameter creation with logical axis names (used by `jaxmodels.parallel` for sharding)."""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.ops.init import lecun

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    logical_axes: Sequence[str | None],
    dtype=jnp.float32,
) -> nnx.Param:
    """An `nnx.Param` of `shape` drawn from `init`, tagged with one logical axis name per dim.

    The names (e.g. ("embed", "mlp")) are mapped to mesh axes by the rules in the config
    (`jaxmodels.parallel.sharding`); they are metadata only and change no arithmetic.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical_axes {tuple(logical_axes)} must name each dim of shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(logical_axes))


def zeros_init(key, shape, dtype) -> jax.Array:
    """Initializer: zeros of `shape` and `dtype` (`key` unused)."""
    del key
    return jnp.zeros(shape, dtype)


def ones_init(key, shape, dtype) -> jax.Array:
    """Initializer: ones of `shape` and `dtype` (`key` unused)."""
    del key
    return jnp.ones(shape, dtype)


def fan_in_init(fan_in_dims: int = 1, scale: float = 1.0) -> Initializer:
    """LeCun truncated normal (`jaxmodels.ops.init.lecun`) for a weight laid out (in..., out...): variance
    scale / fan_in with fan_in the product of the first `fan_in_dims` dims and the other dims the fan-out.

    LeCun-normal when scale = 1 (LeCun et al. 1998): keeps activations at unit variance through a linear map,
    the same argument that gives attention its 1/sqrt(d).
    """

    def init(key, shape, dtype):
        axes = tuple(range(len(shape)))
        return lecun(scale=scale, in_axis=axes[:fan_in_dims], out_axis=axes[fan_in_dims:])(key, shape, dtype)

    return init
