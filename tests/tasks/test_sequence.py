"""Sequence tasks: masked token loss and weighted classification loss against NumPy, batch shapes,
length-generalisation evaluation, a few training steps, and the config errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import ssm_digits, ssm_induction_heads, ssm_selective_copying
from jaxmodels.tasks import make_task
from jaxmodels.tasks.sequence import masked_token_loss, weighted_classification_loss
from jaxmodels.train.config import validate_config
from tests.fitting import adam_losses


def _log_softmax64(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _tiny_token_config(config_module, kind, **data):
    config = config_module.get_config()
    config.model = ssm_selective_copying.token_model(kind, num_layers=1, d_model=16)
    config.data.update(global_batch_size=4, eval_batches=2, **data)
    return config


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_token_loss_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(3, 7, 5)).astype(np.float32)
    batch = {"inputs": np.zeros((3, 7), np.int32), "targets": rng.integers(0, 5, (3, 7)).astype(np.int32),
             "mask": rng.random((3, 7)) < 0.4}
    batch["mask"][0, 0] = True
    loss, metrics = masked_token_loss(lambda x: jnp.asarray(logits), batch)
    ce = -np.take_along_axis(_log_softmax64(logits), batch["targets"][..., None], -1)[..., 0]
    m = batch["mask"]
    np.testing.assert_allclose(loss, ce[m].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], (logits.argmax(-1) == batch["targets"])[m].mean(), rtol=1e-6)


def test_weighted_classification_loss_matches_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(6, 10)).astype(np.float32)
    batch = {"inputs": np.zeros((6, 64, 1), np.float32), "labels": rng.integers(0, 10, 6).astype(np.int32),
             "weights": rng.random(6).astype(np.float32)}
    loss, metrics = weighted_classification_loss(lambda x: jnp.asarray(logits), batch)
    ce = -np.take_along_axis(_log_softmax64(logits), batch["labels"][:, None], -1)[:, 0]
    np.testing.assert_allclose(loss, np.mean(batch["weights"] * ce), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(batch["weights"] * (logits.argmax(-1) == batch["labels"])),
                               rtol=1e-6)


@pytest.mark.parametrize("config", [
    _tiny_token_config(ssm_selective_copying, "s4d", seq_len=40, num_tokens=4),
    _tiny_token_config(ssm_induction_heads, "mamba", seq_len=24),
    ssm_digits.get_config()], ids=["copying", "induction", "digits"])
def test_abstract_batch_matches_train_and_eval_batches(config):
    task = make_task(config)
    spec = {k: (v.shape, v.dtype) for k, v in task.abstract_batch().items()}
    for batch in (next(task.train_batches(3, 0, 1)), *task.eval_batches()):
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec


def test_digits_eval_batches_give_the_exact_test_mean():
    config = ssm_digits.get_config()
    config.data.global_batch_size = 64  # 297 test digits: 5 batches, the last one padded
    task = make_task(config)
    batches = task.eval_batches()

    def model(x):  # a fixed "classifier" of the pixels: the 10 first pixels' values as logits
        return x[:, :10, 0] + 0.01 * jnp.arange(10)

    per_batch = [weighted_classification_loss(model, {k: jnp.asarray(v) for k, v in b.items()})[1]["accuracy"]
                 for b in batches]
    inputs = np.concatenate([b["inputs"] for b in batches])[:297]
    labels = np.concatenate([b["labels"] for b in batches])[:297]
    expected = np.mean(np.asarray(model(inputs)).argmax(-1) == labels)
    np.testing.assert_allclose(np.mean(per_batch), expected, rtol=1e-6)
    assert np.count_nonzero(np.concatenate([b["weights"] for b in batches])) == 297


def _train(task, num_steps, learning_rate=1e-2):
    """Losses of `num_steps` Adam steps on one training batch."""
    batch = next(task.train_batches(0, 0, 1))
    return adam_losses(task.build_model(nnx.Rngs(0)), lambda m: task.loss(m, batch)[0], num_steps, learning_rate)


@pytest.mark.parametrize("kind", ["s4d", "mamba", "attention"])
def test_a_few_steps_reduce_the_induction_loss(kind):
    task = make_task(_tiny_token_config(ssm_induction_heads, kind, seq_len=16))
    losses = _train(task, 8)
    assert losses[-1] < 0.8 * losses[0], losses


def test_a_few_steps_reduce_the_digits_loss():
    config = ssm_digits.get_config()
    config.model.update(num_layers=1, d_model=16, d_state=8, mlp_dim=32)
    config.data.global_batch_size = 16
    losses = _train(make_task(config), 8)
    assert losses[-1] < 0.8 * losses[0], losses


def test_evaluate_lengths_and_sample():
    task = make_task(_tiny_token_config(ssm_induction_heads, "s4d", seq_len=16))
    model = task.build_model(nnx.Rngs(0))
    out = task.evaluate_lengths(model, [16, 48], batch_size=2)
    assert sorted(out) == [16, 48]
    for metrics in out.values():
        assert 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["loss"])
    assert task.sample(model, 0).startswith("target:")
    assert task.baseline() == {"chance_accuracy": 1 / 15}


@pytest.mark.parametrize("field, value, match", [
    ("model.mixer", "gru", "model.mixer"),
    ("model.pooling", "max", "model.pooling"),
    ("model.norm_kind", "batch", "model.norm_kind"),
    ("model.num_layers", 0, "model.num_layers"),
])
def test_sequence_classifier_config_errors_name_the_field(field, value, match):
    config = ssm_digits.get_config()
    section, leaf = field.split(".")
    config[section][leaf] = value
    with pytest.raises(ValueError, match=match):
        validate_config(config, num_devices=1)


def test_sequence_tagger_config_is_checked_too():
    config = _tiny_token_config(ssm_selective_copying, "s4d")
    validate_config(config, num_devices=1)
    config.model.mixer = "gru"
    with pytest.raises(ValueError, match="model.mixer"):
        validate_config(config, num_devices=1)


def test_task_errors():
    config = _tiny_token_config(ssm_selective_copying, "mamba")
    config.model.vocab_size = 17
    with pytest.raises(ValueError, match="model.vocab_size"):
        make_task(config)
    config = _tiny_token_config(ssm_selective_copying, "s4d")
    config.model.num_classes = 10
    with pytest.raises(ValueError, match="num_classes"):
        make_task(config)
    config = _tiny_token_config(ssm_selective_copying, "mamba")
    config.data.eval_seed = config.data.seed
    with pytest.raises(ValueError, match="eval_seed"):
        make_task(config).eval_batches()
    config = ssm_digits.get_config()
    config.task = "sequence_tokens"
    with pytest.raises(ValueError, match="token task"):
        make_task(config)
    config = ssm_digits.get_config()
    config.model.in_features = 3
    with pytest.raises(ValueError, match="in_features=1"):
        make_task(config)

