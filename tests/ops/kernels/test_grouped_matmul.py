"""The Pallas grouped matmul (interpreted on CPU) against a float64 NumPy loop and moe.grouped_matmul."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops import dispatch, moe
from jaxmodels.ops.kernels.grouped_matmul import Blocks, pallas_grouped_matmul, supports, tile_schedule

SMALL = Blocks(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2)
DW_SMALL = Blocks(block_m=32, block_n=16, block_k=16, num_warps=4, num_stages=2)


def _loop(x, w, sizes):
    """float64 per-group loop; rows past sum(sizes) are zero."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for e, n in enumerate(sizes):
        out[start:start + n] = x[start:start + n] @ w[e]
        start += n
    return out


def _case(seed, sizes, extra, d=32, f=48, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    M = sum(sizes) + extra
    x = jnp.asarray(rng.standard_normal((M, d)), dtype)
    w = jnp.asarray(rng.standard_normal((len(sizes), d, f)) / np.sqrt(d), dtype)
    return x, w, jnp.asarray(sizes, jnp.int32)


# (group sizes, rows past their sum): empty groups, groups smaller than a 16-row tile and straddling
# tile boundaries, a tail of rows past the sum, no tail, M smaller than one tile.
CASES = [((20, 0, 5, 40, 3), 7), ((0, 33, 0, 15), 0), ((3, 2), 4)]


@pytest.mark.parametrize("sizes, extra", CASES)
def test_forward_and_gradients_match_loop_and_reference(sizes, extra):
    x, w, gs = _case(sum(sizes) + extra, sizes, extra)
    gmm = jax.jit(lambda x, w, gs: pallas_grouped_matmul(x, w, gs, blocks=SMALL, dw_blocks=DW_SMALL))
    y = gmm(x, w, gs)
    assert y.shape == (x.shape[0], w.shape[2]) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, _loop(x, w, sizes), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, moe.grouped_matmul(x, w, gs, implementation="reference"), rtol=1e-5, atol=1e-5)

    ct = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape), jnp.float32)
    grad = lambda fn: jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w, gs) * ct), argnums=(0, 1)))
    dx, dw = grad(gmm)(x, w)
    ref_dx, ref_dw = grad(lambda x, w, gs: moe.grouped_matmul(x, w, gs, implementation="reference"))(x, w)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5)
    # and against float64: dx[m] = ct[m] w[g(m)]ᵀ (zero past the sum), dw[e] = x_eᵀ ct_e
    ct64, x64, w64 = (np.asarray(a, np.float64) for a in (ct, x, w))
    np.testing.assert_allclose(dx, _loop(ct64, w64.transpose(0, 2, 1), sizes), rtol=1e-5, atol=1e-5)
    bounds = np.cumsum((0,) + sizes)
    dw64 = np.stack([x64[a:b].T @ ct64[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
    np.testing.assert_allclose(dw, dw64, rtol=1e-5, atol=1e-5)


def _within_one_bf16_rounding(actual, expected64):
    """actual (bf16) is expected64 (float64) rounded once to bfloat16 (error <= half an ulp <= 2^-8 |value|), up
    to float32 summation: what a bf16 matmul that accumulates in float32 gives."""
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected64, rtol=2**-8, atol=1e-3)


def test_bfloat16_default_blocks_and_moe_switch():
    """bf16 against float64: the kernel, ragged_dot and the reference (which accumulates in float32) are each
    within one bf16 rounding, forward and weight gradient."""
    sizes = (70, 0, 50, 9)
    x, w, gs = _case(3, sizes, 15, d=32, f=64, dtype=jnp.bfloat16)  # 144 rows: tiles of 128 straddle groups
    kernel = pallas_grouped_matmul(x, w, gs)  # default Blocks, clamped to d = 32, f = 64
    x64 = np.asarray(x, np.float64)
    bounds = np.cumsum((0,) + sizes)
    dw64 = np.stack([x64[a:b].T @ np.ones((b - a, w.shape[2])) for a, b in zip(bounds[:-1], bounds[1:])])
    for name in ("pallas", "ragged_dot", "reference"):
        gmm = lambda x, w, name=name: moe.grouped_matmul(x, w, gs, implementation=name)
        y = gmm(x, w)
        dw = jax.grad(lambda w: jnp.sum(gmm(x, w).astype(jnp.float32)))(w)
        assert y.dtype == dw.dtype == jnp.bfloat16, name
        if name == "pallas":
            np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(kernel, np.float32))
        _within_one_bf16_rounding(y, _loop(x, w, sizes))
        _within_one_bf16_rounding(dw, dw64)


@pytest.mark.parametrize("sizes, num_rows", [((20, 0, 5, 40, 3), 75), ((0, 0), 5), ((9, 9, 9), 27), ((30, 30), 40)])
def test_tile_schedule_covers_every_row_once(sizes, num_rows):
    block_m = 8
    schedule = jax.jit(tile_schedule, static_argnums=(1, 2))(jnp.asarray(sizes, jnp.int32), num_rows, block_m)
    group, start, end = (np.asarray(a) for a in schedule)
    assert group.shape == (-(-num_rows // block_m) + len(sizes),)
    row_group = np.full(num_rows, len(sizes))  # rows past the (cut) sum: the zero segment
    bounds = np.minimum(np.cumsum((0,) + sizes), num_rows)
    for e in range(len(sizes)):
        row_group[bounds[e]:bounds[e + 1]] = e
    covered = np.zeros(num_rows, int)
    for g, s, e in zip(group, start, end):
        if g <= len(sizes):
            rows = np.arange(s, min(s + block_m, e))
            assert len(rows) and (row_group[rows] == g).all()
            covered[rows] += 1
    np.testing.assert_array_equal(covered, 1)


def test_errors():
    x, w, gs = _case(0, (2, 3), 1)
    with pytest.raises(ValueError, match=r"expected x_sorted \(M, d\), w \(E, d, f\), group_sizes \(E,\)"):
        pallas_grouped_matmul(x[:, :3], w, gs)
    with pytest.raises(ValueError, match=r"group_sizes \(E,\); got"):
        pallas_grouped_matmul(x, w, gs[:1])
    with pytest.raises(TypeError, match="group_sizes must be integer"):
        pallas_grouped_matmul(x, w, gs.astype(jnp.float32))
    with pytest.raises(TypeError, match="must share one of bfloat16/float16/float32, got float32 and bfloat16"):
        pallas_grouped_matmul(x, w.astype(jnp.bfloat16), gs)
    with pytest.raises(ValueError, match="block_k=24 clamped to d=32 gives 24, which is not a power of two"):
        pallas_grouped_matmul(x, w, gs, blocks=Blocks(block_k=24))
    with pytest.raises(ValueError, match="dw block_n=128 clamped to f=48 gives 48"):
        pallas_grouped_matmul(x, w, gs, blocks=SMALL, dw_blocks=Blocks())
    x2, w2, _ = _case(0, (2, 3), 1, d=24)
    assert "d=24" in supports(x2, w2)
    big = jax.ShapeDtypeStruct((2 ** 20, 2048), jnp.bfloat16), jax.ShapeDtypeStruct((8, 2048, 2048), jnp.bfloat16)
    assert "32-bit offsets" in supports(*big)
    assert supports(x, w, SMALL) is None and "block_n=128 clamped to f=48" in supports(x, w)


def test_moe_pallas_falls_back_to_ragged_dot_with_one_warning():
    assert moe.IMPLEMENTATIONS == ("reference", "ragged_dot", "pallas")
    x, w, gs = _case(4, (2, 3), 1, d=24)  # d = 24: no power-of-two block divides it
    expected = moe.grouped_matmul(x, w, gs, implementation="ragged_dot")
    dispatch._warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ys = [moe.grouped_matmul(x, w, gs, implementation="pallas") for _ in range(2)]
    assert len(caught) == 1 and str(caught[0].message).startswith(
        "grouped_matmul: implementation 'pallas' cannot run this case (block_k=64 clamped to d=24")
    assert str(caught[0].message).endswith("; using 'ragged_dot'")
    for y in ys:
        np.testing.assert_array_equal(y, expected)
