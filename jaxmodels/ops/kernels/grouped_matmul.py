"""Grouped matmul for dropless MoE as Pallas (Triton) kernels: forward, dx and dw; implementation "pallas" of
`jaxmodels.ops.moe.grouped_matmul`, which chooses the implementation.

The dropless MoE layer (MegaBlocks, Gale et al. 2022) sorts the token-assignments by expert, so expert
i owns rows [s_i, s_i + n_i) of x (M, d), s_i = Σ_{j<i} n_j, and multiplies them by its weight w[i]
(d, f). `jax.lax.ragged_dot` does this slowly on the GPU; this module does it as tiled GEMMs.

Tile schedule (built inside jit from group_sizes, no host sync). MegaBlocks pads every group to a
multiple of the row tile (its "padded" grouped GEMM), which costs a gather and a scatter of x. Here
the padding is virtual: each group's rows are cut into tiles of block_m rows starting at the group's
own first row s_i, and the group's last, partial tile is masked (rows outside [s_i, s_i + n_i) are
loaded as zeros and not stored). Rows past Σ n_i form one more segment whose tiles store zeros (as
`ragged_dot` does). The segments partition [0, M), so every output row is written exactly once and
no tile straddles two experts. The number of tiles is at most cdiv(M, block_m) + E (a static bound);
the unused slots of the schedule do nothing. The masked work is at most one tile per group: about
E * block_m / 2 rows of wasted MMA on average, like MegaBlocks' padding, and no extra memory traffic.

  forward   out[m] = x[m] @ w[g(m)]          grid (f / block_n, tiles); program (j, t) loops over d in
                                             block_k steps and writes the (block_m, block_n) tile
  dx        dx[m] = dy[m] @ w[g(m)]ᵀ         the same kernel reading w[g] transposed (no copy of w)
  dw        dw[i] = x_iᵀ dy_i                grid (d / block_m, f / block_n, E); program (a, b, i)
                                             loops over the rows of group i in block_k steps

The column index is the fastest-varying program index, so the programs that run together share one
row tile of x and sweep one expert's weights (both stay in L2). Products accumulate in float32
(`preferred_element_type`); outputs are cast to the input dtype. float32 inputs use the backend's
default dot precision (TF32 on the GPU, as XLA's default). On CPU the kernels run through the Pallas
interpreter (`interpret=True`): slow, used by the tests.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxmodels.ops.checks import check_grouped_operands

DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


class Blocks(NamedTuple):
    """Tile sizes and Triton launch options of one kernel.

    Forward and dx: block_m rows × block_n output columns per program, reduction in block_k steps.
    dw: a (block_m, block_n) tile of dw[i] (over d, f) per program, the group's rows in block_k steps.
    Each block is clamped to its dimension and must then be a power of two >= 16 dividing it.
    num_warps, num_stages: `jax.experimental.pallas.triton.CompilerParams` (warps per program, software
    pipelining depth of the reduction loop).
    The defaults are the fastest forward + backward of benchmarks/grouped_matmul.py's --configs
    (d 1024 and 2048, f 2048, 64 experts, routed groups; benchmarks/results/grouped_matmul.json).
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3


def _block_reason(name: str, block: int, dim: int, dim_name: str) -> str | None:
    b = min(block, dim)
    if b < 16 or b & (b - 1) or dim % b:
        return (f"{name}={block} clamped to {dim_name}={dim} gives {b}, which is not a power of two >= 16 "
                f"dividing {dim_name}")
    return None


def supports(x_sorted, w, blocks: Blocks = Blocks(), dw_blocks: Blocks | None = None) -> str | None:
    """None if `pallas_grouped_matmul` (forward and both gradients) covers these inputs and blocks,
    else the reason it cannot. x_sorted (M, d) and w (E, d, f) may be arrays or ShapeDtypeStructs."""
    if x_sorted.ndim != 2 or w.ndim != 3 or w.shape[1] != x_sorted.shape[1]:
        return f"shapes: expected x_sorted (M, d) and w (E, d, f), got {x_sorted.shape} and {w.shape}"
    if x_sorted.dtype != w.dtype or x_sorted.dtype not in DTYPES:
        return (f"dtypes: x_sorted and w must share one of bfloat16/float16/float32, got {x_sorted.dtype} "
                f"and {w.dtype}")
    d, f = w.shape[1:]
    if max(x_sorted.shape[0] * max(d, f), w.shape[0] * d * f) >= 2 ** 31:
        return "sizes: an operand of 2^31 or more elements (the kernels index with 32-bit offsets)"
    dw_blocks = blocks if dw_blocks is None else dw_blocks
    checks = [("block_k", blocks.block_k, d, "d"), ("block_n", blocks.block_n, f, "f"),  # forward
              ("block_k", blocks.block_k, f, "f"), ("block_n", blocks.block_n, d, "d"),  # dx
              ("block_m", blocks.block_m, 1 << 30, "M"),
              ("dw block_m", dw_blocks.block_m, d, "d"), ("dw block_n", dw_blocks.block_n, f, "f"),
              ("dw block_k", dw_blocks.block_k, 1 << 30, "M")]
    for check in checks:
        reason = _block_reason(*check)
        if reason:
            return reason
    return None


def _segments(group_sizes, num_rows):
    """(E + 1,) int32 start and end rows of the groups and of the tail of rows past Σ group_sizes.
    Negative sizes count as 0 and groups are cut at num_rows."""
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), num_rows)
    ends = jnp.append(ends, num_rows).astype(jnp.int32)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return starts, ends


def tile_schedule(group_sizes: jax.Array, num_rows: int, block_m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The row tiles of the forward and dx kernels (module docstring).

    Args:
      group_sizes: (E,) int group sizes. num_rows: M. block_m: rows per tile.

    Returns:
      (group, start, end), each (cdiv(M, block_m) + E,) int32: tile t covers rows
      [start[t], min(start[t] + block_m, end[t])) of group group[t]; group E marks a tile of rows past
      Σ group_sizes (written as zeros), group E + 1 an unused slot.
    """
    E = group_sizes.shape[0]
    seg_start, seg_end = _segments(group_sizes, num_rows)
    seg_tiles = (seg_end - seg_start + block_m - 1) // block_m
    seg_last = jnp.cumsum(seg_tiles)  # tiles up to and including each segment
    num_slots = pl.cdiv(num_rows, block_m) + E
    slot = jnp.arange(num_slots, dtype=jnp.int32)
    seg = jnp.searchsorted(seg_last, slot, side="right").astype(jnp.int32)  # in [0, E + 1]
    s = jnp.minimum(seg, E)
    start = seg_start[s] + (slot - (seg_last[s] - seg_tiles[s])) * block_m
    used = seg <= E
    return seg, jnp.where(used, start, 0), jnp.where(used, seg_end[s], 0)


def _gmm_kernel(group_ref, start_ref, end_ref, x_ref, w_ref, o_ref, *, num_groups, num_rows, k_dim, block_m,
                block_n, block_k, transpose_w):
    j, t = pl.program_id(0), pl.program_id(1)
    group, start, end = group_ref[t], start_ref[t], end_ref[t]
    window = jnp.minimum(start, num_rows - block_m)  # keeps every access in bounds; the mask selects the tile
    rows = window + jnp.arange(block_m, dtype=jnp.int32)
    mask = ((rows >= start) & (rows < end))[:, None]
    cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)
    out = o_ref.at[pl.ds(window, block_m), cols]

    @pl.when(group < num_groups)
    def _():
        def body(k, acc):
            ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
            a = plgpu.load(x_ref.at[pl.ds(window, block_m), ks], mask=mask, other=0)
            if transpose_w:
                b = w_ref[group, cols, ks]                                    # (block_n, block_k)
                dims = (((1,), (1,)), ((), ()))
            else:
                b = w_ref[group, ks, cols]                                    # (block_k, block_n)
                dims = (((1,), (0,)), ((), ()))
            return acc + lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, k_dim // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
        plgpu.store(out, acc.astype(o_ref.dtype), mask=mask)

    @pl.when(group == num_groups)
    def _():
        plgpu.store(out, jnp.zeros((block_m, block_n), o_ref.dtype), mask=mask)


def _gmm_call(x, w, group_sizes, *, blocks, transpose_w, interpret):
    """out (M, N) = x (M, K) @ w[g] (K, N), or @ w[g]ᵀ with w (E, N, K) when transpose_w. M >= block_m."""
    num_rows, k_dim = x.shape
    num_groups = w.shape[0]
    n_dim = w.shape[1] if transpose_w else w.shape[2]
    block_m, block_n, block_k = blocks.block_m, min(blocks.block_n, n_dim), min(blocks.block_k, k_dim)
    group, start, end = tile_schedule(group_sizes, num_rows, block_m)
    kernel = functools.partial(_gmm_kernel, num_groups=num_groups, num_rows=num_rows, k_dim=k_dim,
                               block_m=block_m, block_n=block_n, block_k=block_k, transpose_w=transpose_w)
    return pl.pallas_call(
        kernel, grid=(n_dim // block_n, group.shape[0]),
        out_shape=jax.ShapeDtypeStruct((num_rows, n_dim), x.dtype),
        interpret=interpret, name="grouped_matmul_dx" if transpose_w else "grouped_matmul",
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
    )(group, start, end, x, w)


def _dw_kernel(start_ref, end_ref, x_ref, dy_ref, dw_ref, *, num_rows, block_m, block_n, block_k):
    a_idx, b_idx, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = start_ref[i], end_ref[i]
    d_cols = pl.ds(pl.multiple_of(a_idx * block_m, block_m), block_m)
    f_cols = pl.ds(pl.multiple_of(b_idx * block_n, block_n), block_n)

    def body(c, acc):
        lo = start + c * block_k
        window = jnp.minimum(lo, num_rows - block_k)
        rows = window + jnp.arange(block_k, dtype=jnp.int32)
        mask = ((rows >= lo) & (rows < end))[:, None]
        a = plgpu.load(x_ref.at[pl.ds(window, block_k), d_cols], mask=mask, other=0)   # (block_k, block_m)
        b = plgpu.load(dy_ref.at[pl.ds(window, block_k), f_cols], mask=mask, other=0)  # (block_k, block_n)
        return acc + lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    num_chunks = (end - start + block_k - 1) // block_k
    acc = lax.fori_loop(0, num_chunks, body, jnp.zeros((block_m, block_n), jnp.float32))
    dw_ref[...] = acc.astype(dw_ref.dtype)


def _dw_call(x, dy, group_sizes, *, blocks, w_dtype, interpret):
    """dw (E, d, f) with dw[i] = x_iᵀ dy_i over the rows of group i. M >= block_k."""
    num_rows, d = x.shape
    f = dy.shape[1]
    num_groups = group_sizes.shape[0]
    block_m, block_n, block_k = min(blocks.block_m, d), min(blocks.block_n, f), blocks.block_k
    start, end = _segments(group_sizes, num_rows)
    kernel = functools.partial(_dw_kernel, num_rows=num_rows, block_m=block_m, block_n=block_n, block_k=block_k)
    return pl.pallas_call(
        kernel, grid=(d // block_m, f // block_n, num_groups),
        in_specs=[pl.no_block_spec] * 4,
        out_specs=pl.BlockSpec((None, block_m, block_n), lambda a, b, i: (i, a, b)),
        out_shape=jax.ShapeDtypeStruct((num_groups, d, f), w_dtype),
        interpret=interpret, name="grouped_matmul_dw",
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
    )(start[:num_groups], end[:num_groups], x, dy)


def _pad_rows(x, rows):
    return x if x.shape[0] >= rows else jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(x, w, group_sizes, blocks, dw_blocks, interpret):
    return _gmm_call(_pad_rows(x, blocks.block_m), w, group_sizes, blocks=blocks, transpose_w=False,
                     interpret=interpret)[:x.shape[0]]


def _gmm_fwd(x, w, group_sizes, blocks, dw_blocks, interpret):
    return _gmm(x, w, group_sizes, blocks, dw_blocks, interpret), (x, w, group_sizes)


def _gmm_bwd(blocks, dw_blocks, interpret, residuals, dy):
    x, w, group_sizes = residuals
    M = x.shape[0]
    dx = _gmm_call(_pad_rows(dy, blocks.block_m), w, group_sizes, blocks=blocks, transpose_w=True,
                   interpret=interpret)[:M]
    rows = dw_blocks.block_k  # padded rows lie past Σ group_sizes (<= M): no group reads them
    dw = _dw_call(_pad_rows(x, rows), _pad_rows(dy, rows), group_sizes, blocks=dw_blocks, w_dtype=w.dtype,
                  interpret=interpret)
    return dx, dw, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def pallas_grouped_matmul(x_sorted: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                          blocks: Blocks = Blocks(), dw_blocks: Blocks | None = None,
                          interpret: bool | None = None) -> jax.Array:
    """Grouped matmul (MegaBlocks' expert computation, Gale et al. 2022) by the Pallas kernels above.

    Rows [s_i, s_i + group_sizes[i]) of x_sorted times w[i], s_i = Σ_{j<i} group_sizes[j]; rows past
    Σ group_sizes give zeros (the semantics of `jax.lax.ragged_dot` and of
    `jaxmodels.ops.moe.grouped_matmul`). Differentiable in x_sorted and w (custom VJP: dx by the same
    kernel on w transposed, dw[i] = x_iᵀ dy_i by a second kernel).

    Args:
      x_sorted: (M, d) rows grouped by expert, bfloat16, float16 or float32.
      w: (E, d, f) in x_sorted's dtype.
      group_sizes: (E,) integer, Σ <= M (negative sizes count as 0, groups are cut at row M).
      blocks: tiles and launch options of the forward and dx kernels (`Blocks`).
      dw_blocks: those of the dw kernel (default: `blocks`).
      interpret: run the Pallas interpreter (default: on non-GPU backends).

    Returns:
      (M, f) in x_sorted's dtype (float32 accumulation).

    Raises:
      ValueError / TypeError of `checks.check_grouped_operands`; ValueError for blocks the kernels cannot tile,
      TypeError for dtypes (`supports`).
    """
    check_grouped_operands(x_sorted, w, group_sizes)
    blocks = Blocks(*(int(v) for v in blocks))
    dw_blocks = blocks if dw_blocks is None else Blocks(*(int(v) for v in dw_blocks))
    reason = supports(x_sorted, w, blocks, dw_blocks)
    if reason:
        error = TypeError if reason.startswith("dtypes") else ValueError
        raise error(f"pallas_grouped_matmul does not cover these inputs: {reason}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return _gmm(x_sorted, w, group_sizes.astype(jnp.int32), blocks, dw_blocks, bool(interpret))
