"""Validation of an experiment config before anything is built or compiled.

Each part validates its own section: the model its `config.model` (`Model.check_config`), the task its
data and sample sections against the model (the task's constructor), the strategy its mesh
(`Strategy.check`). This module checks the fields of the training sections (train, optimizer, parallel,
mesh) and what spans sections: the batch against the mesh and the processes, the sequence length against
the attention's blocks.
"""

import jax
import ml_collections

from jaxmodels.models import check_model_config
from jaxmodels.models.base import check_fields
from jaxmodels.nn.attention import SPARSE_KINDS, AttentionSpec
from jaxmodels.parallel.mesh import MESH_AXES, mesh_shape
from jaxmodels.parallel.strategy import STRATEGIES
from jaxmodels.parallel.zero import COLLECTIVES
from jaxmodels.tasks import TASKS
from jaxmodels.train.optimizer import SCHEDULES

NAN_POLICIES = ("skip", "halt")
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")

# field path -> valid values, for every experiment.
CHOICES = {
    "task": tuple(TASKS),
    "optimizer.schedule": SCHEDULES,
    "train.nan_policy": NAN_POLICIES,
    "train.prng_impl": PRNG_IMPLS,
    "parallel.strategy": tuple(STRATEGIES),
    "parallel.collectives": tuple(COLLECTIVES),
}

POSITIVE = ("train.num_steps", "train.grad_accum_steps", "train.checkpoint_every", "train.keep_checkpoints",
            "train.log_every", "train.max_consecutive_skips", "data.global_batch_size", "data.eval_batches")


class ConfigError(ValueError):
    """An invalid experiment config; the message names the field and, where there are some, the valid choices."""


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raise ConfigError (a ValueError) naming the field (and the valid choices) for any invalid setting.

    num_devices: the devices the mesh will span (default: all of this run's devices)."""
    try:
        _validate(config, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _validate(config: ml_collections.ConfigDict, num_devices: int | None) -> None:
    check_fields(config, "config", CHOICES, POSITIVE)
    check_model_config(config.model)
    _check_sequence_blocks(config)
    if set(config.mesh) - set(MESH_AXES):
        raise ValueError(f"config.mesh has unknown axes {sorted(set(config.mesh) - set(MESH_AXES))}; "
                         f"valid: {list(MESH_AXES)}")
    sizes = dict(zip(MESH_AXES, mesh_shape(dict(config.mesh), num_devices or jax.device_count())))
    error = STRATEGIES[config.parallel.strategy].check(dict(config.mesh), sizes, config.sharding_rules)
    if error:
        raise ValueError(error)
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"] * config.train.grad_accum_steps
    if config.data.global_batch_size % shards:
        raise ValueError(f"config.data.global_batch_size={config.data.global_batch_size} must be divisible by "
                         f"data x fsdp x expert x train.grad_accum_steps = {shards}")
    if config.data.global_batch_size % jax.process_count():
        raise ValueError(f"config.data.global_batch_size must be divisible by the {jax.process_count()} processes")


def _check_sequence_blocks(config: ml_collections.ConfigDict) -> None:
    """Block-sparse attention kinds need data.seq_len to be a multiple of model.attention.block_size."""
    section = config.model.get("attention")
    if section is None or "seq_len" not in config.data:
        return
    kind, block_size = section.get("kind", AttentionSpec.kind), section.get("block_size", AttentionSpec.block_size)
    if kind in SPARSE_KINDS and config.data.seq_len % block_size:
        raise ValueError(f"config.data.seq_len={config.data.seq_len} must be a multiple of "
                         f"config.model.attention.block_size={block_size} for kind {kind!r}")
