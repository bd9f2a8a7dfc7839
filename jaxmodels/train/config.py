"""Validation of an experiment config before anything is built or compiled."""

import jax
import ml_collections

from jaxmodels.models import DTYPES, MODELS
from jaxmodels.models.lm import REMAT_POLICIES
from jaxmodels.models.sequence_classifier import SequenceClassifier
from jaxmodels.nn.layers import MLP, NORMS
from jaxmodels.nn.attention import GAU_KINDS, SPARSE_KINDS, spec_from_config
from jaxmodels.nn.transformer import moe_spec_from_config
from jaxmodels.ops.fused_scan import IMPLEMENTATIONS as SCAN_IMPLEMENTATIONS
from jaxmodels.parallel.mesh import MESH_AXES, mesh_shape
from jaxmodels.parallel.strategy import STRATEGIES, strategy_error
from jaxmodels.parallel.zero import COLLECTIVES
from jaxmodels.tasks import TASKS
from jaxmodels.train.optimizer import SCHEDULES

NAN_POLICIES = ("skip", "halt")
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")

# field path -> valid values (None stands for "pick automatically"), for every experiment.
CHOICES = {
    "task": tuple(TASKS),
    "model.name": tuple(MODELS),
    "model.dtype": tuple(DTYPES),
    "model.param_dtype": tuple(DTYPES),
    "optimizer.schedule": SCHEDULES,
    "train.nan_policy": NAN_POLICIES,
    "train.prng_impl": PRNG_IMPLS,
    "parallel.strategy": STRATEGIES,
    "parallel.collectives": tuple(COLLECTIVES),
}

POSITIVE = ("train.num_steps", "train.grad_accum_steps", "train.checkpoint_every", "train.keep_checkpoints",
            "train.log_every", "data.global_batch_size", "data.eval_batches")


def _get(config, path):
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def check_fields(config: ml_collections.ConfigDict, choices: dict, positive=()) -> None:
    """Raise ValueError naming the field for a value outside `choices` (path -> valid values) or a
    `positive` field (paths) below 1."""
    for path, valid in choices.items():
        value = _get(config, path)
        if value not in valid:
            raise ValueError(f"config.{path}={value!r} is not valid; choose one of {list(valid)}")
    for path in positive:
        value = _get(config, path)
        if value < 1:
            raise ValueError(f"config.{path} must be >= 1, got {value}")


def _check_decoder_lm(config: ml_collections.ConfigDict) -> None:
    check_fields(config, {"model.mlp_kind": MLP.KINDS, "model.norm_kind": tuple(NORMS),
                          "model.remat": tuple(REMAT_POLICIES)},
                 ("data.seq_len", "model.num_layers", "model.embed_dim", "model.num_heads", "model.num_kv_heads",
                  "model.head_dim", "model.mlp_dim"))
    m = config.model
    try:
        attention = spec_from_config(m.attention)
    except ValueError as e:
        raise ValueError(f"config.model.{e}") from None
    if attention.kind in SPARSE_KINDS and config.data.seq_len % attention.block_size:
        raise ValueError(f"config.data.seq_len={config.data.seq_len} must be a multiple of "
                         f"config.model.attention.block_size={attention.block_size} for kind {attention.kind!r}")
    if m.num_heads % m.num_kv_heads:
        raise ValueError(f"config.model.num_heads={m.num_heads} must be a multiple of "
                         f"config.model.num_kv_heads={m.num_kv_heads}")
    try:
        moe = moe_spec_from_config(m.get("moe"))
    except ValueError as e:
        raise ValueError(f"config.model.{e}") from None
    if moe.num_experts and attention.kind in GAU_KINDS:
        raise ValueError(f"config.model.moe.num_experts={moe.num_experts} needs blocks with an MLP, but "
                         f"config.model.attention.kind={attention.kind!r} has none; set config.model.moe.num_experts=0")


def _check_mamba_lm(config: ml_collections.ConfigDict) -> None:
    check_fields(config, {"model.scan_implementation": (None, *SCAN_IMPLEMENTATIONS)},
                 ("data.seq_len", "model.num_layers", "model.embed_dim", "model.d_state", "model.d_conv",
                  "model.expand"))


def _check_ssm_stack(config: ml_collections.ConfigDict) -> None:
    """SequenceClassifier and its per-position variant SequenceTagger (which has no pooling)."""
    choices = {"model.mixer": SequenceClassifier.MIXERS, "model.norm_kind": tuple(NORMS)}
    if config.model.name == "sequence_classifier":
        choices["model.pooling"] = SequenceClassifier.POOLINGS
    check_fields(config, choices, ("model.num_classes", "model.d_model", "model.num_layers", "model.d_state"))


def _check_mlp_denoiser(config: ml_collections.ConfigDict) -> None:
    check_fields(config, {}, ("model.in_features", "model.hidden_dim", "model.num_layers", "model.frequency_dim"))


# model.name -> the checks of that model's fields (a model without an entry has only the generic ones).
MODEL_CHECKS = {"decoder_lm": _check_decoder_lm, "mamba_lm": _check_mamba_lm,
                "sequence_classifier": _check_ssm_stack,
                "sequence_tagger": _check_ssm_stack, "mlp_denoiser": _check_mlp_denoiser}


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raise ValueError naming the field (and the valid choices) for any invalid setting."""
    check_fields(config, CHOICES, POSITIVE)
    if config.model.name in MODEL_CHECKS:
        MODEL_CHECKS[config.model.name](config)
    if set(config.mesh) - set(MESH_AXES):
        raise ValueError(f"config.mesh has unknown axes {sorted(set(config.mesh) - set(MESH_AXES))}; "
                         f"valid: {list(MESH_AXES)}")
    sizes = dict(zip(MESH_AXES, mesh_shape(dict(config.mesh), num_devices or jax.device_count())))
    error = strategy_error(config.parallel.strategy, dict(config.mesh), sizes, config.sharding_rules)
    if error:
        raise ValueError(error)
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"] * config.train.grad_accum_steps
    if config.data.global_batch_size % shards:
        raise ValueError(f"config.data.global_batch_size={config.data.global_batch_size} must be divisible by "
                         f"data x fsdp x expert x train.grad_accum_steps = {shards}")
    if config.data.global_batch_size % jax.process_count():
        raise ValueError(f"config.data.global_batch_size must be divisible by the {jax.process_count()} processes")
