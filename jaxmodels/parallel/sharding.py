"""Logical axis names -> mesh axes, and the shardings of parameters, optimizer state and batches."""

import math
from collections.abc import Sequence

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Rules = Sequence[tuple[str, str | Sequence[str] | None]]

# Parameters: FSDP shards the embedding dimension, tensor parallelism the heads/MLP/vocab dims,
# expert parallelism the experts of MoE layers. Batches are split over data, fsdp and expert.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp", "expert")),
    ("expert", "expert"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
)


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def parameter_mesh_axes(rules: Rules) -> set[str]:
    """The mesh axes that some parameter's logical axis maps to (every rule but "batch")."""
    return {a for name, axes in rules if name != "batch" for a in _as_tuple(axes)}


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
    """PartitionSpec for an array whose dims carry `logical_axes`.

    A dim is sharded over the mesh axes its rule names, unless its size is not divisible by
    their product or one of them already shards an earlier dim: then it is replicated (so
    e.g. 2 KV heads on a 4-way tensor axis are replicated rather than failing).
    """
    rule_map = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        if name is not None and name not in rule_map:
            raise ValueError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(rule_map)}")
        mesh_axes = tuple(a for a in _as_tuple(rule_map.get(name)) if mesh.shape[a] > 1)
        n = 1
        for a in mesh_axes:
            n *= mesh.shape[a]
        if not mesh_axes or size % n or used & set(mesh_axes):
            spec.append(None)
            continue
        used |= set(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def param_specs(abstract_model: nnx.Module, mesh: Mesh, rules: Rules):
    """PartitionSpecs for the model's parameters as a pure dict (the layout of `nnx.split(...)[1].to_pure_dict()`)."""
    _, state = nnx.split(abstract_model)

    def spec(var):
        axes = var.get_metadata().get("logical_axes", (None,) * len(var.value.shape))
        return logical_to_spec(axes, var.value.shape, mesh, rules)

    return nnx.State(jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))).to_pure_dict()


def opt_state_specs(optimizer: optax.GradientTransformation, abstract_opt_state, params_specs):
    """Optimizer state specs: moments shaped like parameters shard like them; the rest is replicated."""
    return optax.tree_map_params(optimizer, lambda _, spec: spec, abstract_opt_state, params_specs,
                                 transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))


def batch_spec(rules: Rules, ndim: int) -> P:
    """Batches are sharded on their leading dim by the rule for "batch" (data + fsdp + expert by default)."""
    axes = _as_tuple(dict(rules).get("batch"))
    return P(axes if axes else None, *([None] * (ndim - 1)))


def bytes_per_device(abstract_tree, shardings) -> int:
    """Bytes each device stores of a tree of arrays (ShapeDtypeStructs) laid out by `shardings`
    (a matching tree of shardings): the sum over leaves of one shard's size."""
    sizes = jax.tree.map(lambda a, s: math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize, abstract_tree, shardings)
    return sum(jax.tree.leaves(sizes))


def named(mesh: Mesh, specs):
    """Tree of PartitionSpec -> tree of NamedSharding on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
