"""Device mesh from a config section: axes data / fsdp / expert / tensor, -1 for "the rest".

`expert` is the expert-parallel axis (GShard, Lepikhin et al. 2020): mixture-of-experts weights
are sharded over it (logical axis "expert") and the batch is split over it too, so with no MoE
layer it acts as one more data-parallel axis. `tensor` is last: it varies fastest over the devices."""

import math

import jax
import numpy as np
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "expert", "tensor")


def mesh_shape(axis_sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve sizes in MESH_AXES order; at most one -1, which takes the devices left over."""
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid: {list(MESH_AXES)}")
    sizes = [int(axis_sizes.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive with at most one -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices do not divide into mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {num_devices}")
    return tuple(sizes)


def make_mesh(axis_sizes: dict[str, int], devices: list | None = None) -> Mesh:
    """A mesh over `devices` (default: all devices of all processes) with axes MESH_AXES."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(axis_sizes, len(devices))
    if devices == jax.devices():
        axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
