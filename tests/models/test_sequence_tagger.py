"""SequenceTagger: per-position logits, causality, parameter count, argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.models.sequence_classifier import SequenceClassifier
from jaxmodels.models.sequence_tagger import SequenceTagger


def _tagger(mixer="s4d", **kw):
    return SequenceTagger(num_classes=7, vocab_size=7, d_model=16, num_layers=2, mixer=mixer, d_state=8, mlp_dim=32,
                          rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize("mixer", ["s4d", "mamba"])
def test_shapes_dtype_and_causality(mixer):
    model = _tagger(mixer)
    x = jax.random.randint(jax.random.key(1), (2, 12), 0, 7)
    y = model(x)
    assert y.shape == (2, 12, 7) and y.dtype == jnp.float32
    x2 = x.at[:, 8:].set((x[:, 8:] + 1) % 7)  # change the future only
    y2 = model(x2)
    np.testing.assert_allclose(y[:, :8], y2[:, :8], rtol=1e-5, atol=1e-5)
    assert not np.allclose(y[:, 8:], y2[:, 8:])


def test_same_parameters_as_the_classifier():
    def count(m):
        return sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))

    classifier = SequenceClassifier(num_classes=7, vocab_size=7, d_model=16, num_layers=2, d_state=8, mlp_dim=32,
                                    rngs=nnx.Rngs(0))
    assert count(_tagger()) == count(classifier)


@pytest.mark.parametrize("arg", [{"bidirectional": True}, {"pooling": "mean"}])
def test_rejects_pooling_and_bidirectional(arg):
    with pytest.raises(TypeError, match=next(iter(arg))):
        _tagger(**arg)
