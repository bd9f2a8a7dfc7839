"""DETR's layers: attention with separate value inputs, the deformable attention module against its parts written
out in NumPy, the sampling offsets' initial pattern, the backbone's strides."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.nn.detection import ConvBackbone, MultiScaleDeformableAttention, sampling_offset_bias
from jaxmodels.nn.diffusion import MultiHeadAttention
from jaxmodels.ops.deformable import multi_scale_deformable_attention


def _randomise(module, seed):
    """Every parameter drawn afresh N(0, 0.3^2), so that zero-initialised projections take part."""
    state = nnx.state(module, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(module, jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
    return module


def _call(module, *args, **static):
    """module(*args, **static), compiled: op-by-op dispatch of these layers costs more than compiling them."""
    graphdef, state = nnx.split(module)
    return jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a, **static))(state, *args)


def test_attention_takes_values_from_their_own_input():
    attn = _randomise(MultiHeadAttention(8, 2, context_dim=8, rngs=nnx.Rngs(0)), 1)
    rng = np.random.default_rng(0)
    x, keys, values = (rng.normal(size=s).astype(np.float32) for s in ((2, 3, 8), (2, 5, 8), (2, 5, 8)))
    out = _call(attn, jnp.asarray(x), jnp.asarray(keys), jnp.asarray(values))
    wq, wk, wv, wo = (np.asarray(p.value, np.float64) for p in (attn.w_q, attn.w_k, attn.w_v, attn.w_o))
    q, k, v = np.einsum("bld,dnh->bnlh", x, wq), np.einsum("bsd,dnh->bnsh", keys, wk), np.einsum(
        "bsd,dnh->bnsh", values, wv)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(4)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("bnlh,nhd->bld", (p / p.sum(-1, keepdims=True)) @ v, wo)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_call(attn, jnp.asarray(x), jnp.asarray(keys)),
                               _call(attn, jnp.asarray(x), jnp.asarray(keys), jnp.asarray(keys)), atol=1e-6)
    with pytest.raises(ValueError, match="value must have the shape"):
        attn(jnp.asarray(x), jnp.asarray(keys), value=jnp.asarray(values[:, :2]))


def test_sampling_offset_bias_is_the_papers_pattern():
    heads, levels, points = 8, 2, 3
    bias = np.asarray(sampling_offset_bias(heads, levels, points)).reshape(heads, levels, points, 2)
    for m in range(heads):
        direction = np.array([math.cos(2 * math.pi * m / heads), math.sin(2 * math.pi * m / heads)])
        direction /= np.abs(direction).max()
        for level in range(levels):
            for k in range(points):
                np.testing.assert_allclose(bias[m, level, k], (k + 1) * direction, atol=1e-5)


def test_deformable_attention_module_against_its_parts():
    dim, heads, points, shapes = 8, 2, 3, ((4, 6), (2, 3))
    module = _randomise(MultiScaleDeformableAttention(dim, heads, len(shapes), points, rngs=nnx.Rngs(0)), 2)
    rng = np.random.default_rng(1)
    b, q, s = 2, 5, sum(h * w for h, w in shapes)
    query, value = rng.normal(size=(b, q, dim)).astype(np.float32), rng.normal(size=(b, s, dim)).astype(np.float32)
    reference = rng.uniform(0.1, 0.9, (b, q, len(shapes), 2)).astype(np.float32)
    out = _call(module, jnp.asarray(query), jnp.asarray(reference), jnp.asarray(value), spatial_shapes=shapes)

    def linear(layer, x):
        return x @ np.asarray(layer.kernel.value, np.float64) + np.asarray(layer.bias.value, np.float64)

    offsets = linear(module.sampling_offsets, query).reshape(b, q, heads, len(shapes), points, 2)
    logits = linear(module.attention_weights, query).reshape(b, q, heads, len(shapes) * points)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights = (weights / weights.sum(-1, keepdims=True)).reshape(b, q, heads, len(shapes), points)
    normaliser = np.array([[w, h] for h, w in shapes], np.float64)  # pixels of level l -> [0, 1]: / (W_l, H_l)
    locations = reference[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
    v = linear(module.value_proj, value).reshape(b, s, heads, dim // heads)
    sampled = jax.jit(multi_scale_deformable_attention, static_argnums=1)(
        jnp.asarray(v, jnp.float32), shapes, jnp.asarray(locations, jnp.float32), jnp.asarray(weights, jnp.float32))
    np.testing.assert_allclose(out, linear(module.output_proj, np.asarray(sampled, np.float64)), rtol=2e-4, atol=2e-4)
    with pytest.raises(ValueError, match="reference_points"):
        module(jnp.asarray(query), jnp.asarray(reference[:, :, :1]), jnp.asarray(value), shapes)


def test_deformable_attention_starts_with_uniform_weights_on_the_offset_pattern():
    module = MultiScaleDeformableAttention(8, 2, 1, 2, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(module.attention_weights.kernel.value, 0.0)
    np.testing.assert_array_equal(module.sampling_offsets.kernel.value, 0.0)
    np.testing.assert_allclose(module.sampling_offsets.bias.value, sampling_offset_bias(2, 1, 2))


def test_conv_backbone_halves_each_stage():
    backbone = ConvBackbone(3, (8, 16), rngs=nnx.Rngs(0))
    maps = _call(backbone, jnp.ones((1, 12, 8, 3)))
    assert [m.shape for m in maps] == [(1, 6, 4, 8), (1, 3, 2, 16)]
    with pytest.raises(ValueError, match="divisible by 2\\^2"):
        backbone(jnp.ones((1, 10, 8, 3)))
