"""flash_attention (and dot_product_attention's "flash") against the float64 NumPy reference of
test_attention.py for values and the "reference" implementation's autodiff for gradients; block
skipping, the memory bound, dtypes, dispatch and errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmodels.ops import attention
from jaxmodels.ops.attention import IMPLEMENTATIONS, dot_product_attention, flash_attention, select_implementation
from tests.jaxprs import equations
from tests.ops.test_attention import _inputs, _np_attention

# (B, T, S, N, K, H) and options, as test_attention.CASES, plus (block_q, block_k) (default (8, 16)):
# lengths from {1, 7, 33, 64} so that many blocks, partial last blocks and single blocks all occur;
# bias shapes (1, N, T, S) as ALiBi's, full, per query, per key, 2-D.
CASES = {
    "plain": dict(dims=(2, 33, 33, 2, 2, 8)),
    "t_lt_s_cache_mask": dict(dims=(2, 7, 64, 4, 2, 8), mask=(2, 1, 7, 64)),
    "t_gt_s_mqa_bias_2d": dict(dims=(2, 64, 7, 4, 1, 8), bias=(64, 7), blocks=(16, 8)),
    "one_query": dict(dims=(2, 1, 33, 4, 2, 8), mask=(2, 1, 1, 33), bias=(1, 4, 1, 33)),
    "one_key_blocks_larger_than_lengths": dict(dims=(1, 7, 1, 2, 1, 8), is_causal=True, blocks=(128, 128)),
    "causal": dict(dims=(1, 64, 64, 4, 2, 8), is_causal=True),
    "causal_t_lt_s": dict(dims=(2, 33, 64, 4, 2, 8), is_causal=True),
    "causal_t_gt_s": dict(dims=(1, 64, 33, 2, 1, 8), is_causal=True, blocks=(16, 7)),
    "window_int": dict(dims=(1, 64, 64, 2, 1, 8), window=5),
    "window_pair_t_lt_s": dict(dims=(2, 33, 64, 4, 2, 8), window=(9, 3)),
    "window_right_only_t_gt_s": dict(dims=(1, 64, 33, 2, 2, 8), window=(0, 20)),  # late queries see nothing
    "window_causal": dict(dims=(2, 64, 64, 4, 2, 8), window=(20, 4), is_causal=True),
    "segments_bias_per_query": dict(dims=(2, 33, 33, 4, 2, 8), segments="shared", bias=(2, 1, 33, 1)),
    "segment_pair": dict(dims=(2, 33, 64, 2, 2, 8), segments="pair"),
    "mask_and_bias_full_mqa": dict(dims=(2, 33, 33, 4, 1, 8), mask=(2, 4, 33, 33), bias=(2, 4, 33, 33)),
    "bias_per_key_mask_per_key": dict(dims=(2, 33, 64, 4, 2, 8), bias=(1, 4, 1, 64), mask=(2, 1, 1, 64)),
    "everything": dict(dims=(2, 64, 64, 4, 2, 8), mask=(2, 1, 64, 64), bias=(1, 4, 64, 64), is_causal=True,
                       segments="shared", window=(24, 0), scale=0.3),
    "everything_t_ne_s": dict(dims=(2, 33, 64, 4, 1, 8), mask=(2, 4, 33, 64), bias=(2, 1, 33, 64),
                              segments="pair", window=(5, 9), scale=0.5, blocks=(16, 8)),
}


def _flash(blocks=(8, 16), **options):
    return functools.partial(flash_attention, block_q=blocks[0], block_k=blocks[1], **options)


def _reference(**options):
    return functools.partial(dot_product_attention, implementation="reference", **options)


@functools.partial(jax.jit, static_argnums=0)
def _out_and_grads(attention_fn, q, k, v, bias, arrays, d_out):
    """attention_fn(q, k, v, bias, **arrays) and the gradients of <out, d_out> w.r.t. (q, k, v, bias),
    under jit."""
    out, vjp = jax.vjp(lambda q, k, v, bias: attention_fn(q, k, v, bias, **arrays), q, k, v, bias)
    return out, vjp(d_out.astype(out.dtype))


def _split(kw):
    """test_attention._inputs' keyword options -> (bias, arrays (mask, segment_ids), static options)."""
    kw = dict(kw)
    bias = kw.pop("bias", None)
    return bias, {name: kw.pop(name) for name in ("mask", "segment_ids") if name in kw}, kw


def _check(q, k, v, kw, blocks, *, tol, grad_tol, seed=0):
    """flash's output against the float64 NumPy reference, and its gradients (for a random output
    cotangent) against the "reference" implementation's autodiff, both on the same inputs."""
    bias, arrays, options = _split(kw)
    d_out = np.random.default_rng(seed).normal(size=q.shape)
    out, grads = _out_and_grads(_flash(blocks, **options), q, k, v, bias, arrays, d_out)
    ref_out, ref_grads = _out_and_grads(_reference(**options), q, k, v, bias, arrays, d_out)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected, valid = _np_attention(q, k, v, bias, **arrays, **options)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=tol, rtol=tol)
    for name, g, g_ref in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        if g_ref is None:  # no bias
            assert g is None
            continue
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, name
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), atol=grad_tol,
                                   rtol=grad_tol, err_msg=name)
    return out, grads, valid


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_float32(name):
    case = CASES[name]
    q, k, v, kw = _inputs(case, seed=list(CASES).index(name))
    _check(q, k, v, kw, case.get("blocks", (8, 16)), tol=1e-5, grad_tol=2e-5)


def test_alibi_causal():
    """ALiBi (Press et al. 2022): bias -slope_n · (i - j) per head, slopes 2^(-8n/N), with causality."""
    B, T, N, K, H = 2, 64, 4, 2, 8
    rng = np.random.default_rng(7)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k, v = rng.normal(size=(2, B, T, K, H)).astype(np.float32)
    slopes = 2.0 ** (-8 * np.arange(1, N + 1) / N)
    distance = np.arange(T)[:, None] - np.arange(T)[None, :]
    bias = (-slopes[:, None, None] * distance)[None].astype(np.float32)  # (1, N, T, T)
    _check(q, k, v, dict(bias=bias, is_causal=True), (16, 8), tol=1e-5, grad_tol=2e-5)


@pytest.mark.parametrize("name", ["everything", "window_pair_t_lt_s"])
def test_matches_reference_bfloat16(name):
    case = CASES[name]
    q, k, v, kw = _inputs(case, seed=11, dtype=jnp.bfloat16)
    assert q.dtype == jnp.bfloat16
    _check(q, k, v, kw, case.get("blocks", (8, 16)), tol=3e-2, grad_tol=6e-2)


def test_bfloat16_statistics_are_float32():
    """bf16 inputs over 256 key blocks: with l and O carried in float32 the output is within bf16's
    rounding (0.4% here); carried in bf16 they drift (3% when tried), as each block's small addition
    to a large running sum is rounded away. Values of mean 4 make that drift show in the output."""
    B, T, S, N, H = 1, 4, 2048, 2, 8
    rng = np.random.default_rng(3)
    q, k = (jnp.asarray(rng.normal(size=(B, n, N, H)), jnp.bfloat16) for n in (T, S))
    v = jnp.asarray(rng.normal(size=(B, S, N, H)) + 4, jnp.bfloat16)
    out = jax.jit(_flash((4, 8)))(q, k, v)
    assert out.dtype == jnp.bfloat16
    expected, _ = _np_attention(q, k, v)  # of the bf16-rounded inputs
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=1e-2)


def test_gradients_float64_numerical():
    """Reverse-mode gradients w.r.t. q, k, v, bias and scale against finite differences (float64)."""
    q, k, v, kw = _inputs(CASES["everything"], seed=5)
    bias, arrays, options = _split(kw)
    options.pop("scale")
    with jax.enable_x64(True):
        f = jax.jit(lambda q, k, v, bias, scale: _flash((16, 8), **options)(q, k, v, bias, scale=scale, **arrays))
        args = tuple(jnp.asarray(a, jnp.float64) for a in (q, k, v, bias, 0.4))
        check_grads(f, args, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_fully_masked_rows():
    """Rows with no allowed key (mask, unmatched segment ids) are zeros with zero gradient, as in
    "reference", and every gradient stays finite."""
    B, T, S, N, K, H = 2, 33, 33, 4, 2, 8
    rng = np.random.default_rng(2)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k, v = rng.normal(size=(2, B, S, K, H)).astype(np.float32)
    bias = rng.normal(size=(1, N, T, S)).astype(np.float32)
    mask = rng.random((B, 1, T, S)) < 0.8
    mask[:, :, [0, 17, 32]] = False
    q_ids = np.zeros((B, T), int)
    q_ids[:, 20:24] = 5  # absent from the keys
    kw = dict(bias=bias, mask=mask, segment_ids=(q_ids, np.zeros((B, S), int)))
    out, grads, valid = _check(q, k, v, kw, (8, 16), tol=1e-5, grad_tol=2e-5)
    empty = [0, 17, 32, 20, 21, 22, 23]
    assert not valid[:, empty].any()
    np.testing.assert_array_equal(out[:, empty], 0.0)
    assert all(np.isfinite(g).all() for g in grads)
    d_q, d_bias = grads[0], grads[3]
    np.testing.assert_array_equal(d_q[:, empty], 0.0)
    np.testing.assert_array_equal(d_bias[:, :, empty], 0.0)


@pytest.mark.parametrize("T, S, block_q, block_k, is_causal, window", [
    (64, 64, 8, 16, True, None), (33, 64, 8, 16, True, None), (64, 33, 16, 8, True, None),
    (64, 64, 16, 7, True, None), (64, 64, 8, 8, False, (5, 5)), (64, 64, 16, 8, False, (0, 20)),
    (33, 64, 8, 16, False, (9, 3)), (64, 64, 8, 16, True, (20, 4)), (64, 33, 16, 16, False, (40, 0)),
    (64, 33, 16, 8, False, (0, 20)),  # query blocks past S + 20 - 1 see no key block at all
    (7, 64, 4, 8, False, (0, 0)), (64, 64, 8, 16, False, None),
])
def test_block_ranges_are_exactly_the_blocks_with_allowed_pairs(T, S, block_q, block_k, is_causal, window):
    """The forward visits key block j from query block i, and the backward query block i from key
    block j, iff some (query < T, key < S) pair of the two blocks is allowed by causality and window."""
    grid = attention._Grid(block_q, block_k, T, S, is_causal, window)
    allowed = np.ones((T, S), bool)
    q_pos, kv_pos = np.arange(T)[:, None], np.arange(S)[None, :]
    if is_causal:
        allowed &= kv_pos <= q_pos
    if window is not None:
        allowed &= (q_pos - window[0] <= kv_pos) & (kv_pos <= q_pos + window[1])
    needed = np.array([[allowed[i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k].any()
                        for j in range(grid.num_kv_blocks)] for i in range(grid.num_q_blocks)])
    for i in range(grid.num_q_blocks):
        first, stop = map(int, attention._kv_block_range(grid, i))
        assert list(range(first, stop)) == list(np.flatnonzero(needed[i])), i
    for j in range(grid.num_kv_blocks):
        first, stop = map(int, attention._q_block_range(grid, j))
        assert list(range(first, stop)) == list(np.flatnonzero(needed[:, j])), j
    if is_causal or window is not None:
        assert not needed.all()  # something is skipped


@pytest.mark.parametrize("is_causal, window", [(True, None), (False, (20, 9))])
def test_block_skipping_changes_nothing(monkeypatch, is_causal, window):
    """Causal / windowed attention over 16 query x 8 key blocks: the same values and gradients
    with the fully masked blocks skipped as with every block visited (`_block_range` patched to
    all blocks), and as "reference"."""
    B, T, N, K, H = 1, 128, 2, 1, 8
    rng = np.random.default_rng(4)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k, v = rng.normal(size=(2, B, T, K, H)).astype(np.float32)
    bias = rng.normal(size=(1, N, T, T)).astype(np.float32)
    d_out = rng.normal(size=q.shape)
    options = dict(is_causal=is_causal, local_window_size=window)
    skipping = _out_and_grads(_flash((8, 16), **options), q, k, v, bias, {}, d_out)
    reference = _out_and_grads(_reference(**options), q, k, v, bias, {}, d_out)
    monkeypatch.setattr(attention, "_block_range", lambda block, size, length, other_size, num_other, lo, hi:
                        (0, num_other))
    every_block = _out_and_grads(_flash((8, 16), **options), q, k, v, bias, {}, d_out)
    for a, b, c in zip(jax.tree.leaves(skipping), jax.tree.leaves(every_block), jax.tree.leaves(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=2e-5)


def _array_sizes(jaxpr):
    """Sizes of all arrays a jaxpr computes, inside loops, conds and custom-VJP calls too."""
    return (math.prod(var.aval.shape) for eqn in equations(jaxpr) for var in eqn.outvars)


@pytest.mark.parametrize("options", [dict(), dict(is_causal=True),
                                     dict(local_window_size=(128, 0), segment_ids=np.arange(1024)[None] // 300)],
                         ids=["plain", "causal", "window_segments"])
def test_never_materialises_the_score_matrix(options):
    """T = S = 1024, H = 8, blocks 128, one batch and head: no array in the jaxpr of forward +
    backward has T·S = 2^20 elements (the largest is a 128 x 128 block), while "reference"'s does;
    and the compiled forward + backward needs less temporary memory than one float32 T x S matrix."""
    T, H = 1024, 8
    q, k, v = (jnp.ones((1, T, 1, H), jnp.float32),) * 3

    def value_and_grad(attention_fn):
        return jax.value_and_grad(lambda q, k, v: attention_fn(q, k, v, **options).sum(), argnums=(0, 1, 2))

    largest = {name: max(_array_sizes(jax.make_jaxpr(value_and_grad(fn))(q, k, v).jaxpr))
               for name, fn in (("flash", _flash((128, 128))), ("reference", _reference()))}
    assert largest == {"flash": 128 * 128, "reference": T * T}
    memory = jax.jit(value_and_grad(_flash((128, 128)))).lower(q, k, v).compile().memory_analysis()
    assert memory.temp_size_in_bytes < T * T * 4


def test_dot_product_attention_flash_is_flash_attention_with_default_blocks():
    q, k, v, kw = _inputs(CASES["everything_t_ne_s"], seed=2)
    bias, arrays, options = _split(kw)
    via_dispatch = jax.jit(functools.partial(dot_product_attention, implementation="flash", **options))
    direct = jax.jit(functools.partial(flash_attention, **options))
    np.testing.assert_array_equal(direct(q, k, v, bias, **arrays), via_dispatch(q, k, v, bias, **arrays))
    assert "flash" in IMPLEMENTATIONS


def test_automatic_choice_is_flash_for_long_sequences_on_cpu():
    """implementation=None at T = S = 2048 on the CPU: no T x S array anywhere (so "flash", not "xla")."""
    q = jnp.ones((1, 2048, 1, 8), jnp.float32)
    assert max(_array_sizes(jax.make_jaxpr(dot_product_attention)(q, q, q).jaxpr)) < 2048 * 2048
    q = jnp.ones((1, 64, 1, 8), jnp.float32)
    assert max(_array_sizes(jax.make_jaxpr(dot_product_attention)(q, q, q).jaxpr)) == 64 * 64  # "xla"


def test_select_implementation_flash():
    select = functools.partial(select_implementation, is_causal=False, local_window=None, pallas_runs=False)
    long = 2048
    for platform in ("cpu", "tpu", "rocm"):
        assert select(platform, jnp.float32, 64, long, long) == "flash"
        assert select(platform, jnp.bfloat16, 64, long - 1, long) == "xla"
    assert select("cpu", jnp.float32, 64, 1, long * long) == "flash"  # one query, a long cache
    assert select("cuda", jnp.bfloat16, 64, long, long) == "cudnn"  # cuDNN first where it applies
    assert select("cuda", jnp.float32, 64, long, long) == "flash"
    assert select("cuda", jnp.bfloat16, 64, long, long, local_window=(4, 2)) == "flash"
    assert select("cuda", jnp.float32, 64, 512, 512) == "xla"


@pytest.mark.parametrize("name, size", [("block_q", 0), ("block_q", -8), ("block_k", 2.5), ("block_k", True),
                                        ("block_q", "8"), ("block_k", None)])
def test_bad_block_sizes(name, size):
    q = np.zeros((1, 8, 2, 8), np.float32)
    error = ValueError if isinstance(size, int) and not isinstance(size, bool) else TypeError
    with pytest.raises(error, match=f"{name} must be a positive int, got {size!r}"):
        flash_attention(q, q, q, **{name: size})


def test_input_errors_as_dot_product_attention():
    q, k = np.zeros((2, 3, 4, 8), np.float32), np.zeros((2, 5, 3, 8), np.float32)
    with pytest.raises(ValueError, match="got 4 query heads and 3 key/value heads"):
        flash_attention(q, k, k)
    with pytest.raises(TypeError, match="mask must be boolean"):
        flash_attention(q, q, q, mask=np.ones((1, 1, 3, 3)))
