"""Collectives written out as ring algorithms over `lax.ppermute`, for use inside `jax.shard_map`.

All-reduce = reduce-scatter + all-gather (Patarasuk & Yuan 2009, "Bandwidth optimal all-reduce
algorithms"): on a ring of n devices each step moves 1/n of the data to the next neighbour, so
each device sends 2(n-1)/n of its data in total, independent of n. These functions are the
seed's algorithm made visible; each equals its `lax` counterpart (`psum_scatter`, `all_gather`,
`psum`), which XLA/NCCL implement natively.
"""

import jax
import jax.numpy as jnp
from jax import lax


def _ring_perm(n: int, direction: int) -> list[tuple[int, int]]:
    return [(i, (i + direction) % n) for i in range(n)]


def _reduce_scatter_one_way(chunks: jax.Array, axis_name: str, direction: int) -> jax.Array:
    """chunks: (n, ...) this device's n pieces. Returns the sum over devices of piece `index`.

    At step s device i receives the running sum of piece (i - direction*(s+1)) mod n from its
    neighbour i - direction and adds its own copy; after n-1 steps it holds piece i complete.
    """
    n = chunks.shape[0]
    i = lax.axis_index(axis_name)
    acc = chunks[(i - direction) % n]
    for s in range(1, n):
        acc = lax.ppermute(acc, axis_name, _ring_perm(n, direction))
        acc = acc + chunks[(i - direction * (s + 1)) % n]
    return acc


def _all_gather_one_way(piece: jax.Array, axis_name: str, direction: int, n: int) -> jax.Array:
    """piece: this device's (c, ...) chunk. Returns (n, c, ...): every device's chunk in device order."""
    i = lax.axis_index(axis_name)
    out = jnp.zeros((n, *piece.shape), piece.dtype).at[i].set(piece)
    for s in range(1, n):
        piece = lax.ppermute(piece, axis_name, _ring_perm(n, direction))
        out = out.at[(i - direction * s) % n].set(piece)
    return out


def _split_halves(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    h = x.shape[axis] // 2
    return lax.slice_in_dim(x, 0, h, axis=axis), lax.slice_in_dim(x, h, x.shape[axis], axis=axis)


def ring_reduce_scatter(x: jax.Array, axis_name: str, *, bidirectional: bool = False) -> jax.Array:
    """Sum `x` over the devices of `axis_name` and keep this device's slice of the leading dim.

    x: (n * c, ...) on each of n devices -> (c, ...), equal to
    `lax.psum_scatter(x, axis_name, scatter_dimension=0, tiled=True)`. n - 1 ppermute steps, each
    moving c rows. `bidirectional` splits every chunk in two along dim 1 (or dim 0 of the chunk's
    rows if 1-D) and runs one ring each way, using both directions of every link.
    """
    n = lax.axis_size(axis_name)
    if x.ndim == 0 or x.shape[0] % n:
        raise ValueError(f"leading dim of x {x.shape} must be divisible by the {n} devices of {axis_name!r}")
    chunks = x.reshape(n, x.shape[0] // n, *x.shape[1:])
    if not bidirectional or n == 1:
        return _reduce_scatter_one_way(chunks, axis_name, +1)
    fwd, bwd = _split_halves(chunks, axis=1)
    return jnp.concatenate([_reduce_scatter_one_way(fwd, axis_name, +1),
                            _reduce_scatter_one_way(bwd, axis_name, -1)], axis=0)


def ring_all_gather(x: jax.Array, axis_name: str, *, bidirectional: bool = False) -> jax.Array:
    """Concatenate every device's `x` along the leading dim, in device order.

    x: (c, ...) on each of n devices, at least 1-D (ValueError for a scalar) -> (n * c, ...), equal to
    `lax.all_gather(x, axis_name, axis=0, tiled=True)`; n - 1 ppermute steps.
    """
    if jnp.ndim(x) == 0:
        raise ValueError(f"x must have a leading dim to gather along (at least 1-D), got a scalar; "
                         f"gather x[None] for a ({lax.axis_size(axis_name)},) result")
    n = lax.axis_size(axis_name)
    if not bidirectional or n == 1 or x.shape[0] < 2:
        return _all_gather_one_way(x, axis_name, +1, n).reshape(n * x.shape[0], *x.shape[1:])
    fwd, bwd = _split_halves(x, axis=0)
    both = jnp.concatenate([_all_gather_one_way(fwd, axis_name, +1, n),
                            _all_gather_one_way(bwd, axis_name, -1, n)], axis=1)
    return both.reshape(n * x.shape[0], *x.shape[1:])


def ring_all_reduce(x: jax.Array, axis_name: str, *, bidirectional: bool = False) -> jax.Array:
    """Sum `x` (any shape) over the devices of `axis_name`: reduce-scatter, then all-gather.

    Equal to `lax.psum(x, axis_name)`. x is flattened and zero-padded to a multiple of n
    elements, so each device finishes with 1/n of the sum before the all-gather.
    """
    n = lax.axis_size(axis_name)
    flat = x.reshape(-1)
    padded = jnp.pad(flat, (0, (-flat.size) % n))
    summed = ring_all_gather(ring_reduce_scatter(padded, axis_name, bidirectional=bidirectional), axis_name,
                             bidirectional=bidirectional)
    return summed[:flat.size].reshape(x.shape)


def hierarchical_all_reduce(x: jax.Array, inner_axis: str, outer_axis: str) -> jax.Array:
    """Two-level all-reduce over a (outer, inner) device grid, e.g. (node, GPU within node).

    Reduce-scatter inside each node (fast links), all-reduce the 1/n_inner shard across nodes
    (slow links carry only that shard), all-gather inside the node. Equal to
    `lax.psum(x, (outer_axis, inner_axis))`.
    """
    n = lax.axis_size(inner_axis)
    flat = x.reshape(-1)
    padded = jnp.pad(flat, (0, (-flat.size) % n))
    shard = ring_all_reduce(ring_reduce_scatter(padded, inner_axis), outer_axis)
    return ring_all_gather(shard, inner_axis)[:flat.size].reshape(x.shape)
