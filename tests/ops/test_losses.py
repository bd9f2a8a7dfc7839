import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops.losses import softmax_cross_entropy


def _reference(logits, labels):
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, labels[..., None], -1)[..., 0]


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 11), (1, 256)])
def test_matches_float64_reference_and_gradient(shape):
    rng = np.random.default_rng(sum(shape))
    logits = rng.normal(size=shape).astype(np.float32) * 4
    labels = rng.integers(0, shape[-1], size=shape[:-1])
    out = softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _reference(logits, labels), rtol=1e-5, atol=1e-5)
    # d/dlogits of sum CE = softmax - onehot
    g = jax.grad(lambda z: softmax_cross_entropy(z, jnp.asarray(labels)).sum())(jnp.asarray(logits))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(g, p - np.eye(shape[-1])[labels], atol=1e-5)


def test_bfloat16_logits_computed_in_float32():
    logits = jax.random.normal(jax.random.key(0), (4, 300)).astype(jnp.bfloat16) * 10
    labels = jnp.arange(4)
    out = softmax_cross_entropy(logits, labels)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _reference(np.asarray(logits.astype(jnp.float32)), np.arange(4)), rtol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="labels"):
        softmax_cross_entropy(jnp.zeros((3, 4)), jnp.zeros((4,), jnp.int32))
    with pytest.raises(TypeError, match="integer"):
        softmax_cross_entropy(jnp.zeros((3, 4)), jnp.zeros((3,)))
