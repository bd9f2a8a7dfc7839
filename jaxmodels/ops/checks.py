"""Argument checks shared by every layer of the library, one function and one wording per kind of check.

Public functions validate their inputs at trace time (shapes and options are static) and raise
`ValueError` for a bad value or shape and `TypeError` for a bad type, saying what was expected and
what came. A module that needs a check imports it from here; it never reaches into another
module's private helpers.
"""

import math
import numbers
from collections.abc import Collection

import jax
import jax.numpy as jnp
import numpy as np

# Score given to masked (query, key) pairs: finite, so that exp(masked - row_max) underflows to exactly 0
# without inf - inf = nan; the value jax.nn uses.
MASKED_SCORE = -0.7 * float(np.finfo(np.float32).max)


def one_of(name: str, value, valid: Collection):
    """Return `value` if it is in `valid`, else raise ValueError "{name}={value!r} is not valid; choose one of
    [...]". `name` is what the user wrote (an argument name or a config path such as "config.model.norm_kind")."""
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(valid)}")
    return value


def positive_int(name: str, value, *, allow_none: bool = False):
    """Return `value` if it is an int >= 1 (or None with `allow_none`); TypeError for a non-int (bools
    included), ValueError for an int < 1."""
    if allow_none and value is None:
        return value
    return _int_at_least(name, value, 1, "a positive int" + (" or None" if allow_none else ""))


def non_negative_int(name: str, value):
    """Return `value` if it is an int >= 0; TypeError for a non-int (bools included), ValueError for an int < 0:
    "{name} must be a non-negative int, got ..."."""
    return _int_at_least(name, value, 0, "a non-negative int")


def real_in_range(name: str, value, low: float = -math.inf, high: float = math.inf, *,
                  include_low: bool = True, include_high: bool = True) -> float:
    """Return `value` as a float if it is a real number between `low` and `high` (each end closed or open
    as `include_low` / `include_high` say; an infinite end is open); TypeError for a non-number (bools and
    strings included), ValueError for a number outside (NaN included):
    "{name} must be a real number in [low, high), got ..."."""
    interval = _interval(low, high, include_low, include_high)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in {interval}, got {value!r}")
    if not _inside(np.asarray(value), low, high, include_low, include_high):
        raise ValueError(f"{name} must be a real number in {interval}, got {value!r}")
    return float(value)


def _interval(low, high, include_low, include_high) -> str:
    left = "[" if include_low and low > -math.inf else "("
    return f"{left}{low}, {high}{']' if include_high and high < math.inf else ')'}"


def _inside(values: np.ndarray, low, high, include_low, include_high) -> bool:
    """Whether every element lies in the interval; NaN never does, nor an infinite end."""
    above = values >= low if include_low and low > -math.inf else values > low
    below = values <= high if include_high and high < math.inf else values < high
    return bool(np.all(above & below))


def concrete(x) -> np.ndarray | None:
    """`x` as a NumPy array when its value is known now (not a tracer of jit, vmap or grad), else None.
    A public function checks the values of concrete arguments eagerly; traced ones cannot raise, so its
    docstring states what it does with values out of range."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def values_in_range(name: str, x, low: float = -math.inf, high: float = math.inf, *, include_low: bool = True,
                    include_high: bool = False) -> None:
    """If `x` is concrete (`concrete`), raise ValueError unless every element lies between `low` and `high`
    (ends as in `real_in_range`; default [low, high)): "{name} must hold values in [low, high), got values from
    min to max"."""
    values = concrete(x)
    if values is None or values.size == 0 or _inside(values, low, high, include_low, include_high):
        return
    raise ValueError(f"{name} must hold values in {_interval(low, high, include_low, include_high)}, "
                     f"got values from {values.min()} to {values.max()}")


def monotone(name: str, x, *, decreasing: bool) -> None:
    """If `x` (1-D) is concrete (`concrete`), raise ValueError unless it is non-increasing (`decreasing`) or
    non-decreasing: "{name} must be non-increasing (..., in sampling order), got [...]"."""
    values = concrete(x)
    if values is None:
        return
    steps = np.diff(values)
    if not np.all(steps <= 0 if decreasing else steps >= 0):  # NaN fails too
        order = "non-increasing" if decreasing else "non-decreasing"
        raise ValueError(f"{name} must be {order} (in sampling order), got {np.array2string(values, threshold=8)}")


def _int_at_least(name, value, minimum, expected):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_qkv(query, key, value, *, value_head_dim_free: bool = False) -> None:
    """Check attention operands: query (B, T, N, H), key (B, S, K, H) and value (B, S, K, H), or (B, S, K, Hv)
    for any Hv with `value_head_dim_free` (linear attention): ranks, batch, head_dim, N a multiple of K
    (grouped-query heads), heads and head_dim >= 1, one floating dtype. Raises ValueError (shapes) or TypeError
    (dtypes)."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D (batch, length, heads, head_dim), got shape {x.shape}")
    if value_head_dim_free and key.shape[:3] != value.shape[:3]:
        raise ValueError(f"key and value must agree in (B, S, K), got {key.shape} and {value.shape}")
    if not value_head_dim_free and key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape (B, S, K, H), got {key.shape} and {value.shape}")
    if query.shape[0] != key.shape[0]:
        raise ValueError(f"query and key must have the same batch size, got {query.shape} and {key.shape}")
    if query.shape[3] != key.shape[3]:
        raise ValueError(f"query and key must have the same head_dim, got {query.shape} and {key.shape}")
    if min(query.shape[2], key.shape[2], query.shape[3]) < 1:
        raise ValueError(f"heads and head_dim must be >= 1, got query {query.shape} and key {key.shape}")
    if query.shape[2] % key.shape[2]:
        raise ValueError(f"number of query heads must be a multiple of key/value heads, "
                         f"got {query.shape[2]} query heads and {key.shape[2]} key/value heads")
    if not jnp.issubdtype(query.dtype, jnp.floating):
        raise TypeError(f"query, key and value must be floating point, got {query.dtype}")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"query, key and value must have one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")


def as_scores_operand(x, scores_shape: tuple[int, int, int, int], name: str):
    """Check that a bias or mask `x` broadcasts to the score shape (B, N, T, S) dim by dim (each 1 or full,
    at most 4-D, leading dims may be omitted) and return it 4-D."""
    if x.ndim > 4 or any(d not in (1, full) for d, full in zip(x.shape[::-1], scores_shape[::-1])):
        raise ValueError(f"{name} must be broadcastable to (B, N, T, S) = {scores_shape} "
                         f"(each dim 1 or full), got shape {x.shape}")
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def check_grouped_operands(x_sorted, w, group_sizes) -> None:
    """Check the operands of a grouped matmul: x_sorted (M, d), w (E, d, f), integer group_sizes (E,).
    Raises ValueError (shapes) or TypeError (group_sizes not integer)."""
    if x_sorted.ndim != 2 or w.ndim != 3 or w.shape[1] != x_sorted.shape[1] or group_sizes.shape != (w.shape[0],):
        raise ValueError(f"expected x_sorted (M, d), w (E, d, f), group_sizes (E,); got {x_sorted.shape}, "
                         f"{w.shape}, {group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise TypeError(f"group_sizes must be integer, got {group_sizes.dtype}")


def check_image_batch(name: str, x, image_size: int, in_channels: int) -> None:
    """Check that `x` is a batch of square channels-last images, (batch, image_size, image_size, in_channels),
    else ValueError "{name} must be (batch, H, W, C), got shape (...)"."""
    expected = (image_size, image_size, in_channels)
    if x.ndim != 4 or x.shape[1:] != expected:
        raise ValueError(f"{name} must be (batch, {', '.join(map(str, expected))}), got shape {x.shape}")


def check_boxes(name: str, boxes, *, positive: bool = False) -> None:
    """Check boxes in (x1, y1, x2, y2) corner form: shape (..., 4) and floating dtype; if `boxes` is concrete
    (`concrete`), every box must have x2 >= x1 and y2 >= y1 (x2 > x1 and y2 > y1 with `positive`), else
    ValueError "{name} must hold boxes (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1, got {k} degenerate, the first
    at index (...): [...]". Traced boxes cannot be checked; the caller's docstring says what they give."""
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (..., 4) (x1, y1, x2, y2), got shape {boxes.shape}")
    if not jnp.issubdtype(boxes.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point, got {boxes.dtype}")
    values = concrete(boxes)
    if values is None or values.size == 0:
        return
    sizes = values[..., 2:] - values[..., :2]
    bad = ~np.all(sizes > 0 if positive else sizes >= 0, axis=-1)  # NaN is bad too
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        relation = ">" if positive else ">="
        raise ValueError(f"{name} must hold boxes (x1, y1, x2, y2) with x2 {relation} x1 and y2 {relation} y1, "
                         f"got {int(bad.sum())} degenerate, the first at index {first}: {values[first].tolist()}")
