import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxmodels.models.autoencoder import (
    KLAutoencoder,
    autoencoder_loss,
    kl_divergence,
    reconstruction_loss,
    sample_latent,
)
from tests.models.test_dit import matmul_dtypes

CONFIG = dict(in_channels=1, latent_channels=2, base_channels=16, channel_mult=(1, 2), num_res_blocks=0)


@pytest.fixture(scope="module")
def model():
    return nnx.jit(lambda: KLAutoencoder(**CONFIG, rngs=nnx.Rngs(0)))()


def test_shapes_and_dtypes(model):
    x = jnp.zeros((2, 8, 8, 1))
    for dtype in (jnp.float32, jnp.bfloat16):
        abstract = nnx.eval_shape(lambda: KLAutoencoder(**CONFIG, dtype=dtype, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        rec, mean, logvar = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(x, jax.random.key(0)), state)
        assert mean.shape == logvar.shape == (2, 4, 4, 2) and rec.shape == x.shape
        assert rec.dtype == mean.dtype == jnp.float32
        assert matmul_dtypes(abstract, x, jax.random.key(0)) == {jnp.dtype(dtype).name}
    four = nnx.eval_shape(lambda: KLAutoencoder(**{**CONFIG, "channel_mult": (1, 1, 2)}, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(four)
    assert jax.eval_shape(lambda s: nnx.merge(graphdef, s).encode(x), state)[0].shape == (2, 2, 2, 2)
    with pytest.raises(ValueError, match="divisible"):
        model.encode(jnp.zeros((2, 7, 8, 1)))


def test_kl_and_reconstruction_match_numpy():
    rng = np.random.default_rng(0)
    mean, logvar = rng.normal(size=(3, 2, 2, 4)), rng.normal(size=(3, 2, 2, 4))
    ref = np.array([np.sum(0.5 * (m**2 + np.exp(lv) - 1 - lv)) for m, lv in zip(mean, logvar)])
    np.testing.assert_allclose(kl_divergence(jnp.asarray(mean), jnp.asarray(logvar)), ref, rtol=1e-5)
    np.testing.assert_allclose(kl_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 3))), 0.0)
    # Against a Monte-Carlo estimate of E_q[log q(z) - log p(z)] for one example.
    z = mean[0] + np.exp(0.5 * logvar[0]) * rng.normal(size=(100000,) + mean[0].shape)
    log_q = -0.5 * ((z - mean[0]) ** 2 / np.exp(logvar[0]) + logvar[0])
    log_p = -0.5 * z**2
    np.testing.assert_allclose(np.sum(np.mean(log_q - log_p, axis=0)), ref[0], rtol=2e-2)
    # Gradient of the KL: d/dmean = mean, d/dlogvar = (exp(logvar) - 1) / 2.
    gm, gl = jax.grad(lambda m, lv: jnp.sum(kl_divergence(m, lv)), argnums=(0, 1))(jnp.asarray(mean),
                                                                                    jnp.asarray(logvar))
    np.testing.assert_allclose(gm, mean, rtol=1e-5)
    np.testing.assert_allclose(gl, (np.exp(logvar) - 1) / 2, rtol=1e-4, atol=1e-6)
    x, y = rng.normal(size=(2, 3, 3, 1)), rng.normal(size=(2, 3, 3, 1))
    np.testing.assert_allclose(reconstruction_loss(jnp.asarray(x), jnp.asarray(y)), ((x - y) ** 2).sum((1, 2, 3)),
                               rtol=1e-5)
    np.testing.assert_allclose(reconstruction_loss(jnp.asarray(x), jnp.asarray(y), "l1"), abs(x - y).sum((1, 2, 3)),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="reconstruction loss"):
        reconstruction_loss(jnp.asarray(x), jnp.asarray(y), "l3")


def test_sample_latent_has_the_given_moments():
    mean, logvar = jnp.array([[1.0, -2.0]]), jnp.array([[0.0, np.log(0.25)]])
    z = jax.vmap(lambda k: sample_latent(mean, logvar, k))(jax.random.split(jax.random.key(0), 20000))
    np.testing.assert_allclose(z.mean(0), mean, atol=0.03)
    np.testing.assert_allclose(z.std(0), jnp.exp(0.5 * logvar), atol=0.03)


def test_a_few_adam_steps_improve_the_reconstruction(model):
    rows, cols = jnp.meshgrid(jnp.arange(8), jnp.arange(8), indexing="ij")
    centres = jnp.arange(8) % 5 + 1.5
    x = jnp.exp(-((rows - centres[:, None, None]) ** 2 + (cols - centres[::-1, None, None]) ** 2) / 4.0)[..., None]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(p, opt, key):
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: autoencoder_loss(nnx.merge(graphdef, p, rest), x, key, kl_weight=1e-3), has_aux=True)(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, metrics["reconstruction"]

    opt = tx.init(params)
    before = step(params, opt, jax.random.key(-1))[2]
    for i in range(8):
        params, opt, _ = step(params, opt, jax.random.key(i))
    after = step(params, opt, jax.random.key(-1))[2]
    print(f"reconstruction {float(before):.3f} -> {float(after):.3f}")
    assert after < 0.5 * before
