import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops.losses import (
    arcface_logits,
    cosface_logits,
    cosine_logits,
    info_nce,
    info_nce_with_negatives,
    softmax_cross_entropy,
)


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


def _arcface_float64(cosine, labels, s, m, easy):
    """ArcFace (Deng et al. 2019, eq. 3) through the angle itself: s·cos(arccos(c) + m) for the target, with the
    official code's fallbacks where θ + m >= π (or cos θ <= 0 with easy_margin)."""
    c = cosine.astype(np.float64)
    theta = np.arccos(c)
    with_margin = np.cos(theta + m)
    if easy:
        target = np.where(c > 0, with_margin, c)
    else:
        target = np.where(theta + m < np.pi, with_margin, c - m * np.sin(m))
    onehot = np.eye(c.shape[-1], dtype=bool)[labels]
    return s * np.where(onehot, target, c)


@pytest.mark.parametrize("margin,easy", [(0.5, False), (0.5, True), (0.2, False)])
def test_arcface_matches_float64_angle_formula(margin, easy):
    rng = np.random.default_rng(int(margin * 10) + easy)
    cosine = np.tanh(rng.normal(size=(6, 5)) * 2).astype(np.float32)
    labels = rng.integers(0, 5, 6)
    cosine[np.arange(3), labels[:3]] = [-0.95, 0.05, 0.999]  # beyond pi - m, near 0, near 1
    f = jax.jit(lambda c, y: arcface_logits(c, y, scale=30.0, margin=margin, easy_margin=easy))
    out = f(cosine, labels)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _arcface_float64(cosine, labels, 30.0, margin, easy), rtol=1e-5, atol=2e-5)
    # Gradient of the loss against the float64 reference's gradient by central differences, elementwise.
    with jax.enable_x64(True):
        c64 = jnp.asarray(cosine, jnp.float64)
        grad = jax.jit(jax.grad(lambda c: arcface_logits(c, jnp.asarray(labels), scale=30.0, margin=margin,
                                                         easy_margin=easy).sum()))(c64)
    eps = 1e-7
    numeric = (_arcface_float64(cosine.astype(np.float64) + eps, labels, 30.0, margin, easy)
               - _arcface_float64(cosine.astype(np.float64) - eps, labels, 30.0, margin, easy)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-4)


def test_margin_losses_properties():
    rng = np.random.default_rng(9)
    cosine = jnp.asarray(np.tanh(rng.normal(size=(4, 7))), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 7, 4))
    arc_zero, cos_zero, cos_face, arc, ce_margin, ce_plain = jax.jit(lambda c, y: (
        arcface_logits(c, y, scale=16.0, margin=0.0), cosface_logits(c, y, scale=16.0, margin=0.0),
        cosface_logits(c, y, scale=64.0, margin=0.35), arcface_logits(c, y, scale=16.0, margin=0.3),
        softmax_cross_entropy(arcface_logits(c, y, scale=16.0, margin=0.3), y),
        softmax_cross_entropy(16 * c, y)))(cosine, labels)
    np.testing.assert_allclose(arc_zero, 16 * cosine, rtol=1e-6)
    np.testing.assert_allclose(cos_zero, 16 * cosine, rtol=1e-6)
    np.testing.assert_allclose(cos_face, 64 * (np.asarray(cosine) - 0.35 * np.eye(7)[np.asarray(labels)]), rtol=1e-6)
    # A margin only lowers the target logit and leaves the others, so it raises the cross entropy.
    others = ~np.eye(7, dtype=bool)[np.asarray(labels)]
    np.testing.assert_array_equal(np.asarray(arc)[others], 16 * np.asarray(cosine)[others])
    assert np.all(np.asarray(arc)[~others] < 16 * np.asarray(cosine)[~others])
    assert np.all(ce_margin > ce_plain)
    # Finite gradients where sin θ = 0 (cos θ = ±1).
    edge = jnp.asarray([[1.0, -1.0]])
    g = jax.jit(jax.grad(lambda c: arcface_logits(c, jnp.asarray([0]), scale=2.0).sum()))(edge)
    assert np.isfinite(g).all()


def test_cosine_logits_normalise_both_sides():
    rng = np.random.default_rng(10)
    x, w = rng.normal(size=(3, 4)), rng.normal(size=(4, 5))
    expected = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0, keepdims=True))
    np.testing.assert_allclose(jax.jit(cosine_logits)(jnp.asarray(x * 7, jnp.float32), jnp.asarray(w, jnp.float32)),
                               expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must agree in D"):
        cosine_logits(jnp.zeros((3, 4)), jnp.zeros((5, 5)))
    with pytest.raises(ValueError, match="margin"):
        arcface_logits(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), margin=2.0)
    with pytest.raises(ValueError, match="labels"):
        cosface_logits(jnp.zeros((2, 3)), jnp.zeros((3,), jnp.int32))
