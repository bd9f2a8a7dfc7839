import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops.attention import dot_product_attention
from jaxmodels.ops.sparse_attention import (
    block_layout,
    block_sparse_attention,
    fixed_layout,
    fixed_mask,
    layout_indices,
    local_global_layout,
    local_global_mask,
    select_block_sparse_implementation,
    strided_layout,
    strided_mask,
)
from tests.jaxprs import equations

# ---------------------------------------------------------------- masks from the papers' set definitions


def _loop_strided(T, l, causal):
    """Child et al. 2019 §4.2: A(1)_i = {t, ..., i}, t = max(0, i - l); A(2)_i = {j : (i - j) mod l = 0}."""
    m = np.zeros((T, T), bool)
    for i in range(T):
        local = range(max(0, i - l), i + 1) if causal else range(max(0, i - l + 1), min(T, i + l))
        strided = [j for j in range(T) if (i - j) % l == 0 and (j <= i or not causal)]
        m[i, list(local) + strided] = True
    return m


def _loop_fixed(T, l, c, causal):
    """Child et al. 2019 §4.2: A(1)_i = {j : floor(j/l) = floor(i/l)}; A(2)_i = {j : j mod l in {l-c, ..., l-1}}."""
    m = np.zeros((T, T), bool)
    for i in range(T):
        same_block = [j for j in range(T) if j // l == i // l]
        summary = [j for j in range(T) if j % l in range(l - c, l)]
        m[i, [j for j in same_block + summary if j <= i or not causal]] = True
    return m


def _loop_local_global(T, block, window, num_global, causal):
    """Band of 2·window + 1 blocks around each query's block; the first num_global blocks are global."""
    m = np.zeros((T, T), bool)
    for i in range(T):
        qb = i // block
        for kb in range(max(0, qb - window), qb + window + 1):
            m[i, kb * block:(kb + 1) * block] = True  # slicing past T is fine
        m[i, :num_global * block] = True  # global keys
        if qb < num_global:
            m[i, :] = True  # global query
        if causal:
            m[i, i + 1:] = False
    return m


def _loop_block_layout(mask, b):
    t, s = mask.shape[0] // b, mask.shape[1] // b
    return np.array([[mask[r * b:(r + 1) * b, c * b:(c + 1) * b].any() for c in range(s)] for r in range(t)])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T, stride", [(16, 4), (17, 3), (12, 1), (9, 12)])
def test_strided_mask(T, stride, causal):
    mask = strided_mask(T, stride, causal=causal)
    assert mask.shape == (T, T) and mask.dtype == bool
    np.testing.assert_array_equal(mask, _loop_strided(T, stride, causal))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T, block, num_summary", [(16, 4, 1), (18, 6, 2), (12, 4, 0), (10, 5, 5)])
def test_fixed_mask(T, block, num_summary, causal):
    mask = fixed_mask(T, block, num_summary, causal=causal)
    np.testing.assert_array_equal(mask, _loop_fixed(T, block, num_summary, causal))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T, block, window, num_global", [(16, 4, 1, 1), (20, 2, 2, 0), (12, 3, 0, 2)])
def test_local_global_mask(T, block, window, num_global, causal):
    mask = local_global_mask(T, block, window_blocks=window, global_blocks=num_global, causal=causal)
    np.testing.assert_array_equal(mask, _loop_local_global(T, block, window, num_global, causal))


def test_causal_masks_are_lower_triangular_with_the_diagonal():
    for mask in (strided_mask(24, 5), fixed_mask(24, 6, 2), local_global_mask(24, 4, causal=True)):
        assert not np.triu(mask, 1).any() and np.diag(mask).all()


@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
def test_layouts(block_size):
    T = 32
    cases = [(strided_mask(T, 5), strided_layout(T, 5, block_size)),
             (strided_mask(T, 6, causal=False), strided_layout(T, 6, block_size, causal=False)),
             (fixed_mask(T, 8, 3), fixed_layout(T, 8, 3, block_size)),
             (fixed_mask(T, 4, 1, causal=False), fixed_layout(T, 4, 1, block_size, causal=False)),
             (local_global_mask(T, 4, global_blocks=2), local_global_layout(T, 4, block_size, global_blocks=2)),
             (local_global_mask(T, 2, window_blocks=2, causal=True),
              local_global_layout(T, 2, block_size, window_blocks=2, causal=True))]
    for mask, layout in cases:
        assert layout.shape == (T // block_size,) * 2 and layout.dtype == bool
        np.testing.assert_array_equal(block_layout(mask, block_size), _loop_block_layout(mask, block_size))
        np.testing.assert_array_equal(layout, block_layout(mask, block_size))


def test_layout_indices():
    layout = np.array([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], bool)
    indices, valid = layout_indices(layout)
    np.testing.assert_array_equal(valid, [[1, 1, 1], [0, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(np.where(valid, indices, -1), [[0, 2, 3], [-1, -1, -1], [1, -1, -1]])
    np.testing.assert_array_equal(valid.sum(1), layout.sum(1))


# ---------------------------------------------------------------- block-sparse attention == dense with the mask

T, BLOCK = 32, 4
PATTERNS = {  # element mask, layout, whether the layout alone is exact (block-aligned pattern)
    "strided": (strided_mask(T, 6), strided_layout(T, 6, BLOCK), False),
    "fixed": (fixed_mask(T, 8, 2), fixed_layout(T, 8, 2, BLOCK), False),
    "fixed_bidirectional": (fixed_mask(T, 8, 2, causal=False), fixed_layout(T, 8, 2, BLOCK, causal=False), False),
    "local_global": (local_global_mask(T, 4), local_global_layout(T, 4, BLOCK), True),
    "local_global_causal": (local_global_mask(T, 8, causal=True), local_global_layout(T, 8, BLOCK, causal=True), False),
}


def _qkv(seed, B=2, N=4, K=2, H=8, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, N, H)).astype(dtype)
    k, v = rng.normal(size=(2, B, T, K, H)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("name, num_heads, num_kv_heads", [(name, 4, 2) for name in PATTERNS]  # grouped-query
                         + [("strided", 2, 2), ("local_global", 4, 1)])  # multi-head, multi-query
def test_block_sparse_equals_dense(name, num_heads, num_kv_heads):
    mask, layout, block_aligned = PATTERNS[name]
    q, k, v = _qkv(list(PATTERNS).index(name) + num_heads + num_kv_heads, N=num_heads, K=num_kv_heads)
    sparse = jax.jit(functools.partial(block_sparse_attention, layout=layout, block_size=BLOCK, mask=mask))
    dense = jax.jit(functools.partial(dot_product_attention, mask=mask, implementation="reference"))
    out = sparse(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, dense(q, k, v), rtol=1e-5, atol=1e-5)
    if block_aligned:  # the layout alone is the pattern
        layout_only = jax.jit(functools.partial(block_sparse_attention, layout=layout, block_size=BLOCK))
        np.testing.assert_allclose(layout_only(q, k, v), out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["strided", "fixed", "local_global"])
def test_block_sparse_gradients_equal_dense(name):
    mask, layout, _ = PATTERNS[name]
    q, k, v = _qkv(10 + list(PATTERNS).index(name))

    def grads(attention):
        loss = lambda q, k, v: jnp.sum(jnp.cos(attention(q, k, v)))  # weighs every output differently
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    sparse = grads(lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=BLOCK, mask=mask))
    dense = grads(lambda q, k, v: dot_product_attention(q, k, v, mask=mask, implementation="reference"))
    for g_sparse, g_dense in zip(sparse, dense):
        np.testing.assert_allclose(g_sparse, g_dense, rtol=1e-5, atol=1e-5)


def test_traced_per_head_mask_and_empty_rows():
    """A traced (B, N, T, S) mask refining the layout; a layout row with no block gives zeros."""
    q, k, v = _qkv(20)
    rng = np.random.default_rng(21)
    mask = (rng.random((2, 4, T, T)) < 0.7) & strided_mask(T, 5)
    layout = strided_layout(T, 5, BLOCK)
    layout[2] = False
    full = mask & np.repeat(np.repeat(layout, BLOCK, 0), BLOCK, 1)
    out = jax.jit(lambda q, k, v, m: block_sparse_attention(q, k, v, layout, block_size=BLOCK, mask=m))(q, k, v, mask)
    np.testing.assert_allclose(out, dot_product_attention(q, k, v, mask=full, implementation="reference"),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[:, 2 * BLOCK:3 * BLOCK], 0.0)


def test_bfloat16():
    mask, layout, _ = PATTERNS["fixed"]
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _qkv(30))
    out = jax.jit(functools.partial(block_sparse_attention, layout=layout, block_size=BLOCK, mask=mask))(q, k, v)
    assert out.dtype == jnp.bfloat16
    expected = jax.jit(functools.partial(dot_product_attention, mask=mask, implementation="reference"))(q, k, v)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=2e-2, rtol=2e-2)


def _intermediate_shapes(jaxpr):
    """Shapes of every value computed in a jaxpr, sub-jaxprs (pjit, custom_jvp, scan ...) included."""
    return (var.aval.shape for eqn in equations(jaxpr) for var in eqn.outvars)


def test_skipped_blocks_are_not_computed():
    """Sliding window + one global block: every row gathers exactly its non-empty blocks, and no value
    in the forward or backward pass is as large as one head's (T, S) score matrix."""
    length, block = 256, 16
    layout = local_global_layout(length, block, block, window_blocks=1, global_blocks=1)
    indices, valid = layout_indices(layout)
    np.testing.assert_array_equal(valid.sum(1), layout.sum(1))
    assert layout.sum(1).max() == length // block and np.median(layout.sum(1)) == 4  # one dense (global) row

    B, N, K, H = 1, 2, 1, 8
    q = jnp.zeros((B, length, N, H))
    k = v = jnp.zeros((B, length, K, H))
    loss = lambda q, k, v: jnp.sum(block_sparse_attention(q, k, v, layout, block_size=block))
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    largest = max(np.prod(shape, dtype=int) for shape in _intermediate_shapes(jaxpr.jaxpr))
    nnz = int(layout.sum())
    assert largest <= 2 * B * N * nnz * block**2  # the gathered scores, up to rounding of the row groups
    assert largest < B * N * length * length / 4


@pytest.mark.parametrize("args, kwargs, error, match", [
    (((2, 30, 2, 8), (2, 30, 2, 8)), dict(layout=np.ones((8, 8), bool)), ValueError,
     "length 30 must be a multiple of block_size 4; pad the sequence to 32"),
    (((2, 32, 2, 8), (2, 32, 2, 8)), dict(layout=np.ones((8, 4), bool)), ValueError,
     r"layout must be a boolean \(T/b, S/b\) = \(8, 8\) array, got bool of shape \(8, 4\)"),
    (((2, 32, 2, 8), (2, 32, 2, 8)), dict(layout=np.ones((8, 8))), ValueError, "layout must be a boolean"),
    (((2, 32, 2, 8), (2, 32, 2, 8)), dict(layout=np.ones((8, 8), bool), mask=np.ones((32, 32))), TypeError,
     "mask must be boolean"),
    (((2, 32, 2, 8), (2, 32, 2, 8)), dict(layout=np.ones((8, 8), bool), mask=np.ones((3, 32, 32), bool)), ValueError,
     "mask must be broadcastable"),
    (((2, 32, 3, 8), (2, 32, 2, 8)), dict(layout=np.ones((8, 8), bool)), ValueError, "multiple of key/value heads"),
])
def test_block_sparse_errors(args, kwargs, error, match):
    q_shape, kv_shape = args
    with pytest.raises(error, match=match):
        block_sparse_attention(jnp.ones(q_shape), jnp.ones(kv_shape), jnp.ones(kv_shape), block_size=4, **kwargs)


def test_pattern_errors():
    with pytest.raises(ValueError, match="stride must be a positive int"):
        strided_mask(8, 0)
    with pytest.raises(ValueError, match=r"num_summary must be in \[0, block=4\]"):
        fixed_mask(8, 4, 5)
    with pytest.raises(ValueError, match="window_blocks must be a non-negative int, got -1"):
        local_global_mask(8, 2, window_blocks=-1)
    with pytest.raises(ValueError, match="length 10 must be a multiple of block_size 4"):
        strided_layout(10, 2, 4)
    with pytest.raises(ValueError, match="2-D boolean"):
        block_layout(np.ones((8, 8)), 4)
    with pytest.raises(ValueError, match="multiple of block_size"):
        block_layout(np.ones((8, 6), bool), 4)


def test_select_block_sparse_implementation():
    """The Pallas kernels on an NVIDIA GPU where they run the case (5.0-7.4x "gather" on the H200), else "gather"."""
    assert select_block_sparse_implementation("cuda", pallas_runs=True) == "pallas"
    assert select_block_sparse_implementation("cuda", pallas_runs=False) == "gather"
    for platform in ("cpu", "tpu", "rocm"):
        assert select_block_sparse_implementation(platform, pallas_runs=True) == "gather"
