import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.nn.vision import PatchEmbedding, PatchMerging, SwinBlock


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def test_patch_embedding_is_a_strided_convolution():
    embed = nnx.jit(lambda: PatchEmbedding(2, 3, 5, rngs=nnx.Rngs(0)))()
    embed.linear.bias.value = jnp.arange(5.0)
    x = np.random.default_rng(0).normal(size=(2, 4, 6, 3)).astype(np.float32)
    out = _apply(*nnx.split(embed), x)
    kernel = embed.linear.kernel.value.reshape(2, 2, 3, 5)  # patchify's (i, j, c) order
    conv = jax.lax.conv_general_dilated(x, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST) + jnp.arange(5.0)
    assert out.shape == (2, 2, 3, 5)
    np.testing.assert_allclose(out, conv, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by patch_size 2"):
        embed(jnp.zeros((1, 3, 4, 3)))


def _global_masked_attention(block, y, shift):
    """The attention branch of a Swin block computed over the whole image in float64: token p attends q iff both
    fall in the same window and the same region after the cyclic shift, with the bias of their displacement."""
    _, h, w, dim = y.shape
    ws = block.window_size
    w_qkv = np.asarray(block.attn.w_qkv.value, np.float64)
    w_o = np.asarray(block.attn.w_o.value, np.float64)
    table = np.asarray(block.attn.bias_table.value, np.float64)
    heads, head_dim = w_qkv.shape[2], w_qkv.shape[3]
    rows, cols = np.divmod(np.arange(h * w), w)
    r, c = (rows - shift) % h, (cols - shift) % w  # position after the roll by -shift
    region = lambda v, n: (v >= n - ws).astype(int) + ((v >= n - shift) if shift else 0)
    window = (r // ws) * (w // ws) + c // ws
    label = 3 * region(r, h) + region(c, w)
    allowed = (window[:, None] == window[None, :]) & (label[:, None] == label[None, :])
    index = (r[:, None] - r[None, :] + ws - 1) * (2 * ws - 1) + (c[:, None] - c[None, :] + ws - 1)
    tokens = np.asarray(y, np.float64).reshape(y.shape[0], h * w, dim)
    qkv = np.einsum("bld,dknh->kblnh", tokens, w_qkv)
    out = np.zeros(tokens.shape[:2] + (heads, head_dim))
    for n in range(heads):
        scores = np.einsum("bph,bqh->bpq", qkv[0][:, :, n], qkv[1][:, :, n]) / np.sqrt(head_dim)
        scores = np.where(allowed, scores + np.where(allowed, table[np.clip(index, 0, len(table) - 1), n], 0), -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, :, n] = np.einsum("bpq,bqh->bph", p / p.sum(-1, keepdims=True), qkv[2][:, :, n])
    return np.einsum("blnh,nhd->bld", out, w_o).reshape(y.shape)


@pytest.mark.parametrize("shift", [0, 1])
def test_swin_block_equals_globally_masked_attention(shift):
    block = nnx.jit(lambda: SwinBlock(8, 2, 3, shift, mlp_ratio=2.0, rngs=nnx.Rngs(1)))()  # one compilation
    block.attn.bias_table.value = block.attn.bias_table.value * 50  # make the relative position bias matter
    x = np.random.default_rng(2).normal(size=(2, 6, 9, 8)).astype(np.float32)
    graphdef, state = nnx.split(block)
    out = _apply(graphdef, state, x)
    norm1 = jax.jit(lambda s, v: nnx.merge(graphdef, s).norm1(v))
    mlp_branch = jax.jit(lambda s, v: nnx.merge(graphdef, s).mlp(nnx.merge(graphdef, s).norm2(v)))
    mid = x + _global_masked_attention(block, norm1(state, x), shift)
    expected = mid + np.asarray(mlp_branch(state, mid.astype(np.float32)))
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)
    with pytest.raises(ValueError, match="divisible by window_size"):
        block(jnp.zeros((1, 5, 9, 8)))


def test_patch_merging_layer_shapes():
    merge = nnx.jit(lambda: PatchMerging(4, rngs=nnx.Rngs(3)))()
    out = _apply(*nnx.split(merge), jnp.ones((2, 4, 6, 4)))
    assert out.shape == (2, 2, 3, 8)
    assert merge.reduction.kernel.value.shape == (16, 8) and merge.reduction.bias is None
