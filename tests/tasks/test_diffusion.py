"""The diffusion task: loss == the ops losses on the same draws, batch structure, purity of batches,
guided sampling, the digit classifier's fit and sample metrics, config validation."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.data import digits
from jaxmodels.models.classifier import DigitClassifier
from jaxmodels.models.mlp_denoiser import MLPDenoiser
from jaxmodels.ops import diffusion as D
from jaxmodels.tasks import make_task
from jaxmodels.tasks.diffusion import (
    DiffusionSpec,
    diffusion_loss,
    digit_sample_metrics,
    fit_digit_classifier,
    generate,
    sample,
)
from jaxmodels.tasks.metrics import frechet_distance


def _model(num_classes=0, seed=0):
    model = MLPDenoiser(in_features=2, hidden_dim=16, num_layers=1, frequency_dim=8, num_classes=num_classes,
                        rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)  # move the zero-initialised output off zero
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return nnx.merge(graphdef, jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape)
                                                         for x, k in zip(leaves, keys)]))


def _batch(n=6, labels=None):
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.standard_normal((n, 2)).astype(np.float32),
             "seed": rng.integers(0, 2**32, n, dtype=np.uint32)}
    if labels is not None:
        batch["labels"] = labels
    return batch


def _draws(batch, draw_level):
    """The documented recipe: k_i = key(seed_i) -> (k_level, k_noise, k_drop)."""
    levels, noise = [], []
    for s, x in zip(batch["seed"], batch["inputs"]):
        k_level, k_noise, _ = jax.random.split(jax.random.key(int(s)), 3)
        levels.append(draw_level(k_level))
        noise.append(jax.random.normal(k_noise, x.shape))
    return jnp.stack(levels), jnp.stack(noise)


@pytest.mark.parametrize("objective", ["ddpm", "edm", "flow"])
def test_loss_equals_the_ops_loss(objective):
    spec = DiffusionSpec(objective=objective, prediction="v", min_snr_gamma=5.0, num_timesteps=100,
                         sigma_data=0.7, t_sampling="uniform", shift=2.0, time_scale=500.0)
    model, batch = _model(), _batch()
    got, metrics = diffusion_loss(model, batch, spec=spec)
    x0 = jnp.asarray(batch["inputs"])
    if objective == "ddpm":
        t, noise = _draws(batch, lambda k: jax.random.randint(k, (), 0, 100))
        want = D.ddpm_loss(lambda x, t: model(x, t.astype(jnp.float32)), x0, None, spec.alphas_cumprod(),
                           target="v", min_snr_gamma=5.0, t=t, noise=noise)
    elif objective == "edm":
        sigma, noise = _draws(batch, lambda k: D.edm_sigma_sample(k, ()))
        want = D.edm_loss(D.edm_denoiser(lambda x, c: model(x, 500.0 * c), 0.7), x0, None, sigma_data=0.7,
                          sigma=sigma, noise=noise)
    else:
        t, noise = _draws(batch, lambda k: D.shift_timesteps(jax.random.uniform(k, ()), 2.0))
        want = D.flow_matching_loss(lambda x, t: model(x, 500.0 * t), x0, None, t=t, noise=noise)
    np.testing.assert_allclose(got, jnp.mean(want), rtol=1e-5)
    assert metrics["loss"] == got


def test_label_dropout_and_reflow_noise():
    model, labels = _model(num_classes=3), np.array([0, 1, 2, 0, 1, 2], np.int32)
    batch = _batch(labels=labels)
    t, noise = _draws(batch, lambda k: D.logit_normal_timesteps(k, ()))
    x0 = jnp.asarray(batch["inputs"])
    for p, used in ((0.0, labels), (1.0, np.full(6, 3))):
        got, _ = diffusion_loss(model, batch, spec=DiffusionSpec(objective="flow", label_dropout=p, num_classes=3))
        want = D.flow_matching_loss(lambda x, s: model(x, 1000.0 * s, jnp.asarray(used)), x0, None, t=t, noise=noise)
        np.testing.assert_allclose(got, jnp.mean(want), rtol=1e-5)
    coupled = {**batch, "noise": np.ones((6, 2), np.float32)}  # reflow: the batch's noise is used
    got, _ = diffusion_loss(model, coupled, spec=DiffusionSpec(objective="flow", label_dropout=0.0, num_classes=3))
    want = D.flow_matching_loss(lambda x, s: model(x, 1000.0 * s, jnp.asarray(labels)), x0, None, t=t,
                                noise=jnp.ones((6, 2)))
    np.testing.assert_allclose(got, jnp.mean(want), rtol=1e-5)


def _config(name, **changes):
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    for path, value in changes.items():
        node = config
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


@pytest.mark.parametrize("name", ["diffusion_toy2d", "diffusion_digits"])
def test_abstract_batch_matches_real_batches_and_batches_are_pure(name):
    task = make_task(_config(name, **{"data.global_batch_size": 8, "data.eval_batches": 1}))
    shapes = jax.tree.map(lambda s: (s.shape, s.dtype), task.abstract_batch())
    batches = task.train_batches(0, 0, 1)
    first = [next(batches) for _ in range(3)]
    for b in first + task.eval_batches():
        assert jax.tree.map(lambda a: (a.shape, a.dtype), b) == shapes
    resumed = next(task.train_batches(2, 0, 1))
    jax.tree.map(np.testing.assert_array_equal, resumed, first[2])
    halves = [next(task.train_batches(2, p, 2)) for p in range(2)]
    jax.tree.map(lambda a, b, c: np.testing.assert_array_equal(np.concatenate([a, b]), c), *halves, first[2])


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="config.diffusion.objective"):
        make_task(_config("diffusion_toy2d", **{"diffusion.objective": "score"}))
    with pytest.raises(ValueError, match="config.sample.sampler"):
        make_task(_config("diffusion_toy2d", **{"diffusion.objective": "edm", "sample.sampler": "euler_ddpm"}))
    with pytest.raises(ValueError, match="config.model.name"):
        make_task(_config("diffusion_toy2d", **{"data.name": "digits"}))
    with pytest.raises(ValueError, match="pairs_path"):
        make_task(_config("diffusion_toy2d", **{"diffusion.objective": "edm", "sample.sampler": "heun",
                                                "data.pairs_path": "/nonexistent.npz"}))


@pytest.mark.parametrize("objective,sampler", [("flow", "heun"), ("edm", "euler"), ("ddpm", "ddim")])
def test_guidance_one_is_the_conditional_model_and_zero_the_unconditional(objective, sampler):
    spec = DiffusionSpec(objective=objective, num_timesteps=50, num_classes=3)
    model, labels = _model(num_classes=3), jnp.array([0, 1, 2, 1])
    noise = jax.random.normal(jax.random.key(3), (4, 2))
    kw = dict(sampler=sampler, num_steps=3)
    plain = sample(model, spec, noise, labels, **kw)
    guided = sample(model, spec, noise, labels, guidance_scale=jnp.float32(1.0), **kw)
    np.testing.assert_allclose(guided, plain, rtol=1e-4, atol=1e-5)
    uncond = sample(model, spec, noise, jnp.full(4, 3), **kw)
    np.testing.assert_allclose(sample(model, spec, noise, labels, guidance_scale=jnp.float32(0.0), **kw), uncond,
                               rtol=1e-4, atol=1e-5)
    jitted = generate(model, spec, jax.random.key(0), (4, 2), labels, guidance_scale=1.0, **kw)
    k_noise, _ = jax.random.split(jax.random.key(0))
    np.testing.assert_allclose(jitted, sample(model, spec, jax.random.normal(k_noise, (4, 2)), labels, **kw),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit objective"):
        sample(model, spec, noise, labels, sampler="nonsense", num_steps=2)


def test_digit_sample_metrics_against_numpy():
    classifier = DigitClassifier(channels=4, feature_dim=8, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x, ref = rng.uniform(-1, 1, (30, 8, 8, 1)).astype(np.float32), rng.uniform(-1, 1, (40, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 10, 30)
    got = digit_sample_metrics(classifier, x, labels, ref)
    logits = np.asarray(classifier(jnp.asarray(x)))
    assert logits.shape == (30, 10) and classifier.features(jnp.asarray(x)).shape == (30, 8)
    assert got["accuracy"] == np.mean(logits.argmax(-1) == labels)
    want = frechet_distance(classifier.features(jnp.asarray(x)), classifier.features(jnp.asarray(ref)))
    np.testing.assert_allclose(got["frechet_distance"], want, rtol=1e-4, atol=1e-6)


def test_fit_digit_classifier_learns():
    images, labels, _ = digits.load_split("test")
    x = jnp.asarray(digits.to_unit_range(images))

    def accuracy(model):
        return np.mean(np.argmax(np.asarray(model(x)), -1) == labels)

    untrained = fit_digit_classifier(num_steps=1, learning_rate=0.0)
    assert accuracy(untrained) < 0.2 < 0.4 < accuracy(fit_digit_classifier(num_steps=40, batch_size=32))
