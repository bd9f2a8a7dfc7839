import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops.losses import info_nce, info_nce_with_negatives, softmax_cross_entropy


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


def _info_nce_reference(positive, negatives):
    """Float64 NumPy InfoNCE (van den Oord et al. 2018, eq. 4): mean of -log(exp(f+) / sum of exp over candidates)."""
    candidates = np.concatenate([positive[..., None], negatives], -1).astype(np.float64)
    return np.mean(np.log(np.exp(candidates).sum(-1)) - positive)


@pytest.mark.parametrize("n", [1, 9])
def test_info_nce_in_batch_matches_float64_formula_and_gradient(n):
    scores = np.random.default_rng(n).normal(size=(n, n)).astype(np.float32) * 3
    off_diagonal = scores[~np.eye(n, dtype=bool)].reshape(n, n - 1)
    loss = info_nce(jnp.asarray(scores))
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, _info_nce_reference(np.diag(scores), off_diagonal), rtol=1e-5)
    p = np.exp(scores - scores.max(1, keepdims=True))
    np.testing.assert_allclose(jax.grad(info_nce)(jnp.asarray(scores)), (p / p.sum(1, keepdims=True) - np.eye(n)) / n,
                               atol=1e-6)
    assert np.log(n) - loss <= np.log(n)  # the mutual-information bound log N - L never exceeds log N


def test_info_nce_bound_ends():
    """Uninformative scores give L = log N (bound 0); well-separated positives give L -> 0 (bound -> log N)."""
    n = 8
    np.testing.assert_allclose(info_nce(jnp.zeros((n, n))), np.log(n), rtol=1e-6)
    np.testing.assert_allclose(np.log(n) - info_nce(30 * jnp.eye(n)), np.log(n), atol=1e-6)


@pytest.mark.parametrize("shape,k", [((5,), 1), ((2, 3), 7)])
def test_info_nce_with_negatives_matches_float64_formula(shape, k):
    rng = np.random.default_rng(k)
    positive, negatives = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape + (k,)).astype(np.float32)
    loss = info_nce_with_negatives(jnp.asarray(positive), jnp.asarray(negatives))
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, _info_nce_reference(positive, negatives), rtol=1e-5)
    grad_positive = jax.grad(info_nce_with_negatives)(jnp.asarray(positive), jnp.asarray(negatives))
    candidates = np.concatenate([positive[..., None], negatives], -1).astype(np.float64)
    softmax_positive = np.exp(positive) / np.exp(candidates).sum(-1)
    np.testing.assert_allclose(grad_positive, (softmax_positive - 1) / positive.size, atol=1e-6)


def test_info_nce_errors():
    with pytest.raises(ValueError, match=r"square \(N, N\)"):
        info_nce(jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="negative_scores"):
        info_nce_with_negatives(jnp.zeros((3,)), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="K >= 1"):
        info_nce_with_negatives(jnp.zeros((3,)), jnp.zeros((3, 0)))
