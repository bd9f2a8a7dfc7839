"""Validation of an experiment config before anything is built or compiled.

Each part validates its own section: the model its `config.model` (`Model.check_config`), the task its
data and sample sections against the model (the task's constructor), the strategy its mesh
(`Strategy.check`). This module checks the fields of the training sections (train, optimizer, parallel,
mesh) and what spans sections: the batch against the mesh and the processes, the sequence length against
the attention's blocks and learned positions.
"""

import jax
import ml_collections

from jaxmodels.models import MODELS, check_model_config
from jaxmodels.models.base import check_fields
from jaxmodels.nn.attention import SPARSE_KINDS, spec_from_config
from jaxmodels.nn.peft import peft_spec_from_config
from jaxmodels.ops.checks import non_negative_int, positive_int
from jaxmodels.parallel.mesh import MESH_AXES, mesh_shape
from jaxmodels.parallel.strategy import STRATEGIES
from jaxmodels.parallel.zero import COLLECTIVES
from jaxmodels.tasks import TASKS, Task, make_task
from jaxmodels.train.loss_scaling import loss_scaling_from_config
from jaxmodels.train.optimizer import check_optimizer_config

NAN_POLICIES = ("skip", "halt")
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")

# field path -> valid values, for every experiment.
CHOICES = {
    "task": tuple(TASKS),
    "train.nan_policy": NAN_POLICIES,
    "train.prng_impl": PRNG_IMPLS,
    "parallel.strategy": tuple(STRATEGIES),
    "parallel.collectives": tuple(COLLECTIVES),
}

POSITIVE = ("train.num_steps", "train.grad_accum_steps", "train.checkpoint_every", "train.keep_checkpoints",
            "train.log_every", "train.max_consecutive_skips", "data.global_batch_size")


class ConfigError(ValueError):
    """An invalid experiment config; the message names the field and, where there are some, the valid choices."""


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> Task:
    """Raise ConfigError (a ValueError) naming the field (and the valid choices) for any invalid setting;
    return the task built on the way (it checks its data and sample sections against the model), so that
    the caller builds it once.

    num_devices: the devices the mesh will span (default: all of this run's devices)."""
    try:
        return _validate(config, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _validate(config: ml_collections.ConfigDict, num_devices: int | None) -> Task:
    check_fields(config, "config", CHOICES, POSITIVE)
    init_from = config.train.get("init_from", "")
    if not isinstance(init_from, str):
        raise ValueError(f"config.train.init_from must be a path (a str; '' for a random init), got {init_from!r}")
    check_optimizer_config(config.optimizer)
    if loss_scaling_from_config(config).loss_scale == "dynamic" and config.train.nan_policy == "halt":
        raise ValueError("config.precision.loss_scale='dynamic' skips each step whose float16 gradients overflow "
                         "and lowers the scale, but config.train.nan_policy='halt' would stop at the first; use "
                         "nan_policy='skip' (train.max_consecutive_skips bounds a run of skips)")
    check_model_config(config.model)
    _check_peft(config)
    non_negative_int("config.data.eval_batches", config.data.eval_batches)
    task = make_task(config)
    if config.data.eval_batches < task.min_eval_batches:  # 0 = the whole eval split, where the task reads it
        positive_int("config.data.eval_batches", config.data.eval_batches)
    _check_sequence_length(config)
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
    return task


def _check_peft(config: ml_collections.ConfigDict) -> None:
    """config.peft (`PeftSpec`'s fields and values), its fit to the model (`Model.check_peft`), and a pre-trained
    model to start from: config.train.init_from must be set unless the method is "none"."""
    try:
        spec = peft_spec_from_config(config.get("peft"))
    except ValueError as e:
        raise ValueError(f"config.{e}") from None
    MODELS[config.model.name].check_peft(config.model, spec)
    if spec.method != "none" and not config.train.get("init_from"):
        raise ValueError(f"config.peft.method={spec.method!r} fine-tunes a pre-trained model, but "
                         "config.train.init_from is not set: give the params to start from (the folder `python -m "
                         "jaxmodels.interop.hf import` wrote, or a training run's workdir)")


def _check_sequence_length(config: ml_collections.ConfigDict) -> None:
    """Block-sparse attention kinds need data.seq_len to be a multiple of model.attention.block_size; learned
    positions need it, and the sampled text (sample.prompt's bytes + sample.max_new_tokens), to be at most
    model.attention.max_positions."""
    section = config.model.get("attention")
    if section is None or "seq_len" not in config.data:
        return
    spec, seq_len = spec_from_config(section), config.data.seq_len
    if spec.kind in SPARSE_KINDS and seq_len % spec.block_size:
        raise ValueError(f"config.data.seq_len={seq_len} must be a multiple of "
                         f"config.model.attention.block_size={spec.block_size} for kind {spec.kind!r}")
    if spec.position == "learned" and seq_len > spec.max_positions:
        raise ValueError(f"config.data.seq_len={seq_len} is longer than the learned positions: "
                         f"config.model.attention.max_positions={spec.max_positions}")
    sample = config.get("sample", {})
    if spec.position == "learned" and "prompt" in sample and "max_new_tokens" in sample:
        length = len(sample.prompt.encode("utf-8")) + sample.max_new_tokens
        if length > spec.max_positions:
            raise ValueError(f"config.sample.prompt's {length - sample.max_new_tokens} bytes + config.sample."
                             f"max_new_tokens={sample.max_new_tokens} exceed config.model.attention.max_positions="
                             f"{spec.max_positions}")
