"""The attention layer and block refuse packed documents (segment ids) where they cannot mask them; masks cuDNN
cannot take run through the Pallas kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.nn.attention import Attention, AttentionSpec, segments_error
from jaxmodels.nn.transformer import TransformerBlock
from jaxmodels.ops import attention as attention_ops
from jaxmodels.ops import sparse_attention

X = jnp.ones((1, 6, 16))
POSITIONS = jnp.arange(6)[None]
SEGMENTS = jnp.asarray([[1, 1, 1, 2, 2, 2]], jnp.int32)


def test_segments_error_names_what_cannot_mask():
    assert segments_error("softmax", "rope") is None and segments_error("softmax", "alibi") is None
    assert "attention kind 'norm'" in segments_error("norm", "none")
    assert "position 'rerope'" in segments_error("softmax", "rerope")


def test_attention_layer_refuses_segment_ids_it_cannot_honour():
    layer = Attention(16, 2, 1, 8, spec=AttentionSpec(kind="linear"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention kind 'linear' cannot keep packed documents apart"):
        layer(X, POSITIONS, segment_ids=SEGMENTS)
    softmax = Attention(16, 2, 1, 8, rngs=nnx.Rngs(0))
    assert softmax(X, POSITIONS, segment_ids=SEGMENTS)[0].shape == X.shape
    with pytest.raises(ValueError, match="decoding with a cache"):
        softmax(X, POSITIONS, softmax.init_cache(1, 6), jnp.int32(0), segment_ids=SEGMENTS)


def test_gau_block_refuses_segment_ids():
    block = TransformerBlock(embed_dim=16, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32, num_layers=1,
                             attention=AttentionSpec(kind="gau"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention kind 'gau'"):
        block(X, POSITIONS, segment_ids=SEGMENTS)


@pytest.mark.parametrize("spec", [dict(kind="softmax", position="alibi", window=5), dict(kind="sparse_fixed")],
                         ids=["alibi_window_segments", "sparse_fixed"])
def test_pallas_kernels_serve_masks_cudnn_cannot_take(spec):
    """ALiBi with a sliding window and packed documents, and a Sparse Transformer layout, through
    implementation="pallas" (the Pallas flash-attention kernels, interpreted on the CPU): the default path's
    output."""
    x = jax.random.normal(jax.random.key(0), (1, 32, 16))
    positions = jnp.arange(32)[None]
    segments = jnp.asarray([[0] * 20 + [1] * 12], jnp.int32) if spec["kind"] == "softmax" else None
    outputs = []
    for implementation in (None, "pallas"):
        layer = Attention(16, 2, 1, 16, spec=AttentionSpec(**spec, implementation=implementation), rngs=nnx.Rngs(0))
        with jax.default_matmul_precision("float32"):
            outputs.append(jax.jit(lambda x, layer=layer: layer(x, positions, segment_ids=segments)[0])(x))
    np.testing.assert_allclose(outputs[1], outputs[0], atol=2e-5, rtol=2e-5)


def test_default_path_reaches_the_pallas_kernels_on_cuda(monkeypatch):
    """implementation=None on an NVIDIA GPU (the platform faked, the kernels replaced by recorders): the softmax
    kind with ALiBi, a window and packed documents, and a Sparse Transformer kind, run the Pallas kernels
    (`select_implementation`, `select_block_sparse_implementation`); on the CPU neither does."""
    calls = []

    def recorder(query, *args, **kwargs):
        calls.append(kwargs)
        return jnp.zeros_like(query)

    monkeypatch.setattr(attention_ops.pallas_kernels, "flash_attention", recorder)
    monkeypatch.setattr(sparse_attention, "pallas_attention", recorder)
    x = jax.random.normal(jax.random.key(0), (1, 32, 16), jnp.bfloat16)
    positions = jnp.arange(32)[None]
    segments = jnp.asarray([[0] * 20 + [1] * 12], jnp.int32)
    layers = [(Attention(16, 2, 1, 16, spec=AttentionSpec(kind=kind, **options), dtype=jnp.bfloat16,
                         rngs=nnx.Rngs(0)), ids)
              for kind, options, ids in (("softmax", dict(position="alibi", window=5), segments),
                                         ("sparse_fixed", dict(), None))]
    def trace_all():  # traced, not run: the choice is made at trace time
        for layer, ids in layers:
            jax.eval_shape(lambda x, layer=layer, ids=ids: layer(x, positions, segment_ids=ids)[0], x)

    for module in (attention_ops, sparse_attention):
        monkeypatch.setattr(module, "backend_platform", lambda: "cpu")  # so also on a GPU run
    trace_all()
    assert calls == []
    for module in (attention_ops, sparse_attention):
        monkeypatch.setattr(module, "backend_platform", lambda: "cuda")
    trace_all()
    assert len(calls) == 2
    assert calls[0]["alibi_slopes"] is not None and calls[0]["local_window"] == (4, 0)
    assert calls[1]["layout"] is not None
