"""validate_config refuses every field outside its range before anything is built, naming the field and the
range (ConfigError, a ValueError)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from experiments.configs import diffusion_toy2d, lm_moe
from jaxmodels.models import make_model
from jaxmodels.train.config import ConfigError, validate_config
from tests.tiny import apply_overrides, tiny_config


def _refused(config, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(config, num_devices=1)


def test_moe_without_any_moe_block_is_refused():
    config = apply_overrides(lm_moe.get_config(), {"model.num_layers": 1})
    _refused(config, r"config.model.moe.num_experts=8 but no block is an MoE: config.model.num_layers=1 < "
                     r"config.model.moe.every=2")
    validate_config(apply_overrides(config, {"model.moe.every": 1}), num_devices=1)


@pytest.mark.parametrize("field, value, match", [
    ("learning_rate", -3e-3, r"learning_rate must be a real number in \(0, inf\)"),
    ("b1", -0.1, r"b1 must be a real number in \[0, 1\)"),
    ("b2", 1.5, r"b2 must be a real number in \[0, 1\)"),
    ("eps", 0.0, r"eps must be a real number in \(0, inf\)"),
    ("weight_decay", -0.1, r"weight_decay must be a real number in \[0, inf\)"),
    ("warmup_steps", -1, "warmup_steps must be a non-negative int"),
    ("min_lr_ratio", 1.5, r"min_lr_ratio must be a real number in \[0, 1\]"),
    ("grad_clip_norm", -1.0, r"grad_clip_norm must be a real number in \[0, inf\)"),
])
def test_optimizer_fields_out_of_range_are_refused(field, value, match):
    _refused(tiny_config(**{f"optimizer__{field}": value}), f"config.optimizer.{match}")


@pytest.mark.parametrize("field, value, match", [
    ("block_size", 0, "block_size must be a positive int"),
    ("window", -3, "window must be a non-negative int"),
    ("num_features", 0, "num_features must be a positive int"),
    ("max_positions", 0, "max_positions must be a positive int"),
    ("chunk_size", 0, "chunk_size must be a positive int"),
    ("rope_base", 0.0, r"rope_base must be a real number in \(0, inf\)"),
])
def test_attention_fields_out_of_range_are_refused(field, value, match):
    _refused(tiny_config(**{f"model__attention__{field}": value}), f"config.model.attention.{match}")


def test_sparse_block_size_zero_is_a_config_error_not_zero_division():
    _refused(tiny_config(model__attention__kind="sparse_fixed", model__attention__block_size=0),
             "config.model.attention.block_size must be a positive int")


def test_learned_positions_shorter_than_the_sequence_or_the_sample_are_refused():
    learned = dict(model__attention__position="learned", data__seq_len=32)
    _refused(tiny_config(**learned, model__attention__max_positions=16),
             "config.data.seq_len=32 is longer than the learned positions: config.model.attention.max_positions=16")
    _refused(tiny_config(**learned, model__attention__max_positions=40, sample__max_new_tokens=50),
             "config.sample.max_new_tokens=50 exceed config.model.attention.max_positions=40")


@pytest.mark.parametrize("position", ["rope", "rerope"])
def test_odd_head_dim_with_rope_is_refused(position):
    _refused(tiny_config(model__head_dim=7, model__attention__position=position),
             f"config.model.head_dim=7 must be even: config.model.attention.position='{position}'")
    validate_config(tiny_config(model__head_dim=7, model__attention__position="none"), num_devices=1)


@pytest.mark.parametrize("field, value, match", [
    ("top_k", 300, "config.sample.top_k must be at most the vocabulary size 256"),
    ("top_k", -1, "config.sample.top_k must be a non-negative int"),
    ("max_new_tokens", 0, "config.sample.max_new_tokens must be a positive int"),
    ("prompt", "", "config.sample.prompt must be a non-empty string"),
    ("temperature", -0.5, r"config.sample.temperature must be a real number in \[0, inf\)"),
    ("top_p", 0.0, r"config.sample.top_p must be a real number in \(0, 1\]"),
    ("top_p", 1.5, r"config.sample.top_p must be a real number in \(0, 1\]"),
])
def test_sample_section_is_checked_before_training(field, value, match):
    _refused(tiny_config(**{f"sample__{field}": value}), match)


def test_float16_model_runs_and_differentiates_on_the_cpu():
    """model.dtype=float16 is valid: its attention takes a path that compiles on the CPU (ops.attention)."""
    config = tiny_config(model__dtype="float16")
    validate_config(config, num_devices=1)
    graphdef, state = nnx.split(make_model(config.model, nnx.Rngs(0)))
    tokens = jnp.zeros((2, 9), jnp.int32)

    @jax.jit
    def loss(state):
        logits = nnx.merge(graphdef, state)(tokens[:, :-1])
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    value, grads = jax.value_and_grad(loss)(state)
    assert jnp.isfinite(value) and all(jnp.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_eval_batches_must_be_a_non_negative_int_and_positive_where_the_task_needs_batches():
    _refused(tiny_config(data__eval_batches=-1), "config.data.eval_batches must be a non-negative int, got -1")
    diffusion = diffusion_toy2d.get_config()
    diffusion.data.eval_batches = 0  # only a task that reads its whole eval split for 0 takes 0 (lm does)
    _refused(diffusion, "config.data.eval_batches must be a positive int, got 0")
