"""Data-parallel strategies (`config.parallel.strategy`) and how each uses the mesh axes.

Every strategy splits each global batch over the devices of `data` x `fsdp` x `expert`; they differ in
where the parameters and the optimiser state live and in who writes the collectives:

- "replicated": plain data parallelism. Parameters and optimiser state are whole on every
  device of `data`; XLA all-reduces the gradients. Needs mesh.fsdp = 1 (an fsdp axis > 1 would
  shard the parameters, which is the "fsdp" strategy).
- "zero": ZeRO stages 1 and 2 (Rajbhandari et al. 2020, "ZeRO: Memory optimizations toward
  training trillion parameter models"), written out in `jax.shard_map` over `data`
  (`jaxmodels.train.step.make_zero_train_step`): gradients are reduce-scattered, each device
  updates its 1/D shard of the flattened, padded parameters with its 1/D shard of the
  optimiser state, and the parameters are all-gathered. Parameters stay replicated; the
  optimiser state is stored sharded over `data`. Needs mesh.fsdp = mesh.tensor = mesh.expert = 1.
- "fsdp": parameters and optimiser state sharded over the `fsdp` axis by the logical-axis rules
  (`config.sharding_rules`, "embed" -> "fsdp" by default), gathered where needed by XLA's SPMD
  partitioner (ZeRO stage 3 / fully sharded data parallelism). With `data` > 1 as well it is
  hybrid sharding: sharded within an fsdp group, replicated across groups. Needs
  config.mesh.fsdp != 1 and a sharding rule that maps a parameter axis to "fsdp".

Tensor parallelism (mesh.tensor > 1) and expert parallelism (mesh.expert > 1: MoE experts sharded
over `expert`) combine with "replicated" and "fsdp".
"""

from collections.abc import Mapping

from jaxmodels.parallel.sharding import Rules, parameter_mesh_axes

STRATEGIES = ("replicated", "zero", "fsdp")


def strategy_error(strategy: str, mesh_config: Mapping[str, int], sizes: Mapping[str, int],
                   rules: Rules) -> str | None:
    """Why `strategy` cannot run on this mesh, naming the config fields; None when it can.

    mesh_config: config.mesh as written (-1 allowed); sizes: the same axes resolved to device
    counts (`mesh_shape`); rules: config.sharding_rules.
    """
    name = f"config.parallel.strategy={strategy!r}"
    written = {axis: mesh_config.get(axis, 1) for axis in sizes}
    if strategy in ("replicated", "zero") and sizes["fsdp"] > 1:
        devices = "" if written["fsdp"] == sizes["fsdp"] else f" (= {sizes['fsdp']} devices)"
        return (f"{name} keeps the parameters whole on every device, but config.mesh.fsdp={written['fsdp']}"
                f"{devices} would shard them; set config.mesh.fsdp=1, or config.parallel.strategy='fsdp'")
    for axis, what in (("tensor", "tensor parallelism"), ("expert", "expert parallelism")):
        if strategy == "zero" and sizes[axis] > 1:
            return (f"{name} flattens whole parameters over the data axis and does not combine with {what}, "
                    f"but config.mesh.{axis}={written[axis]}; set config.mesh.{axis}=1, or "
                    "use config.parallel.strategy='replicated' or 'fsdp'")
    if strategy == "fsdp":
        if written["fsdp"] == 1:
            return (f"{name} shards parameters over the fsdp mesh axis, but config.mesh.fsdp=1; set "
                    "config.mesh.fsdp to a size > 1 or -1 (e.g. config.mesh.data=1 config.mesh.fsdp=-1)")
        if "fsdp" not in parameter_mesh_axes(rules):
            return (f"{name} needs config.sharding_rules to map a parameter axis to 'fsdp' "
                    "(the default maps 'embed' -> 'fsdp'); no rule but 'batch' does")
    return None
