"""CPC: the GRU and causal convolution against slow references, causality of the context, and the InfoNCE terms
of the task against a float64 loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.models.cpc import CPC
from jaxmodels.nn.conv import Conv1D
from jaxmodels.nn.recurrent import GRU
from jaxmodels.tasks.cpc import cpc_loss_terms


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    with jax.default_matmul_precision("float32"):
        yield


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_gru_is_the_recurrence_of_its_equations():
    gru = GRU(3, 4, rngs=nnx.Rngs(0))
    x = _normal(0, (2, 5, 3))
    wi, bi = np.asarray(gru.input.kernel.value, np.float64), np.asarray(gru.input.bias.value, np.float64)
    wh, bh = np.asarray(gru.hidden.kernel.value, np.float64), np.asarray(gru.hidden.bias.value, np.float64)
    sigmoid = lambda a: 1 / (1 + np.exp(-a))
    h, outputs = np.zeros((2, 4)), []
    for t in range(5):
        gx, gh = np.asarray(x[:, t], np.float64) @ wi + bi, h @ wh + bh
        r, u = sigmoid(gx[:, :4] + gh[:, :4]), sigmoid(gx[:, 4:8] + gh[:, 4:8])
        n = np.tanh(gx[:, 8:] + r * gh[:, 8:])
        h = (1 - u) * n + u * h
        outputs.append(h)
    np.testing.assert_allclose(gru(x), np.stack(outputs, 1), rtol=1e-5, atol=1e-6)


def test_causal_conv1d_is_the_left_padded_correlation():
    conv = Conv1D(2, 3, 3, causal=True, rngs=nnx.Rngs(0))
    x = _normal(1, (1, 6, 2))
    w, b = np.asarray(conv.kernel.value, np.float64), np.asarray(conv.bias.value, np.float64)
    padded = np.concatenate([np.zeros((1, 2, 2)), np.asarray(x, np.float64)], axis=1)
    expected = np.stack([np.einsum("bkc,kco->bo", padded[:, t:t + 3], w) + b for t in range(6)], 1)
    np.testing.assert_allclose(conv(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("context", ["gru", "causal_conv"])
def test_context_at_t_sees_only_rows_up_to_t(context):
    model = CPC(encoder_channels=(8,), encoder_kernels=(4,), encoder_strides=(4,), context=context, context_dim=8,
                num_predictions=2, rngs=nnx.Rngs(0))
    x = _normal(2, (1, 24, 1))
    changed = x.at[:, 12:].add(1.0)  # rows (steps) 3.. change
    (z, c), (_, c2) = model(x), model(changed)
    assert z.shape == (1, 6, 8) and c.shape == (1, 6, 8) and model.predictions(c).shape == (1, 6, 2, 8)
    np.testing.assert_allclose(c[:, :3], c2[:, :3], atol=1e-6)
    assert float(jnp.abs(c[:, 3:] - c2[:, 3:]).min()) > 0
    assert model.representation(x).shape == (1, 8)


@pytest.mark.parametrize("negatives", ["batch", "batch_and_time"])
def test_info_nce_terms_match_a_float64_loop(negatives):
    b, t, num_k, d = 3, 5, 2, 4
    z, predictions = _normal(3, (b, t, d)), _normal(4, (b, t, num_k, d))
    zn, pn = np.asarray(z, np.float64), np.asarray(predictions, np.float64)
    for k in (1, 2):
        losses, hits = [], []
        for i in range(b):
            for s in range(t - k):
                p = pn[i, s, k - 1]
                if negatives == "batch":
                    candidates, positive = zn[:, s + k], i
                else:
                    candidates, positive = zn.reshape(b * t, d), i * t + s + k
                scores = candidates @ p
                losses.append(np.log(np.sum(np.exp(scores))) - scores[positive])
                hits.append(np.argmax(scores) == positive)
        loss, accuracy, n = jax.jit(cpc_loss_terms, static_argnums=(2, 3))(z, predictions, k, negatives)
        assert n == (b if negatives == "batch" else b * t)
        np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-5)
        np.testing.assert_allclose(accuracy, np.mean(hits), rtol=1e-6)
