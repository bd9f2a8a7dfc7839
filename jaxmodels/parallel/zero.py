"""The ZeRO layout of a parameter pytree over n devices (Rajbhandari et al. 2020, "ZeRO: Memory
optimizations toward training trillion parameter models", stages 1-2), and its collectives.

Each leaf of `size` elements is flattened and zero-padded to n * c elements, c = ceil(size / n),
and viewed as (n, c): row i is device i's shard. Stored globally, a shard tree is a tree of
(n * c,) vectors sharded over the data axis; inside `shard_map` each device sees its (c,) row.
For communication the rows of all leaves are laid side by side in one (n, C) bucket,
C = sum of the c, so one reduce-scatter (or all-gather) of n * C elements moves every leaf.
Padding is zeros: zero gradients keep it zero under AdamW and it never reaches the parameters.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxmodels.ops.collectives import ring_all_gather, ring_reduce_scatter

# config.parallel.collectives -> (reduce_scatter, all_gather) over the leading dim, each called as
# f(x, axis_name). "ring": this project's ppermute ring algorithms (ops/collectives.py), the
# algorithm visible in code. "xla": lax.psum_scatter / lax.all_gather, lowered to the backend's
# own collectives (NCCL on GPU); numerically the same, usually faster.
COLLECTIVES = {
    "ring": (ring_reduce_scatter, ring_all_gather),
    "xla": (functools.partial(lax.psum_scatter, scatter_dimension=0, tiled=True),
            functools.partial(lax.all_gather, axis=0, tiled=True)),
}


def shard_size(size: int, n: int) -> int:
    """c = ceil(size / n): the elements of one device's shard of a leaf of `size` elements."""
    return -(-size // n)


def padded_flat(x: jax.Array, n: int) -> jax.Array:
    """x (any shape, `size` elements) -> (n * shard_size(size, n),) flattened, zero-padded."""
    flat = x.reshape(-1)
    return jnp.pad(flat, (0, n * shard_size(flat.size, n) - flat.size))


def padded_flat_tree(tree, n: int):
    """`padded_flat` of every leaf: the global (n * c,) vectors that the optimiser state is shaped like."""
    return jax.tree.map(lambda x: padded_flat(x, n), tree)


def bucket(tree, n: int) -> jax.Array:
    """Every leaf's (n, c) rows side by side: (n, C), C = sum of the leaves' c, in the leaves' common dtype."""
    return jnp.concatenate([padded_flat(x, n).reshape(n, -1) for x in jax.tree.leaves(tree)], axis=1)


def local_shard(tree, n: int, index: jax.Array):
    """Device `index`'s (c,) row of every leaf of `tree` (whole arrays, e.g. replicated parameters)."""
    return jax.tree.map(lambda x: padded_flat(x, n).reshape(n, -1)[index], tree)


def _columns(leaves, n: int) -> list[tuple[int, int]]:
    """The [start, end) bucket columns of each leaf: consecutive runs of its c."""
    ends = [0]
    for x in leaves:
        ends.append(ends[-1] + shard_size(math.prod(x.shape), n))
    return list(zip(ends, ends[1:]))


def split_row(row: jax.Array, like, n: int):
    """One bucket row (C,) -> a tree shaped like `like` whose leaves are this device's (c,) shards."""
    leaves, treedef = jax.tree.flatten(like)
    return treedef.unflatten([row[a:b].astype(x.dtype) for (a, b), x in zip(_columns(leaves, n), leaves)])


def unbucket(rows: jax.Array, like):
    """A full (n, C) bucket -> the tree `like` describes (original shapes and dtypes), padding dropped."""
    leaves, treedef = jax.tree.flatten(like)
    return treedef.unflatten([
        rows[:, a:b].reshape(-1)[:math.prod(x.shape)].reshape(x.shape).astype(x.dtype)
        for (a, b), x in zip(_columns(leaves, rows.shape[0]), leaves)])
