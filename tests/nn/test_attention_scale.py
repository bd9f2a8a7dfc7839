"""The attention logit divisor and the query initialiser (`AttentionSpec.logit_divisor`, `query_init`): dividing q·k
by sqrt(head_dim) or head_dim is the same as shrinking the query kernel by it, T5's query init has variance
1 / (embed_dim * head_dim) and leaves the other kernels' draws alone, and the fields are validated."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from jaxmodels.interop.hf import hf_config
from jaxmodels.models.lm import DecoderLM
from jaxmodels.nn.attention import Attention, AttentionSpec

EMBED, HEADS, HEAD_DIM = 32, 4, 16


def _layer(**spec):
    return Attention(EMBED, HEADS, HEADS, HEAD_DIM, spec=AttentionSpec(**spec), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("divisor, factor", [("none", HEAD_DIM**-0.5), ("head_dim", HEAD_DIM**0.5)])
def test_a_logit_divisor_equals_a_rescaled_query_kernel(divisor, factor):
    x = jax.random.normal(jax.random.key(1), (2, 8, EMBED))
    positions = np.broadcast_to(np.arange(8), (2, 8))
    reference, layer = _layer(), _layer(logit_divisor=divisor)
    layer.w_q.value = reference.w_q.value * factor  # q·k / sqrt(d) = (q / sqrt(d))·k = (q sqrt(d))·k / d
    np.testing.assert_allclose(layer(x, positions)[0], reference(x, positions)[0], rtol=1e-5, atol=1e-6)


def test_t5_query_init_has_its_variance_and_keeps_the_other_draws():
    t5, lecun = _layer(query_init="t5"), _layer()
    w_q = np.asarray(t5.w_q.value, np.float64)
    variance, n = 1.0 / (EMBED * HEAD_DIM), w_q.size
    assert abs(w_q.var() - variance) < 4 * variance * math.sqrt(2.0 / n)  # within 4 SE of a normal's variance
    assert float(lecun.w_q.value.var()) == pytest.approx(1.0 / EMBED, rel=0.15)
    for name in ("w_k", "w_v", "w_o"):
        np.testing.assert_array_equal(getattr(t5, name).value, getattr(lecun, name).value)


@pytest.mark.parametrize("fields, match", [
    (dict(logit_divisor="sqrt"), r"attention.logit_divisor='sqrt'.*'sqrt_head_dim', 'head_dim', 'none'"),
    (dict(query_init="xavier"), r"attention.query_init='xavier'"),
    (dict(kind="linear", logit_divisor="none"), r"logit_divisor='none' needs attention.kind in \['softmax'"),
    (dict(kind="gau", query_init="t5"), r"query_init='t5' needs a kind with a query kernel, got 'gau'"),
])
def test_fields_are_validated(fields, match):
    with pytest.raises(ValueError, match=match):
        AttentionSpec(**fields)


def test_hugging_face_export_refuses_another_divisor():
    model = nnx.eval_shape(lambda: DecoderLM(vocab_size=16, num_layers=1, embed_dim=EMBED, num_heads=HEADS,
                                             num_kv_heads=HEADS, head_dim=HEAD_DIM, mlp_dim=32,
                                             attention=AttentionSpec(logit_divisor="none"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"model.attention.logit_divisor='none' \(Hugging Face needs 'sqrt_head_dim'"):
        hf_config(model)
