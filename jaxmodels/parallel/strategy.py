"""Data-parallel strategies (`config.parallel.strategy`) and how each uses the mesh axes.

Every strategy splits each global batch over the devices of `data` x `fsdp` x `expert`; they differ in
where the parameters and the optimiser state live and in who writes the collectives:

- "replicated": plain data parallelism. Parameters and optimiser state are whole on every
  device of `data`; XLA all-reduces the gradients. Needs mesh.fsdp = 1 (an fsdp axis > 1 would
  shard the parameters, which is the "fsdp" strategy).
- "zero": ZeRO stages 1 and 2 (Rajbhandari et al. 2020, "ZeRO: Memory optimizations toward
  training trillion parameter models"), written out in `jax.shard_map` over `data`
  (the `ZeRO` hooks of `jaxmodels.train.step.make_train_step`): gradients are reduce-scattered, each device
  updates its 1/D shard of the flattened, padded parameters with its 1/D shard of the
  optimiser state, and the parameters are all-gathered. Parameters stay replicated; the
  optimiser state is stored sharded over `data`. Needs mesh.fsdp = mesh.tensor = mesh.expert = 1.
- "fsdp": parameters and optimiser state sharded over the `fsdp` axis by the logical-axis rules
  (`config.sharding_rules`, "embed" -> "fsdp" by default), gathered where needed by XLA's SPMD
  partitioner (ZeRO stage 3 / fully sharded data parallelism). With `data` > 1 as well it is
  hybrid sharding: sharded within an fsdp group, replicated across groups. Needs
  config.mesh.fsdp != 1 and a sharding rule that maps a parameter axis to "fsdp".

Each strategy is a `Strategy` object (`make_strategy(config.parallel, mesh)`) that owns what differs between
them: the check of the mesh (`check`), the layout of the optimiser state (`opt_layout`, `opt_param_specs`,
`update_axis`), the collectives of its train step (the hooks `jaxmodels.train.step.make_train_step` calls)
and whether a run may resume from another strategy's checkpoints (`resume_error`). Nothing else branches on
the strategy's name.

Tensor parallelism (mesh.tensor > 1) and expert parallelism (mesh.expert > 1: MoE experts sharded
over `expert`) combine with "replicated" and "fsdp".
"""

from collections.abc import Callable, Mapping
from typing import ClassVar

import jax
import ml_collections
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxmodels.parallel import zero
from jaxmodels.parallel.sharding import Rules, parameter_mesh_axes


class Strategy:
    """Plain data parallelism ("replicated"): parameters and optimiser state whole on every device of `data`;
    the train step is one jitted function that XLA partitions from the state's shardings (it inserts the
    gradient all-reduce). The base of the other strategies: each hook below is the identity here."""

    name: ClassVar[str] = "replicated"
    # What the optimiser state looks like when stored: "whole" (parameter-shaped) or "flat_padded" (ZeRO).
    opt_state_layout: ClassVar[str] = "whole"
    # The mesh axis the optimiser's updates are sharded over (its clipping norm spans it); None: unsharded.
    update_axis: ClassVar[str | None] = None

    def __init__(self, mesh: Mesh, collectives: str = "ring"):
        """mesh: the run's device mesh; collectives: config.parallel.collectives (used by "zero")."""
        self.mesh = mesh

    @classmethod
    def check(cls, mesh_config: Mapping[str, int], sizes: Mapping[str, int], rules: Rules) -> str | None:
        """Why this strategy cannot run on this mesh, naming the config fields; None when it can.

        mesh_config: config.mesh as written (-1 allowed); sizes: the same axes resolved to device counts
        (`mesh_shape`); rules: config.sharding_rules.
        """
        if sizes["fsdp"] > 1:
            written = mesh_config.get("fsdp", 1)
            devices = "" if written == sizes["fsdp"] else f" (= {sizes['fsdp']} devices)"
            return (f"config.parallel.strategy={cls.name!r} keeps the parameters whole on every device, but "
                    f"config.mesh.fsdp={written}{devices} would shard them; set config.mesh.fsdp=1, or "
                    "config.parallel.strategy='fsdp'")
        return None

    @classmethod
    def resume_error(cls, previous: str) -> str | None:
        """Why checkpoints written with strategy `previous` cannot be restored under this one; None if they can
        (the optimiser state has the same layout; shardings are re-laid by the restore)."""
        if STRATEGIES[previous].opt_state_layout == cls.opt_state_layout:
            return None
        return (f"parallel.strategy: {previous!r} -> {cls.name!r}; the optimiser state of {previous!r} is stored "
                f"{STRATEGIES[previous].opt_state_layout!r}, that of {cls.name!r} {cls.opt_state_layout!r}. Resume "
                "with the same parallel.strategy or use a new workdir")

    def opt_layout(self, params):
        """The parameter tree the optimiser state is shaped like (`optimizer.init(opt_layout(params))`)."""
        return params

    def opt_param_specs(self, param_specs):
        """PartitionSpecs of the parameter-shaped leaves of the optimiser state, from the parameters' specs."""
        return param_specs

    def mean_over_shards(self, values):
        """Inside the step: the batch means of `values` (loss, metrics) over the devices that split the batch."""
        return values

    def shard_update(self, grads, params):
        """Inside the step: (gradient, parameters) of what this device updates (the whole trees here)."""
        return grads, params

    def gather_params(self, new_shard, params):
        """Inside the step: the full new parameters from this device's updated shard (`shard_update`'s)."""
        return new_shard

    def wrap_step(self, step: Callable, *, state_specs, batch_spec) -> Callable:
        """The step as it is jitted: as written here, or mapped over devices with explicit collectives."""
        del state_specs, batch_spec
        return step


class FSDP(Strategy):
    """Fully sharded data parallelism ("fsdp", ZeRO stage 3): parameters and optimiser state sharded over the
    `fsdp` axis by the logical-axis rules, gathered where needed by XLA's SPMD partitioner; with `data` > 1 as
    well, hybrid sharding (sharded within an fsdp group, replicated across groups). Same step as `Strategy`."""

    name = "fsdp"

    @classmethod
    def check(cls, mesh_config, sizes, rules):
        if mesh_config.get("fsdp", 1) == 1:
            return (f"config.parallel.strategy={cls.name!r} shards parameters over the fsdp mesh axis, but "
                    "config.mesh.fsdp=1; set config.mesh.fsdp to a size > 1 or -1 (e.g. config.mesh.data=1 "
                    "config.mesh.fsdp=-1)")
        if "fsdp" not in parameter_mesh_axes(rules):
            return (f"config.parallel.strategy={cls.name!r} needs config.sharding_rules to map a parameter axis "
                    "to 'fsdp' (the default maps 'embed' -> 'fsdp'); no rule but 'batch' does")
        return None


class ZeRO(Strategy):
    """ZeRO stages 1-2 ("zero"; Rajbhandari et al. 2020) written out in `jax.shard_map` over `data` (D devices)
    with explicit collectives (`zero.COLLECTIVES[collectives]`). Parameters stay replicated; the optimiser state
    is built on `zero.padded_flat_tree(params, D)`, its (D * c,) leaves stored sharded over `data`. On each
    device the step (`jaxmodels.train.step.make_train_step` with these hooks):

      1. loss and gradients of its local batch (b / D rows); loss and metrics averaged over devices,
      2. gradients laid out as one (D, C) bucket (`zero.bucket`), reduce-scattered and divided by D: this
         device keeps row i, the batch-mean gradient of its 1/D shard (ZeRO-2),
      3. grad_norm = sqrt(psum over devices of the shard's sum of squares) (the full norm; `update_axis`),
      4. AdamW on its row of the flattened, padded parameters with its opt-state shard,
      5. the non-finite guard (loss and grad_norm agree on every device, so all keep or all update), then the
         (C,) parameter rows are all-gathered and unflattened.
    """

    name = "zero"
    opt_state_layout = "flat_padded"
    update_axis = "data"

    def __init__(self, mesh: Mesh, collectives: str = "ring"):
        super().__init__(mesh)
        self.n = mesh.shape[self.update_axis]
        self.reduce_scatter, self.all_gather = zero.COLLECTIVES[collectives]

    @classmethod
    def check(cls, mesh_config, sizes, rules):
        error = super().check(mesh_config, sizes, rules)
        for axis, what in (("tensor", "tensor parallelism"), ("expert", "expert parallelism")):
            if error is None and sizes[axis] > 1:
                error = (f"config.parallel.strategy={cls.name!r} flattens whole parameters over the data axis and "
                         f"does not combine with {what}, but config.mesh.{axis}={mesh_config.get(axis, 1)}; set "
                         f"config.mesh.{axis}=1, or use config.parallel.strategy='replicated' or 'fsdp'")
        return error

    def opt_layout(self, params):
        return zero.padded_flat_tree(params, self.n)

    def opt_param_specs(self, param_specs):
        return jax.tree.map(lambda _: P(self.update_axis), param_specs, is_leaf=lambda x: isinstance(x, P))

    def mean_over_shards(self, values):
        return lax.pmean(values, self.update_axis)

    def shard_update(self, grads, params):
        row = self.reduce_scatter(zero.bucket(grads, self.n).reshape(-1), self.update_axis) / self.n
        index = lax.axis_index(self.update_axis)
        return zero.split_row(row, params, self.n), zero.local_shard(params, self.n, index)

    def gather_params(self, new_shard, params):
        rows = self.all_gather(jax.numpy.concatenate(jax.tree.leaves(new_shard)), self.update_axis)
        return zero.unbucket(rows.reshape(self.n, -1), params)

    def wrap_step(self, step, *, state_specs, batch_spec):
        # check_vma=False: gradients of the replicated params stay per-device (no implicit psum), and ring
        # collectives (ppermute) are not proven replicated; outputs with spec P() are equal on all devices.
        return jax.shard_map(step, mesh=self.mesh, in_specs=(state_specs, batch_spec),
                             out_specs=(state_specs, P()), check_vma=False)


STRATEGIES: dict[str, type[Strategy]] = {"replicated": Strategy, "zero": ZeRO, "fsdp": FSDP}


def make_strategy(config: ml_collections.ConfigDict, mesh: Mesh) -> Strategy:
    """The strategy of config.parallel (`strategy`, and `collectives` for "zero") on `mesh`."""
    return STRATEGIES[config.strategy](mesh, config.collectives)
