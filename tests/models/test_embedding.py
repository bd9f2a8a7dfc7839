"""Embedding classifier: the ArcFace, CosFace and softmax heads against a float64 NumPy reference, unit embeddings,
the parameter count, config errors, and a few training steps."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxmodels.models import check_model_config, make_model
from jaxmodels.models.embedding import EmbeddingClassifier
from jaxmodels.tasks.embedding import margin_classification_loss
from tests.fitting import adam_losses

SMALL = dict(in_channels=1, channels=4, num_stages=1, feature_dim=8, embed_dim=6, num_classes=5)


def _head_float64(e, w, labels, head, s, m):
    """The training logits from the unit vectors, angles taken explicitly: ArcFace s·cos(θ_y + m) (θ_y + m < π
    here), CosFace s·(cos θ_y - m), others s·cos θ_j."""
    e, w = np.asarray(e, np.float64), np.asarray(w, np.float64)
    cosine = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0, keepdims=True))
    target = np.eye(w.shape[1], dtype=bool)[labels]
    theta = np.arccos(np.clip(cosine, -1, 1))
    margin = np.cos(theta + m) if head == "arcface" else cosine - m
    return s * np.where(target, margin, cosine), s * cosine


@pytest.mark.parametrize("head, margin", [("arcface", 0.5), ("cosface", 0.35)])
def test_margin_heads_match_float64_and_embeddings_are_unit(head, margin):
    model = nnx.jit(lambda: EmbeddingClassifier(**SMALL, head=head, scale=16.0, margin=margin, rngs=nnx.Rngs(0)))()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(7, 8, 8, 1)), jnp.float32)
    labels = jnp.arange(7) % 5
    e, train, plain, unit = nnx.jit(lambda m: (m(x), m.classify(m(x), labels), m.classify(m(x)), m.embed(x)))(model)
    assert e.shape == (7, 6) and e.dtype == jnp.float32
    train_reference, plain_reference = _head_float64(e, model.class_weights.value, np.asarray(labels), head, 16.0,
                                                     margin)
    np.testing.assert_allclose(train, train_reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain, plain_reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)


def test_softmax_head_is_linear_and_the_count_adds_the_class_weights():
    model = nnx.jit(lambda: EmbeddingClassifier(**SMALL, head="softmax", rngs=nnx.Rngs(0)))()
    e = jnp.asarray(np.random.default_rng(1).normal(size=(3, 6)), jnp.float32)
    expected = np.asarray(e) @ np.asarray(model.class_weights.value) + np.asarray(model.class_bias.value)
    np.testing.assert_allclose(model.classify(e, jnp.zeros(3, jnp.int32)), expected, rtol=1e-5, atol=1e-6)
    count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
    trunk = count(nnx.eval_shape(lambda: EmbeddingClassifier(**SMALL, head="arcface", rngs=nnx.Rngs(0)).trunk))
    assert count(model) == trunk + 6 * 5 + 5


def test_config_errors_and_a_few_steps_reduce_the_arcface_loss():
    good = dict(name="embedding_classifier", dtype="float32", param_dtype="float32", head="arcface", scale=8.0,
                margin=0.3, **SMALL)
    check_model_config(ml_collections.ConfigDict(good))
    for change, message in (({"head": "triplet"}, "config.model.head='triplet' is not valid"),
                            ({"margin": 2.0}, "config.model.margin"), ({"scale": 0.0}, "config.model.scale")):
        with pytest.raises(ValueError, match=message):
            check_model_config(ml_collections.ConfigDict({**good, **change}))
    model = nnx.jit(lambda: make_model(ml_collections.ConfigDict(good), nnx.Rngs(0)))()
    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.normal(size=(10, 8, 8, 1)), jnp.float32), "labels": jnp.arange(10) % 5,
             "weights": jnp.ones(10)}
    losses = adam_losses(model, lambda m: margin_classification_loss(m, batch)[0], 15, learning_rate=1e-2)
    assert losses[-1] < 0.7 * losses[0]  # the margin keeps the loss from vanishing fast
