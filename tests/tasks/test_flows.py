"""The flow likelihood task: bits/dim of dequantised data, the map to the flow's space and back, batches,
baselines and config checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import flow_digits, flow_toy2d
from jaxmodels.tasks import make_task
from tests.tiny import apply_overrides


def _digits_task(**overrides):
    config = apply_overrides(flow_digits.get_config(), {"model.name": "nice", "model.nice.hidden_dim": 4,
                                                        "model.nice.num_hidden": 1, "data.global_batch_size": 8,
                                                        **overrides})
    return make_task(config)


def test_identity_flow_bits_per_dim_is_the_closed_form_of_the_dequantised_gaussian():
    """NICE starts as the identity (zero-initialised couplings, scaling 0); with preprocess="centre" its density is
    N(v; 0, I) at v = y - 1/2 in [-1/2, 1/2), so bits/dim = (-log N(v) / D + log K) / log 2 lies in
    [(log 2π / 2 + log K) / log 2, ((log 2π + 1/4) / 2 + log K) / log 2] whatever u, and the mean square of v
    it implies is E_u[((x + u) / K - 1/2)^2] = ((x + 1/2) / K - 1/2)^2 + 1 / (12 K^2) averaged over the pixels."""
    task = _digits_task(**{"flow.preprocess": "centre"})
    model = task.build_model(nnx.Rngs(0))
    batch = task.eval_batches()[0]
    loss, metrics = jax.jit(task.loss)(model, batch)
    k = 17
    low, high = (0.5 * math.log(2 * math.pi) + math.log(k)) / math.log(2), \
        (0.5 * (math.log(2 * math.pi) + 0.25) + math.log(k)) / math.log(2)
    assert low < float(loss) < high
    assert float(metrics["bits_per_dim"]) == float(loss)
    np.testing.assert_allclose(metrics["nll_nats"], float(loss) * 64 * math.log(2), rtol=1e-5)
    v_mean_square = 2 * (float(loss) * math.log(2) - math.log(k)) - math.log(2 * math.pi)
    x = batch["inputs"].astype(np.float64)
    np.testing.assert_allclose(v_mean_square, np.mean(((x + 0.5) / k - 0.5) ** 2) + 1 / (12 * k**2), atol=2e-3)


@pytest.mark.parametrize("preprocess", ["logit", "centre"])
def test_to_data_inverts_the_preprocessing_to_the_pixel_values(preprocess):
    task = _digits_task(**{"flow.preprocess": preprocess})
    pixels = jnp.arange(17, dtype=jnp.float32).reshape(1, 17)
    for u in (0.01, 0.5, 0.99):
        v, log_det = task.preprocess((pixels + u) / 17)
        np.testing.assert_array_equal(task.to_data(v), pixels)
    assert preprocess == "centre" or float(jnp.abs(log_det).max()) > 1  # the logit's log-det is counted


def test_batches_are_pure_functions_of_seed_and_step_and_eval_is_the_test_split():
    task = _digits_task()
    a, b = next(task.train_batches(3, 0, 1)), next(task.train_batches(3, 0, 1))
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["seed"], b["seed"])
    assert a["inputs"].shape == (8, 8, 8, 1) and a["inputs"].max() <= 16 and np.all(a["inputs"] % 1 == 0)
    halves = [next(task.train_batches(3, p, 2)) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]), a["inputs"])
    baseline = task.baseline()
    assert 2.0 < baseline["independent_pixels_bits_per_dim"] < baseline["uniform_bits_per_dim"] == math.log2(17)


def test_toy_loss_is_the_mean_negative_log_density_in_nats():
    config = apply_overrides(flow_toy2d.get_config(), {"model.realnvp.hidden_dim": 4, "model.realnvp.num_couplings": 2,
                                                       "data.global_batch_size": 16})
    task = make_task(config)
    model = task.build_model(nnx.Rngs(0))
    batch = task.eval_batches()[0]
    (loss, metrics), log_prob = jax.jit(lambda m, b: (task.loss(m, b), m.log_prob(b["inputs"])))(model, batch)
    np.testing.assert_allclose(loss, -jnp.mean(log_prob), rtol=1e-6)
    np.testing.assert_allclose(metrics["bits_per_dim"], float(loss) / 2 / math.log(2), rtol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"model.input_shape": (4, 4, 1)}, r"config.model.input_shape=\(4, 4, 1\) must be the shape"),
    ({"flow.preprocess": "sigmoid"}, "config.flow.preprocess"),
    ({"data.name": "cifar10"}, "config.data.name"),
    ({"data.eval_seed": 0}, "eval_seed must differ"),
])
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        _digits_task(**overrides)
