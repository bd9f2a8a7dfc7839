"""Loss scaling in the train step (config.precision): the scale halves on a float16 overflow and that update alone
is skipped, it grows after growth_interval finite steps, a resumed run keeps it, a float16 LM with dynamic scaling
follows float32's loss curve, and the section is validated."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxmodels.models.lm import DecoderLM
from jaxmodels.ops import precision
from jaxmodels.train.config import ConfigError, validate_config
from jaxmodels.train.loop import Trainer
from jaxmodels.train.loss_scaling import LossScaling, loss_scaling_from_config
from jaxmodels.train.step import make_train_step
from tests.tiny import tiny_config


class HalfLinear(nnx.Module):
    """float32 master weight (4, 3), float16 arithmetic."""

    def __init__(self):
        self.w = nnx.Param(jax.random.normal(jax.random.key(0), (4, 3)) / 2)


def half_loss(model, x):
    h = x.astype(jnp.float16) @ model.w.value.astype(jnp.float16)  # (8, 3) float16
    loss = jnp.mean(jnp.square(h.astype(jnp.float32)))
    return loss, {"loss": loss}


def _toy_run(batches, loss_scaling):
    graphdef, params = nnx.split(HalfLinear())
    params, tx = params.to_pure_dict(), optax.adam(1e-2)
    step = jax.jit(make_train_step(graphdef, half_loss, tx, optax.constant_schedule(1e-2), 2,
                                   loss_scaling=loss_scaling))
    state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params), **loss_scaling.state()}
    states, metrics = [state], []
    for batch in batches:
        state, m = step(state, batch)
        states.append(state)
        metrics.append(m)
    return states, metrics


def test_overflow_halves_the_scale_skips_exactly_that_update_and_the_scale_grows_after_the_interval():
    normal = [jax.random.normal(jax.random.key(i), (8, 4)) for i in range(1, 5)]
    # Its float16 weight gradient is ~1.5e3, times S = 2^10 more than float16's 65504: the backward pass overflows.
    overflow = jnp.full((8, 4), 30.0)
    scaling = LossScaling("dynamic", init_scale=2.0**10, growth_interval=2)
    states, metrics = _toy_run([normal[0], overflow, normal[1], normal[2], normal[3]], scaling)
    scales = [float(m["loss_scale"]) for m in metrics]
    assert [int(m["nonfinite"]) for m in metrics] == [0, 1, 0, 0, 0]
    assert np.isfinite(float(metrics[1]["loss"])) and not np.isfinite(float(metrics[1]["grad_norm"]))
    # 2^10 used, then overflow at 2^10 -> 2^9, two finite steps at 2^9 -> 2^10.
    assert scales == [2.0**10, 2.0**10, 2.0**9, 2.0**9, 2.0**10]
    assert float(states[-1]["loss_scale"].scale) == 2.0**10 and int(states[-1]["loss_scale"].good_steps) == 1
    before, after = states[1], states[2]  # around the overflowing step: nothing changes but the counters
    jax.tree.map(np.testing.assert_array_equal, (before["params"], before["opt_state"]),
                 (after["params"], after["opt_state"]))
    assert int(after["step"]) == int(before["step"]) + 1
    # The other updates are those of a run that never saw the overflowing batch, without loss scaling: a power-of-two
    # scale is exact in float16 for these values.
    unscaled, _ = _toy_run(normal, LossScaling())
    np.testing.assert_allclose(states[-1]["params"]["w"], unscaled[-1]["params"]["w"], rtol=1e-6)
    assert "loss_scale" not in unscaled[-1]


def test_static_scale_stays_and_the_default_adds_no_state():
    static = LossScaling("static", init_scale=8.0)
    states, metrics = _toy_run([jnp.full((8, 4), 30.0)], static)  # S = 8 keeps its gradient (~1.2e4) finite
    assert int(metrics[0]["nonfinite"]) == 0 and float(states[-1]["loss_scale"].scale) == 8.0
    assert isinstance(states[-1]["loss_scale"], precision.StaticLossScale)
    assert LossScaling().state() == {} and LossScaling().state_specs() == {}


def _lm_losses(dtype, loss_scaling, steps=10):
    model = DecoderLM(vocab_size=32, num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=2, head_dim=16,
                      mlp_dim=64, dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    params, tx = params.to_pure_dict(), optax.adam(3e-3)

    def loss_fn(model, tokens):
        logits = model(tokens[:, :-1])
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))
        return loss, {"loss": loss}

    step = jax.jit(make_train_step(graphdef, loss_fn, tx, optax.constant_schedule(3e-3), loss_scaling=loss_scaling))
    state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params), **loss_scaling.state()}
    # Rows of a noisy counting sequence: learnable, so that the loss falls.
    tokens = (jnp.arange(17)[None] + jnp.arange(8)[:, None] * 3) % 32
    losses = []
    for i in range(steps):
        state, metrics = step(state, tokens.at[:, ::5].set(jax.random.randint(jax.random.key(i), (8, 4), 0, 32)))
        losses.append(float(metrics["loss"]))
    return np.asarray(losses), state


def test_float16_lm_with_dynamic_scaling_follows_float32():
    reference, _ = _lm_losses(jnp.float32, LossScaling())
    half, state = _lm_losses(jnp.float16, LossScaling("dynamic", init_scale=2.0**15, growth_interval=4))
    assert reference[-1] < reference[0] - 0.5  # it learns
    np.testing.assert_allclose(half, reference, atol=0.01)  # float16 rounding: ~2e-4 here
    assert float(state["loss_scale"].scale) >= 2.0**15  # no overflow at this size: it grew


def test_resume_restores_the_loss_scale(tmp_path):
    config = tiny_config(model__dtype="float16", precision__loss_scale="dynamic")
    trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:1])
    _, state = trainer.restore_or_init()
    assert float(state["loss_scale"].scale) == 2.0**15
    state["loss_scale"] = precision.DynamicLossScale(jnp.float32(1024.0), jnp.int32(7))
    trainer.checkpointer.save_final(3, state)
    trainer.checkpointer.close()
    step, restored = Trainer(config, str(tmp_path), devices=jax.devices()[:1]).restore_or_init()
    assert step == 3 and isinstance(restored["loss_scale"], precision.DynamicLossScale)
    assert (float(restored["loss_scale"].scale), int(restored["loss_scale"].good_steps)) == (1024.0, 7)


@pytest.mark.parametrize("field, value, error, match", [
    ("loss_scale", "auto", ValueError, "config.precision.loss_scale='auto'"),
    ("init_scale", 0.0, ValueError, r"config.precision.init_scale must be a real number in \(0, inf\)"),
    ("init_scale", float("inf"), ValueError, "config.precision.init_scale"),
    ("growth_interval", 0, ValueError, "config.precision.growth_interval must be a positive int"),
    ("growth_factor", 1.0, ValueError, r"config.precision.growth_factor must be a real number in \(1, inf\)"),
    ("backoff_factor", 1.0, ValueError, r"config.precision.backoff_factor must be a real number in \(0, 1\)"),
    ("backoff_factor", "0.5", TypeError, "config.precision.backoff_factor"),
])
def test_fields_out_of_range_are_refused(field, value, error, match):
    with pytest.raises(error, match=match):
        LossScaling(**{field: value})


def test_config_checks_and_notes():
    with pytest.raises(ConfigError, match="config.precision has unknown fields"):
        validate_config(tiny_config(precision__scale=2.0), num_devices=1)
    with pytest.raises(ConfigError, match="nan_policy='halt' would stop at the first"):
        validate_config(tiny_config(precision__loss_scale="dynamic", train__nan_policy="halt"), num_devices=1)
    config = tiny_config()
    del config.precision  # a config without the section has no loss scaling
    assert loss_scaling_from_config(config) == LossScaling()
    model = dict(dtype="float16", param_dtype="float32")
    assert "flush to zero" in LossScaling().note(tiny_config(model__dtype="float16").model)
    assert LossScaling("dynamic").note(tiny_config(**{f"model__{k}": v for k, v in model.items()}).model) is None
    assert "pointless" in LossScaling("static").note(tiny_config(model__dtype="bfloat16").model)
    assert LossScaling().note(tiny_config().model) is None
    assert dataclasses.asdict(LossScaling()) == dict(tiny_config().precision)
