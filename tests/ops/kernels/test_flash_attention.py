"""The Pallas FlashAttention-2 kernels (interpreted on CPU, compiled on a GPU) against a float64 NumPy
attention for values and the "reference" implementation's autodiff for gradients: every mask kind, GQA,
bias shapes, ALiBi, soft-capping, block-sparse layouts, segment ids, fully masked rows, lengths that are not
multiples of the blocks; block skipping; dispatch and errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops import sparse_attention
from jaxmodels.ops.attention import dot_product_attention, pallas_attention
from jaxmodels.ops.kernels import flash_attention as fa

BLOCKS16 = fa.Config(fa.Blocks(16, 16), fa.Blocks(16, 16), fa.Blocks(16, 16))
MIXED = fa.Config(fa.Blocks(32, 16), fa.Blocks(16, 32), fa.Blocks(16, 32))  # blocks differ per kernel


def _np_attention(q, k, v, bias=None, mask=None, *, scale=None, is_causal=False, segment_ids=None,
                  local_window_size=None, alibi_slopes=None, logit_soft_cap=None, layout=None, layout_block_size=None):
    """float64 attention over the whole (B, N, T, S) score array, written the obvious way: scores
    c·tanh(scale·q·k/c) + bias - slope·|i - j|, every mask ANDed, softmax over the allowed keys, zeros for rows
    with none. Returns (out (B, T, N, H), lse (B, N, T) with -inf for empty rows, valid (B, N, T))."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1:3]
    kv_head = np.arange(N) // (N // K)
    scale = H ** -0.5 if scale is None else scale
    scores = np.einsum("btnh,bsnh->bnts", q, k[:, :, kv_head]) * scale
    if logit_soft_cap is not None:
        scores = logit_soft_cap * np.tanh(scores / logit_soft_cap)
    if bias is not None:
        scores = scores + np.asarray(bias, np.float64)
    i, j = np.arange(T)[:, None], np.arange(S)[None, :]
    if alibi_slopes is not None:
        scores = scores - np.asarray(alibi_slopes, np.float64)[:, None, None] * np.abs(i - j)
    allowed = np.ones((B, N, T, S), bool)
    if mask is not None:
        allowed &= np.asarray(mask)
    if is_causal:
        allowed &= j <= i
    if local_window_size is not None:
        left, right = local_window_size
        allowed &= (i - left <= j) & (j <= i + right)
    if segment_ids is not None:
        pair = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        q_ids, kv_ids = (np.asarray(x) for x in pair)
        allowed &= (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
    if layout is not None:
        allowed &= np.repeat(np.repeat(layout, layout_block_size, 0), layout_block_size, 1)
    scores = np.where(allowed, scores, -np.inf)
    top = np.max(scores, axis=-1, keepdims=True)
    valid = np.isfinite(top[..., 0])
    p = np.where(allowed, np.exp(scores - np.where(np.isfinite(top), top, 0)), 0.0)
    total = p.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", p / np.where(total > 0, total, 1), np.nan_to_num(v[:, :, kv_head]))
    lse = np.where(valid, np.log(np.where(total[..., 0] > 0, total[..., 0], 1)) + top[..., 0], -np.inf)
    return out, lse, valid


def _inputs(dims, seed, dtype=jnp.float32, **shapes):
    """Random q, k, v (rounded to dtype) and the arrays of `shapes`: bias=(shape), mask=(shape),
    segments="shared"|"pair"."""
    rng = np.random.default_rng(seed)
    B, T, S, N, K, H = dims
    q, k, v = (jnp.asarray(rng.normal(size=s), dtype) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    arrays = {}
    if "bias" in shapes:
        arrays["bias"] = jnp.asarray(rng.normal(size=shapes["bias"]), jnp.float32)
    if "mask" in shapes:
        arrays["mask"] = jnp.asarray(rng.random(shapes["mask"]) < 0.8)
    if shapes.get("segments") == "shared":
        arrays["segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), axis=1))
    elif shapes.get("segments") == "pair":
        arrays["segment_ids"] = tuple(jnp.asarray(np.sort(rng.integers(0, 2, (B, n)), axis=1)) for n in (T, S))
    return q, k, v, arrays


@functools.partial(jax.jit, static_argnums=0)
def _out_and_grads(attention_fn, q, k, v, arrays, d_out):
    """attention_fn(q, k, v, **arrays) and the gradients of <out, d_out> w.r.t. q, k, v and the bias."""
    bias = arrays.get("bias")
    rest = {name: x for name, x in arrays.items() if name != "bias"}
    out, vjp = jax.vjp(lambda q, k, v, bias: attention_fn(q, k, v, bias=bias, **rest), q, k, v, bias)
    return out, vjp(d_out.astype(out.dtype))


def _check(dims, options, config=BLOCKS16, *, seed=0, dtype=jnp.float32, tol=2e-5, grad_tol=5e-5, **shapes):
    """pallas_attention's output against _np_attention and its gradients against "reference"'s autodiff."""
    q, k, v, arrays = _inputs(dims, seed, dtype, **shapes)
    d_out = jnp.asarray(np.random.default_rng(seed + 1).normal(size=q.shape), jnp.float32)
    reference_options = {n: x for n, x in options.items() if n not in ("layout", "layout_block_size")}
    if "layout" in options:  # "reference" takes the layout as a mask
        b = options["layout_block_size"]
        element = np.repeat(np.repeat(options["layout"], b, 0), b, 1)
        reference_arrays = dict(arrays, mask=element if "mask" not in arrays else arrays["mask"] & element)
    else:
        reference_arrays = arrays
    with jax.default_matmul_precision("float32"):  # no TF32 on a GPU
        out, grads = _out_and_grads(functools.partial(pallas_attention, config=config, **options), q, k, v, arrays,
                                    d_out)
        ref_out, ref_grads = _out_and_grads(
            functools.partial(dot_product_attention, implementation="reference", **reference_options), q, k, v,
            reference_arrays, d_out)
    assert out.shape == q.shape and out.dtype == q.dtype
    numpy_options = {n: x for n, x in options.items()}
    expected, _, valid = _np_attention(q, k, v, **arrays, **numpy_options)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=tol, rtol=tol)
    for name, g, g_ref in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        if g_ref is None:
            assert g is None, name
            continue
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, name
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), atol=grad_tol,
                                   rtol=grad_tol, err_msg=name)
    return (q, k, v, arrays), out, grads, valid


# (B, T, S, N, K, H), options, operand shapes, blocks. Lengths 40, 33 and 48 are not multiples of 16 or 32
# (padding); K < N (grouped-query heads, MQA); biases broadcast over batch, heads, queries or keys.
CASES = {
    "causal_gqa_bias_over_heads_padded": ((2, 40, 40, 4, 2, 16), dict(is_causal=True), dict(bias=(1, 4, 40, 40)),
                                          BLOCKS16),
    "window_segments_mask_t_ne_s": ((2, 33, 48, 2, 1, 16), dict(local_window_size=(9, 3)),
                                    dict(segments="pair", mask=(2, 1, 1, 48), bias=(2, 1, 33, 1)), MIXED),
    "alibi_soft_cap_window_causal": ((1, 64, 64, 4, 4, 32), dict(is_causal=True, local_window_size=(20, 0),
                                     alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625], np.float32),
                                     logit_soft_cap=2.0, scale=0.5), dict(bias=(1, 1, 1, 64)), MIXED),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    dims, options, shapes, config = CASES[name]
    _check(dims, options, config, seed=list(CASES).index(name), **shapes)


def test_block_sparse_local_global_layout():
    """Longformer/BigBird-style local + global blocks (a Sparse Transformer layout, Child et al. 2019), causal,
    grouped heads: only the layout's blocks are computed (static tables in all three kernels)."""
    T, b = 64, 16
    layout = sparse_attention.local_global_layout(T, b, b, window_blocks=1, global_blocks=1, causal=True)
    assert not layout.all()
    _check((1, T, T, 4, 2, 16), dict(layout=layout, layout_block_size=b, is_causal=True), BLOCKS16, seed=9)


def test_block_sparse_attention_pallas_strided():
    """block_sparse_attention's "pallas" on the strided pattern (Child et al. 2019): its element mask refines the
    layout, one layout block is dropped (the layout masks it), and the 32-blocks straddle the layout's 16-blocks
    (the element mask is then also built from the layout); against float64 NumPy."""
    T, b = 64, 16
    layout = sparse_attention.strided_layout(T, 8, b, causal=True)
    layout[3, 1] = False
    element = sparse_attention.strided_mask(T, 8, causal=True)
    q, k, v, _ = _inputs((1, T, T, 2, 1, 16), 10)
    with jax.default_matmul_precision("float32"):
        out = jax.jit(lambda q, k, v: sparse_attention.block_sparse_attention(
            q, k, v, layout, block_size=b, mask=element, implementation="pallas"))(q, k, v)
    expected, _, _ = _np_attention(q, k, v, mask=element, layout=layout, layout_block_size=b)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)


def test_fully_masked_rows_are_zero_with_zero_gradient():
    """Rows with no allowed key (mask, unmatched segment ids) give zeros, a +inf log-sum-exp (the forward's
    residual, otherwise against float64) and zero dq rows; every gradient is finite."""
    B, T, S, N, K, H = 2, 40, 40, 2, 1, 16
    rng = np.random.default_rng(2)
    mask = rng.random((B, 1, T, S)) < 0.8
    mask[:, :, [0, 17, 39]] = False
    q_ids = np.zeros((B, T), np.int32)
    q_ids[:, 20:24] = 5  # absent from the keys
    arrays_extra = dict(mask=jnp.asarray(mask), segment_ids=(jnp.asarray(q_ids), jnp.zeros((B, S), jnp.int32)))
    q, k, v, arrays = _inputs((B, T, S, N, K, H), 3)
    arrays.update(arrays_extra)
    options = dict(local_window_size=(40, 0))
    d_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    with jax.default_matmul_precision("float32"):
        out, grads = _out_and_grads(functools.partial(pallas_attention, config=BLOCKS16, **options), q, k, v,
                                    arrays, d_out)
        _, lse = jax.jit(lambda q, k, v, arrays: _lse(q, k, v, **arrays, **options))(q, k, v, arrays)
    expected, expected_lse, valid = _np_attention(q, k, v, **arrays, **options)
    empty = [0, 17, 39, 20, 21, 22, 23]
    assert not valid[:, :, empty].any() and valid.sum() > 0
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(out[:, empty], 0.0)
    np.testing.assert_array_equal(lse[:, :, empty], np.inf)
    np.testing.assert_allclose(np.where(valid, lse, 0), np.where(valid, expected_lse, 0), atol=2e-5, rtol=2e-5)
    assert all(np.isfinite(g).all() for g in grads[:3])
    np.testing.assert_array_equal(grads[0][:, empty], 0.0)


def _lse(q, k, v, bias=None, mask=None, segment_ids=None, **options):
    """(out, log-sum-exp (B, N, T)) from the kernel module's forward on normalised inputs."""
    window = options.pop("local_window_size", None)
    segment_ids = None if segment_ids is None else (
        segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids))
    return fa.flash_attention(q, k, v, bias, mask, segment_ids, scale=q.shape[-1] ** -0.5, local_window=window,
                              config=BLOCKS16, return_lse=True, **options)


def test_skipped_blocks_are_never_read():
    """Keys and values that no query may see hold NaN: keys 32.. lie past every query (top-left causal, S > T),
    keys 16..31 carry a segment id no query has, and queries 16..31 (segment 7) see keys of their segment only
    past the diagonal (fully masked rows). The forward, dQ and dK/dV kernels skip those blocks, by causality or
    by segment ranges, so the output, dq and the other keys' dk, dv stay finite (a visited block would spread
    0 · NaN). Likewise for the keys of an all-False layout column."""
    B, T, S, N, K, H = 1, 32, 64, 2, 1, 16
    q, k, v, _ = _inputs((B, T, S, N, K, H), 4)
    unseen = np.arange(S) >= 16
    k, v = (jnp.where(unseen[None, :, None, None], jnp.nan, x) for x in (k, v))
    d_out = jnp.ones(q.shape, jnp.float32)
    q_ids = jnp.asarray(np.where(np.arange(T) < 16, 0, 7)[None].astype(np.int32))
    kv_ids = jnp.asarray(np.select([np.arange(S) < 16, np.arange(S) < 32], [0, 5], 7)[None].astype(np.int32))
    segments = dict(segment_ids=(q_ids, kv_ids))
    with jax.default_matmul_precision("float32"):
        out, grads = _out_and_grads(functools.partial(pallas_attention, config=BLOCKS16, is_causal=True), q, k, v,
                                    segments, d_out)
    expected, _, valid = _np_attention(q, k, v, is_causal=True, **segments)
    assert valid[:, :, :16].all() and not valid[:, :, 16:].any()
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)
    assert np.isfinite(grads[0]).all()
    assert all(np.isfinite(np.asarray(g)[:, ~unseen]).all() for g in grads[1:3])
    layout = np.array([[True, False, False, False], [True, False, False, False]])
    out, grads = _out_and_grads(functools.partial(pallas_attention, config=BLOCKS16, layout=layout,
                                                  layout_block_size=16), q, k, v, {}, d_out)
    assert np.isfinite(out).all() and np.isfinite(grads[0]).all()
    assert all(np.isfinite(np.asarray(g)[:, ~unseen]).all() for g in grads[1:3])


def test_bfloat16_causal_gqa():
    q, k, v, arrays = _inputs((2, 48, 48, 4, 2, 32), 5, jnp.bfloat16)
    d_out = jnp.asarray(np.random.default_rng(0).normal(size=q.shape), jnp.bfloat16)
    out, grads = _out_and_grads(functools.partial(pallas_attention, is_causal=True, config=MIXED), q, k, v, {}, d_out)
    _, ref_grads = _out_and_grads(functools.partial(dot_product_attention, is_causal=True, implementation="reference"),
                                  q, k, v, {}, d_out)
    assert out.dtype == jnp.bfloat16
    expected, _, _ = _np_attention(q, k, v, is_causal=True)  # of the bf16-rounded inputs
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=2e-2, rtol=2e-2)
    for g, g_ref in zip(grads[:3], ref_grads[:3]):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), atol=6e-2, rtol=6e-2)


@pytest.mark.parametrize("own, other, length, other_len, band, pad", [
    (16, 16, 40, 40, (None, 0), True), (32, 16, 33, 48, (-9, 3), True), (16, 32, 48, 33, (-3, 9), False),
    (16, 16, 64, 64, (-20, 0), True), (16, 32, 64, 40, (0, 30), True), (32, 16, 32, 80, (None, 0), True),
    (16, 16, 48, 48, None, True), (16, 16, 48, 40, None, True), (16, 16, 64, 64, (-70, 70), True),
])
def test_block_ranges_are_exactly_the_needed_blocks(own, other, length, other_len, band, pad):
    """For each own block: [first, stop) are exactly the other-axis blocks with an allowed (real, real) pair,
    and [full_first, full_stop) exactly those whose pairs are all allowed for every own position (padding
    included) and, with `pad`, hold no padded position."""
    own_pad, other_pad = -(-length // 32) * 32, -(-other_len // 32) * 32
    num_own, num_other = own_pad // own, other_pad // other
    a, b = np.arange(own_pad)[:, None], np.arange(other_pad)[None, :]
    in_band = np.ones((own_pad, other_pad), bool)
    if band is not None:
        lo, hi = band
        in_band &= ((lo is None) | (b - a >= (lo or 0))) & ((hi is None) | (b - a <= (hi or 0)))
    real = (a < length) & (b < other_len)
    for block in range(num_own):
        first, stop, full_first, full_stop = map(int, fa.block_ranges(
            block, own, length, other, num_other, other_len, band, pad,
            maximum=np.maximum, minimum=np.minimum, div=np.floor_divide))
        rows = slice(block * own, (block + 1) * own)
        blocks = [slice(j * other, (j + 1) * other) for j in range(num_other)]
        needed = [j for j in range(num_other) if (in_band & real)[rows, blocks[j]].any()]
        assert list(range(first, stop)) == needed, block
        full = [j for j in range(num_other) if in_band[rows, blocks[j]].all()
                and (not pad or (j + 1) * other <= other_len) and j in needed]
        assert list(range(full_first, full_stop)) == full, block


def test_dispatch_and_fallbacks():
    """implementation="pallas" runs the kernels (ALiBi from the slopes in them); the others take the slopes as a
    bias; a soft cap sends "xla" to "reference" (one warning) and None to "reference" on the CPU; a head_dim the
    kernels do not take sends "pallas" to "flash" (one warning)."""
    q, k, v, _ = _inputs((1, 20, 20, 2, 1, 16), 6)
    slopes = np.array([0.5, 0.25], np.float32)

    def outputs(q, k, v):
        return dict(pallas=dot_product_attention(q, k, v, is_causal=True, alibi_slopes=slopes, implementation="pallas"),
                    alibi=dot_product_attention(q, k, v, is_causal=True, alibi_slopes=slopes),
                    capped=dot_product_attention(q, k, v, logit_soft_cap=1.5, implementation="reference"),
                    capped_default=dot_product_attention(q, k, v, logit_soft_cap=1.5),
                    capped_xla=dot_product_attention(q, k, v, logit_soft_cap=1.5, implementation="xla"))

    with pytest.warns(UserWarning, match=r"implementation 'xla' cannot run this case \(logit soft-capping\)"):
        with jax.default_matmul_precision("float32"):
            out = jax.jit(outputs)(q, k, v)
    alibi, _, _ = _np_attention(q, k, v, alibi_slopes=slopes, is_causal=True)
    capped, _, _ = _np_attention(q, k, v, logit_soft_cap=1.5)
    for name, expected in (("pallas", alibi), ("alibi", alibi), ("capped", capped), ("capped_default", capped),
                           ("capped_xla", capped)):
        np.testing.assert_allclose(out[name], expected, atol=2e-5, rtol=2e-5, err_msg=name)
    q8 = q[..., :8]
    with pytest.warns(UserWarning, match=r"implementation 'pallas' cannot run this case \(head_dim=8 is not a power"), \
            jax.default_matmul_precision("float32"):
        out = jax.jit(lambda q: dot_product_attention(q, q, q, implementation="pallas", local_window_size=(3, 1)))(q8)
    np.testing.assert_allclose(out, _np_attention(q8, q8, q8, local_window_size=(3, 1))[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kwargs, shape, dtype, error, match", [
    (dict(), (1, 16, 2, 24), jnp.float32, ValueError, "head_dim=24 is not a power of two"),
    (dict(), (1, 16, 2, 16), jnp.float64, TypeError, "dtypes"),
    (dict(layout=np.ones((2, 2), bool), layout_block_size=16), (1, 16, 2, 16), jnp.float32, ValueError,
     r"layout must be a boolean \(T/b, S/b\) = \(1, 1\)"),
    (dict(layout=np.ones((2, 2), bool), layout_block_size=6), (1, 16, 2, 16), jnp.float32, ValueError,
     "must be multiples of the layout's block 6"),
    (dict(config=fa.Config(fa.Blocks(24, 16), fa.Blocks(16, 16), fa.Blocks(16, 16))), (1, 16, 2, 16), jnp.float32,
     ValueError, r"forward.block_q must be a power of two >= 16, got 24"),
    (dict(logit_soft_cap=0.0), (1, 16, 2, 16), jnp.float32, ValueError, "logit_soft_cap must be a real number"),
    (dict(alibi_slopes=np.ones(3, np.float32)), (1, 16, 2, 16), jnp.float32, ValueError,
     r"alibi_slopes must be a float array of shape \(N,\) = \(2,\)"),
])
def test_errors(kwargs, shape, dtype, error, match):
    with jax.enable_x64(dtype == jnp.float64):
        x = jnp.zeros(shape, dtype)
        with pytest.raises(error, match=match):
            pallas_attention(x, x, x, **kwargs)
