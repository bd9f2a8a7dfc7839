"""Segment Anything's two-way Transformer: one block and the whole stack against a float64 NumPy reference read
from the same parameters, permutation equivariance over tokens and over image positions, and shape errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.nn.two_way import MLPHead, TwoWayAttentionBlock, TwoWayTransformer

DIM, HEADS, MLP_DIM = 8, 2, 12


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    with jax.default_matmul_precision("float32"):
        yield


def _random(factory, seed=0, scale=0.4):
    """factory()'s module built abstractly, every parameter then drawn as scale·N(0, 1) (LayerNorms included):
    biases and norm parameters non-trivial, without compiling initialisers."""
    graphdef, state = nnx.split(nnx.eval_shape(factory))
    rng = np.random.default_rng(seed)
    return nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(scale * rng.normal(size=a.shape), a.dtype), state))


def _p(variable):
    return np.asarray(variable.value, np.float64)


def _linear(layer, x):
    return x @ _p(layer.kernel) + _p(layer.bias)


def _layer_norm(norm, x, eps=1e-5):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * _p(norm.scale) + _p(norm.bias)


def _attention(attn, q, k, v):
    """Q, K, V projections, per-head softmax(QKᵀ/√d)V by explicit loops over batch and heads, output projection."""
    q, k, v = _linear(attn.q_proj, q), _linear(attn.k_proj, k), _linear(attn.v_proj, v)
    d = q.shape[-1] // attn.num_heads
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(attn.num_heads):
            cols = slice(h * d, (h + 1) * d)
            scores = q[b, :, cols] @ k[b, :, cols].T / np.sqrt(d)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            out[b, :, cols] = (weights / weights.sum(-1, keepdims=True)) @ v[b, :, cols]
    return _linear(attn.out_proj, out)


def _mlp(mlp, x, k=None):
    """MLP k of a stacked MLPHead (k=None: an unstacked one)."""
    for i, (kernel, bias) in enumerate(zip(mlp.kernels, mlp.biases)):
        w, b = _p(kernel), _p(bias)
        x = x @ (w if k is None else w[k]) + (b if k is None else b[k])
        x = np.maximum(x, 0) if i < len(mlp.kernels) - 1 else x
    return x


def _block(block, queries, keys, query_pe, key_pe):
    """App. A, Figure 14, step by step."""
    if block.skip_first_layer_pe:
        queries = _attention(block.self_attn, queries, queries, queries)
    else:
        queries = queries + _attention(block.self_attn, queries + query_pe, queries + query_pe, queries)
    queries = _layer_norm(block.norm1, queries)
    queries = _layer_norm(block.norm2, queries + _attention(block.cross_attn_token_to_image, queries + query_pe,
                                                            keys + key_pe, keys))
    queries = _layer_norm(block.norm3, queries + _mlp(block.mlp, queries))
    keys = _layer_norm(block.norm4, keys + _attention(block.cross_attn_image_to_token, keys + key_pe,
                                                      queries + query_pe, queries))
    return queries, keys


def _data(seed, b=2, t=5, h=3, w=4):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(b, h, w, DIM)), rng.normal(size=(h, w, DIM)), rng.normal(size=(b, t, DIM)))


def _jit(module):
    graphdef, state = nnx.split(module)
    return jax.jit(lambda s, *args: nnx.merge(graphdef, s)(*args)), state


def test_transformer_matches_float64_reference():
    model = _random(lambda: TwoWayTransformer(2, DIM, HEADS, MLP_DIM, rngs=nnx.Rngs(0)))
    image, pe, tokens = _data(1)
    run, state = _jit(model)
    queries, keys = run(state, *(jnp.asarray(a, jnp.float32) for a in (image, pe, tokens)))
    ref_q, ref_k = tokens, image.reshape(2, 12, DIM)
    key_pe = pe.reshape(12, DIM)
    for block in model.layers:
        ref_q, ref_k = _block(block, ref_q, ref_k, tokens, key_pe)
    ref_q = _layer_norm(model.norm_final_attn, ref_q + _attention(model.final_attn_token_to_image, ref_q + tokens,
                                                                  ref_k + key_pe, ref_k))
    assert queries.shape == (2, 5, DIM) and keys.shape == (2, 12, DIM)
    np.testing.assert_allclose(queries, ref_q, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(keys, ref_k, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("skip_first_layer_pe", [True, False])
def test_block_is_equivariant_to_token_and_image_permutations(skip_first_layer_pe):
    """Permuting the tokens (with their positions) permutes the updated tokens and leaves the image unchanged;
    permuting the image positions (with theirs) permutes the updated image and leaves the tokens unchanged."""
    block = _random(lambda: TwoWayAttentionBlock(DIM, HEADS, MLP_DIM, skip_first_layer_pe=skip_first_layer_pe,
                                                 rngs=nnx.Rngs(0)), seed=2)
    rng = np.random.default_rng(3)
    q, k, qpe, kpe = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 6, DIM), (2, 10, DIM),
                                                                               (2, 6, DIM), (10, DIM)))
    run, state = _jit(block)
    out_q, out_k = run(state, q, k, qpe, kpe)
    tp, ip = rng.permutation(6), rng.permutation(10)
    perm_q, same_k = run(state, q[:, tp], k, qpe[:, tp], kpe)
    same_q, perm_k = run(state, q, k[:, ip], qpe, kpe[ip])
    np.testing.assert_allclose(perm_q, out_q[:, tp], atol=1e-5)
    np.testing.assert_allclose(same_k, out_k, atol=1e-5)
    np.testing.assert_allclose(same_q, out_q, atol=1e-5)
    np.testing.assert_allclose(perm_k, out_k[:, ip], atol=1e-5)


def test_mlp_heads_stacked_and_not_and_errors():
    mlp = _random(lambda: MLPHead(3, 5, 2, 3, rngs=nnx.Rngs(0)))
    x = np.random.default_rng(4).normal(size=(4, 3))
    np.testing.assert_allclose(mlp(jnp.asarray(x, jnp.float32)), _mlp(mlp, x), rtol=1e-5, atol=1e-5)
    stacked = _random(lambda: MLPHead(3, 5, 2, 2, num_stacked=4, rngs=nnx.Rngs(0)))
    xs = np.random.default_rng(5).normal(size=(2, 4, 3))
    np.testing.assert_allclose(stacked(jnp.asarray(xs, jnp.float32)),
                               np.stack([_mlp(stacked, xs[:, k], k) for k in range(4)], axis=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"x must be \(..., 4, 3\)"):
        stacked(jnp.zeros((2, 3, 3)))
    model = nnx.eval_shape(lambda: TwoWayTransformer(1, DIM, HEADS, MLP_DIM, rngs=nnx.Rngs(0)))
    image, pe, tokens = (jnp.zeros(a.shape, jnp.float32) for a in _data(0))
    with pytest.raises(ValueError, match="image_pe must be"):
        model(image, pe[:2], tokens)
    with pytest.raises(ValueError, match="point_embedding must be"):
        model(image, pe, tokens[:1])
    with pytest.raises(ValueError, match="image_embedding must be"):
        model(image[..., :4], pe, tokens)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        TwoWayAttentionBlock(6, 4, 8, rngs=nnx.Rngs(0))
