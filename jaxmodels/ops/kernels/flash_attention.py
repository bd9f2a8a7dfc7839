"""FlashAttention-2 as Pallas (Triton) kernels: forward, dQ, dK/dV and d bias; implementation "pallas" of
`jaxmodels.ops.attention.dot_product_attention` (and of `sparse_attention.block_sparse_attention`), which check
the inputs and choose the implementation.

softmax(Q Kᵀ · scale + bias) V for query (B, T, N, H) and key, value (B, S, K, H), N a multiple of K, with
the online softmax of FlashAttention (Dao et al. 2022) in FlashAttention-2's loop order and work split
(Dao 2023, Alg. 1 forward, Alg. 2 backward):

  forward  grid (T/B_r, B, N); program (i, b, n) holds Q_i (B_r, H), loops over the key blocks K_j, V_j it
           needs, keeps the running max m, sum l and unnormalised O in float32 (rescaled by exp(m_old - m_new)),
           and writes O_i = O / l and the log-sum-exp L_i = m + log l (the backward's only residual besides O).
  dQ       grid (T/B_r, B, N); recomputes P_ij = exp(S_ij - L_i) and dS_ij = P_ij ∘ (dP_ij - D_i) with
           D_i = rowsum(dO_i ∘ O_i), accumulates dQ_i = Σ_j dS_ij K_j.
  dK, dV   grid (S/B_c, B, K); program (j, b, kh) holds K_j, V_j of key/value head kh and loops over the
           G = N/K query heads that read it and the query blocks that see block j: dV_j = Σ Pᵀ dO,
           dK_j = Σ dSᵀ Q. Grouped-query heads are summed in registers: K and V are never repeated in memory
           (forward and dQ read head n // G through the BlockSpec index map).
  d bias   grid (bias's query blocks, bias's batch, bias's heads), only when a bias gradient is used (XLA
           drops the call otherwise): dS summed down to the bias's broadcast shape.

Scores. S = scale · Q Kᵀ, soft-capped to c · tanh(S / c) with `logit_soft_cap` c (Gemma 2, Team et al.
2024), then + bias, + ALiBi's -m_n · |i - j| (Press et al. 2022) computed from the slopes in the kernel,
then masked: causal, local window (i - left <= j <= i + right), segment ids (q_id == kv_id), a boolean mask
operand, padded keys. Kept in base 2 (scaled by log2 e, exp2 in the kernel) as Triton's tutorial does.

Block skipping. The key blocks of a query block (and the query blocks of a key block) are a range computed
from the causal/window band and, with segment ids, from each block's smallest and largest id (ids need not
be sorted: a block whose id range misses the other block's is fully masked); blocks outside it are not
visited. Inside the range, the blocks that the band allows entirely (and that hold no padded key) run
without the position mask. A block-sparse `layout` (Sparse Transformer layouts, Child et al. 2019) replaces
the range by a static table of the (query block, key block) pairs to compute, visited in that order.

Fully masked query rows (no allowed key) give output 0, L = +inf and zero gradients, the convention of
`dot_product_attention`'s "reference". Lengths that are not multiples of the blocks are zero-padded here
(padded keys masked, padded queries dropped). On CPU the kernels run through the Pallas interpreter
(`interpret=True`): slow, used by the tests.

Speed (one H200, bf16, causal, forward + backward; benchmarks/results/flash_attention_h200.json): 300-350 TFLOP/s,
0.80-0.85x cuDNN at head_dim 64 and 0.66-0.71x at 128 (forward 0.74x, backward 0.63-0.69x there: these Triton
kernels use no TMA or warp specialisation, which cuDNN's FlashAttention-3-style kernels do); 4.5-7.4x the
pure-JAX "flash".
Sparse layouts at 16k: 10-11x cuDNN given the layout as a dense bias, 5-7x `block_sparse_attention`'s gather.
"""

import dataclasses
import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxmodels.ops.checks import MASKED_SCORE

DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
LOG2E = math.log2(math.e)


class Blocks(NamedTuple):
    """Tiles and Triton launch options of one kernel: block_q query rows by block_k keys per step.

    In the forward and dQ kernels a program owns block_q queries and steps over keys block_k at a time; in the
    dK/dV kernel it owns block_k keys and steps over queries block_q at a time. Each block is clamped to the
    (padded) length, at least 16, and must be a power of two >= 16. num_warps, num_stages:
    `jax.experimental.pallas.triton.CompilerParams` (warps per program, software-pipelining depth)."""

    block_q: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


class Config(NamedTuple):
    """The blocks of the forward, dQ and dK/dV kernels (the d bias kernel uses dQ's)."""

    forward: Blocks
    dq: Blocks
    dkv: Blocks


# Defaults per head dim: the fastest forward and forward + backward of benchmarks/flash_attention.py's sweep on
# one H200 (T = 4096, causal, bf16, B·T = 32k, N·H = 2048; benchmarks/results/flash_attention_h200.json). 256 is
# not measured (smaller blocks for the registers). Head dims not listed take the next larger entry's.
DEFAULT_CONFIGS = {
    64: Config(Blocks(64, 64, 4, 3), Blocks(128, 32, 4, 3), Blocks(64, 64, 4, 3)),
    128: Config(Blocks(128, 64, 8, 3), Blocks(64, 32, 4, 3), Blocks(32, 64, 4, 3)),
    256: Config(Blocks(64, 32, 8, 2), Blocks(32, 32, 4, 2), Blocks(32, 32, 4, 2)),
}


def default_config(head_dim: int) -> Config:
    """The Config for `head_dim`: that of the smallest listed head dim >= it (DEFAULT_CONFIGS)."""
    return DEFAULT_CONFIGS[min(h for h in DEFAULT_CONFIGS if h >= head_dim)]


class Layout(NamedTuple):
    """A static block-sparse layout: `blocks` (T/b, S/b) bool (True = compute), `block_size` b. Hashable."""

    blocks: bytes
    shape: tuple[int, int]
    block_size: int

    @classmethod
    def of(cls, layout, block_size: int) -> "Layout":
        layout = np.asarray(layout, bool)
        return cls(np.packbits(layout).tobytes(), layout.shape, int(block_size))

    def array(self) -> np.ndarray:
        count = self.shape[0] * self.shape[1]
        return np.unpackbits(np.frombuffer(self.blocks, np.uint8), count=count).astype(bool).reshape(self.shape)


def supports(query, key, value, *, scale=None, logit_soft_cap=None, layout=None, layout_block_size=None) -> str | None:
    """None if the kernels compute this attention, else the reason they cannot.

    query (B, T, N, H), key and value (B, S, K, H), arrays or ShapeDtypeStructs; scale and logit_soft_cap must be
    concrete numbers (they are compiled into the kernels); a layout needs T and S to be multiples of its block.
    """
    if not query.dtype == key.dtype == value.dtype or query.dtype not in DTYPES:
        return f"dtypes: query, key, value must share one of bfloat16/float16/float32, got {query.dtype}"
    head_dim = query.shape[-1]
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        return f"head_dim={head_dim} is not a power of two in [16, 256]"
    if min(query.shape[1], key.shape[1]) < 1:
        return "an empty sequence"
    if max(math.prod(query.shape), math.prod(key.shape)) >= 2 ** 31:
        return "an operand of 2^31 or more elements (the kernels index with 32-bit offsets)"
    for name, x in (("scale", scale), ("logit_soft_cap", logit_soft_cap)):
        if x is not None and _concrete_float(x) is None:
            return f"{name} is traced (the kernels compile it in as a constant)"
    if layout is not None:
        b = layout_block_size
        if query.shape[1] % b or key.shape[1] % b:
            return f"T={query.shape[1]} and S={key.shape[1]} must be multiples of the layout's block {b}"
    return None


def _concrete_float(x) -> float | None:
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer) and np.ndim(x) == 0:
        return float(x)
    return None


# --------------------------------------------------------------------------- static description


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels are compiled for (hashable: the custom_vjp's non-differentiable argument)."""

    batch: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_len: int  # T, before padding
    kv_len: int  # S, before padding
    t_pad: int
    s_pad: int
    scale: float
    band: tuple | None  # (lo, hi): key j may be seen by query i only if lo <= j - i <= hi (None = unbounded)
    soft_cap: float | None
    bias_shape: tuple | None  # the padded bias operand's shape, each dim 1 or full
    mask_shape: tuple | None  # likewise for the int8 mask operand
    segments: bool
    alibi: bool
    layout: bool
    config: Config  # clamped
    precision: object
    interpret: bool

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


# --------------------------------------------------------------------------- block ranges


def _cdiv(x, d, div):
    return div(x + d - 1, d)


def block_ranges(block, size, length, other_size, num_other, other_len, band, mask_other_padding, *,
                 maximum=jnp.maximum, minimum=jnp.minimum, div=lax.div):
    """The blocks along the other axis that block `block` (of `size` positions, `length` real ones in total)
    must visit, and the ones among them needing no position mask.

    band: None or (lo, hi) bounds (None = unbounded) on d = other position - own position (for query rows,
    d = j - i; transposed for key rows). Blocks of the other axis have `other_size` positions, `num_other` of
    them, `other_len` real positions in total. mask_other_padding: the other axis's padding must be masked
    (padded keys in the forward and dQ kernels; padded queries contribute nothing to dK, dV).
    Returns (first, stop, full_first, full_stop): visit [first, stop); the blocks in
    [full_first, full_stop) ⊆ [first, stop) hold only allowed pairs (for every own position, real or padded)
    and no masked padding. Works on traced int32 scalars (kernels; the default ops) and numpy arrays
    (maximum=np.maximum, minimum=np.minimum, div=np.floor_divide) alike; all divisions are of non-negatives.
    """
    lo, hi = band if band is not None else (None, None)
    start = block * size
    last = minimum(start + size, length) - 1  # the last real own position (< start for an all-padding block)
    # Allowed real other positions: [lo_pos, hi_pos] (empty if hi_pos < lo_pos, e.g. for an all-padding block).
    lo_pos = 0 if lo is None else maximum(start + lo, 0)
    hi_pos = other_len - 1 if hi is None else minimum(last + hi, other_len - 1)
    hi_pos = minimum(hi_pos, (last >= start) * (other_len + 1) - 2)  # -2 for an all-padding own block
    first = div(lo_pos, other_size)
    stop = first + (hi_pos >= lo_pos) * (div(maximum(hi_pos, 0), other_size) + 1 - first)
    full_first = 0 if lo is None else _cdiv(maximum(lo + start + size - 1, 0), other_size, div)
    full_stop = num_other if hi is None else div(hi + start + 1, other_size)
    if mask_other_padding:
        full_stop = minimum(full_stop, other_len // other_size)
    return _clip(first, stop, full_first, full_stop, maximum, minimum)


def _clip(first, stop, full_first, full_stop, maximum=jnp.maximum, minimum=jnp.minimum):
    """(first, stop, full_first, full_stop) with first <= full_first <= full_stop <= stop (stop raised to first
    when the range is empty)."""
    stop = maximum(stop, first)
    full_first = minimum(maximum(full_first, first), stop)
    return first, stop, full_first, minimum(maximum(full_stop, full_first), stop)


# --------------------------------------------------------------------------- scores


def _dot(a, b, contract, precision):
    """a · b contracting a's axis contract[0] with b's contract[1], float32 accumulation."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _tile(ref, shape, b, n, q_start, k_start, bq, bk):
    """The (bq|1, bk|1) tile of a (b, n, t, s) bias/mask operand (each dim 1 or full) for queries
    q_start.. and keys k_start.. of batch b, head n."""
    bb, bn, bt, bs = shape
    rows = pl.ds(pl.multiple_of(q_start, bq), bq) if bt > 1 else pl.ds(0, 1)
    cols = pl.ds(pl.multiple_of(k_start, bk), bk) if bs > 1 else pl.ds(0, 1)
    return ref[b if bb > 1 else 0, n if bn > 1 else 0, rows, cols]


def _scores(st, r, q, k, b, n, q_start, k_start, bq, bk, masked, transposed=False):
    """S_ij in base 2 ((bq, bk) float32: log2 e · (capped scale·q·kᵀ + bias + ALiBi), masked pairs
    MASKED_SCORE) and tanh(scale·q·kᵀ / cap) (None without a soft cap). `masked`: apply the position mask
    (band, padded keys); masks from data (segment ids, the mask operand) apply always. `transposed`: both as
    (bk, bq) (keys as rows: the dK/dV kernel's products then need no transposes)."""
    qk = _dot(k, q, (1, 1), st.precision) if transposed else _dot(q, k, (1, 1), st.precision)
    shape, q_axis = ((bk, bq), 1) if transposed else ((bq, bk), 0)
    orient = (lambda x: x.T) if transposed else (lambda x: x)
    positions = lambda: (q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis),
                         k_start + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis))
    t = None
    if st.soft_cap is None and st.bias_shape is None and not st.alibi:
        s = qk * (st.scale * LOG2E)
    else:
        if st.soft_cap is not None:
            t = jnp.tanh(qk * (st.scale / st.soft_cap))
            s = t * st.soft_cap
        else:
            s = qk * st.scale
        if st.bias_shape is not None:
            s = s + orient(_tile(r["bias"], st.bias_shape, b, n, q_start, k_start, bq, bk).astype(jnp.float32))
        if st.alibi:
            q_pos, k_pos = positions()
            s = s - r["slopes"][n] * jnp.abs((q_pos - k_pos).astype(jnp.float32))
        s = s * LOG2E
    allowed = None
    if masked:
        q_pos, k_pos = positions()
        conditions = []
        lo, hi = st.band if st.band is not None else (None, None)
        if lo is not None:
            conditions.append(k_pos - q_pos >= lo)
        if hi is not None:
            conditions.append(k_pos - q_pos <= hi)
        if st.kv_len % bk:
            conditions.append(k_pos < st.kv_len)
        allowed = functools.reduce(jnp.logical_and, conditions) if conditions else None
    if st.segments:
        q_ids = r["seg_q"][b, pl.ds(pl.multiple_of(q_start, bq), bq)]
        k_ids = r["seg_k"][b, pl.ds(pl.multiple_of(k_start, bk), bk)]
        same = (k_ids[:, None] == q_ids[None, :]) if transposed else (q_ids[:, None] == k_ids[None, :])
        allowed = same if allowed is None else allowed & same
    if st.mask_shape is not None:
        given = orient(_tile(r["mask"], st.mask_shape, b, n, q_start, k_start, bq, bk)) != 0
        allowed = given if allowed is None else allowed & given
    if allowed is not None:
        s = jnp.where(allowed, s, MASKED_SCORE)
    return s, t


def _visit(st, r, body, carry, *, block, b, rows_are_queries, blocks, table_name, seg_name):
    """carry <- body(other_block, carry, masked) over the blocks that `block` must visit (see `block_ranges`
    and the module docstring): a static table's entries with a layout, else the band's (and segments') range,
    the position-masked blocks at its two ends."""
    loop = lambda lo, hi, masked, c, index=None: lax.fori_loop(
        lo, hi, lambda x, c: body(x if index is None else index(x), c, masked), c)
    if st.layout:
        table, counts = r[table_name], r[table_name + "_counts"]
        n_full, n_all = counts[block, 0], counts[block, 1]
        index = lambda c: table[block, c]
        carry = loop(0, n_full, False, carry, index)
        return loop(n_full, n_all, True, carry, index)
    bq, bk = blocks.block_q, blocks.block_k
    if rows_are_queries:
        args = (block, bq, st.q_len, bk, st.s_pad // bk, st.kv_len, st.band, True)
    else:
        band = None if st.band is None else tuple(None if x is None else -x for x in st.band[::-1])
        args = (block, bk, st.kv_len, bq, st.t_pad // bq, st.q_len, band, False)
    first, stop, full_first, full_stop = block_ranges(*args)
    if st.segments:
        first = jnp.maximum(first, r[seg_name][b, block, 0])
        stop = jnp.minimum(stop, r[seg_name][b, block, 1])
        first, stop, full_first, full_stop = _clip(first, stop, full_first, full_stop)
    positional = st.band is not None or (rows_are_queries and st.kv_len % bk)
    if not positional:
        return loop(first, stop, False, carry)
    carry = loop(first, full_first, True, carry)
    carry = loop(full_first, full_stop, False, carry)
    return loop(full_stop, stop, True, carry)


# --------------------------------------------------------------------------- kernels


def _forward_kernel(*refs, st, names):
    r = dict(zip(names, refs))
    blocks = st.config.forward
    bq, bk = blocks.block_q, blocks.block_k
    i, b, n = _query_block(st, bq), pl.program_id(1), pl.program_id(2)
    q = r["q"][...]
    q_start = i * bq

    def body(j, carry, masked):
        o, m, l = carry
        k_start = pl.multiple_of(j * bk, bk)
        k = r["k"][pl.ds(k_start, bk), :]
        s, _ = _scores(st, r, q, k, b, n, q_start, k_start, bq, bk, masked)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        v = r["v"][pl.ds(k_start, bk), :]
        o = o * alpha[:, None] + _dot(p.astype(v.dtype), v, (1, 0), st.precision)
        return o, m_new, l * alpha + p.sum(axis=1)

    # m starts above every masked score and below every real one: masked pairs add exp2(MASKED - m) = 0 even
    # to rows that have seen no allowed key yet, whose l stays 0.
    init = (jnp.zeros((bq, st.head_dim), jnp.float32), jnp.full((bq,), MASKED_SCORE / 2, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    o, m, l = _visit(st, r, body, init, block=i, b=b, rows_are_queries=True, blocks=blocks, table_name="table_fwd",
                     seg_name="seg_range_fwd")
    empty = l == 0
    r["o"][...] = (o / jnp.where(empty, 1.0, l)[:, None]).astype(r["o"].dtype)
    r["lse"][...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _query_block(st, bq):
    """The query block of this forward / dQ program: with a causal band the last (longest) rows go first."""
    pid = pl.program_id(0)
    return (st.t_pad // bq - 1 - pid) if _heavy_last(st) else pid


def _heavy_last(st) -> bool:
    return st.band is not None and st.band[1] is not None and st.band[0] is None and not st.layout


def _ds(st, r, q, k, v, do, lse, delta, b, n, q_start, k_start, bq, bk, masked, transposed=False):
    """(P, dS, dS_qk) of a block in float32 ((bq, bk), or (bk, bq) when `transposed`): P = exp(S - L),
    dS = P ∘ (dO Vᵀ - D) w.r.t. the scores after the soft cap (the bias gradient), and dS_qk w.r.t.
    scale·q·kᵀ."""
    s, t = _scores(st, r, q, k, b, n, q_start, k_start, bq, bk, masked, transposed)
    if transposed:
        p = jnp.exp2(s - lse[None, :])
        ds = p * (_dot(v, do, (1, 1), st.precision) - delta[None, :])
    else:
        p = jnp.exp2(s - lse[:, None])
        ds = p * (_dot(do, v, (1, 1), st.precision) - delta[:, None])
    ds_qk = ds if t is None else ds * (1.0 - t * t)
    return p, ds, ds_qk


def _dq_kernel(*refs, st, names):
    r = dict(zip(names, refs))
    blocks = st.config.dq
    bq, bk = blocks.block_q, blocks.block_k
    i, b, n = _query_block(st, bq), pl.program_id(1), pl.program_id(2)
    q, do = r["q"][...], r["do"][...]
    lse, delta = r["lse"][...], r["delta"][...]
    q_start = i * bq

    def body(j, dq, masked):
        k_start = pl.multiple_of(j * bk, bk)
        k, v = r["k"][pl.ds(k_start, bk), :], r["v"][pl.ds(k_start, bk), :]
        _, _, ds_qk = _ds(st, r, q, k, v, do, lse, delta, b, n, q_start, k_start, bq, bk, masked)
        return dq + _dot(ds_qk.astype(k.dtype), k, (1, 0), st.precision)

    dq = _visit(st, r, body, jnp.zeros((bq, st.head_dim), jnp.float32), block=i, b=b, rows_are_queries=True,
                blocks=blocks, table_name="table_dq", seg_name="seg_range_dq")
    r["dq"][...] = (dq * st.scale).astype(r["dq"].dtype)


def _dkv_kernel(*refs, st, names):
    r = dict(zip(names, refs))
    blocks = st.config.dkv
    bq, bk = blocks.block_q, blocks.block_k
    j, b, kh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k, v = r["k"][...], r["v"][...]
    k_start = j * bk

    def head(g, carry):
        n = kh * st.group + g

        def body(i, carry, masked):
            dk, dv = carry
            q_start = pl.multiple_of(i * bq, bq)
            rows = pl.ds(q_start, bq)
            q, do = r["q"][rows, g, :], r["do"][rows, g, :]
            lse, delta = r["lse"][g, rows], r["delta"][g, rows]
            p, _, ds_qk = _ds(st, r, q, k, v, do, lse, delta, b, n, q_start, k_start, bq, bk, masked, True)
            dv = dv + _dot(p.astype(do.dtype), do, (1, 0), st.precision)  # Pᵀ dO, P held transposed
            dk = dk + _dot(ds_qk.astype(q.dtype), q, (1, 0), st.precision)
            return dk, dv

        return _visit(st, r, body, carry, block=j, b=b, rows_are_queries=False, blocks=blocks,
                      table_name="table_dkv", seg_name="seg_range_dkv")

    zeros = jnp.zeros((bk, st.head_dim), jnp.float32)
    dk, dv = head(0, (zeros, zeros)) if st.group == 1 else lax.fori_loop(0, st.group, head, (zeros, zeros))
    r["dk"][...] = (dk * st.scale).astype(r["dk"].dtype)
    r["dv"][...] = dv.astype(r["dv"].dtype)


def _dbias_kernel(*refs, st, names):
    """One (query block | all, key block | all) tile of d bias per program and key step, summed over the
    batches, heads, query blocks and key blocks the bias is broadcast over. Visits every block (no skipping):
    a bias is O(T·S) already."""
    r = dict(zip(names, refs))
    blocks = st.config.dq
    bq, bk = blocks.block_q, blocks.block_k
    bb, bn, bt, bs = st.bias_shape
    ti, tb, tn = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_q, num_k = st.t_pad // bq, st.s_pad // bk
    tile_shape = (bq if bt > 1 else 1, bk if bs > 1 else 1)

    def loop(count, fixed, fn, acc):
        """fn over range(count) where the bias is broadcast along that axis, else at `fixed` alone."""
        return lax.fori_loop(0, count, fn, acc) if fixed is None else fn(fixed, acc)

    def key_tile(tj, carry):
        def contribution(b, n, i, j, acc):
            q_start, k_start = pl.multiple_of(i * bq, bq), pl.multiple_of(j * bk, bk)
            rows, cols, kv_head = pl.ds(q_start, bq), pl.ds(k_start, bk), n // st.group
            q, do = r["q"][b, rows, n, :], r["do"][b, rows, n, :]
            k, v = r["k"][b, cols, kv_head, :], r["v"][b, cols, kv_head, :]
            lse, delta = r["lse"][b, n, rows], r["delta"][b, n, rows]
            _, ds, _ = _ds(st, r, q, k, v, do, lse, delta, b, n, q_start, k_start, bq, bk, True)
            if bt == 1:
                ds = ds.sum(axis=0, keepdims=True)
            if bs == 1:
                ds = ds.sum(axis=1, keepdims=True)
            return acc + ds

        def batch(b, acc):
            def head(n, acc):
                def query_block(i, acc):
                    return loop(num_k, tj if bs > 1 else None, lambda j, acc: contribution(b, n, i, j, acc), acc)
                return loop(num_q, ti if bt > 1 else None, query_block, acc)
            return loop(st.num_heads, tn if bn > 1 else None, head, acc)

        acc = loop(st.batch, tb if bb > 1 else None, batch, jnp.zeros(tile_shape, jnp.float32))
        rows = pl.ds(pl.multiple_of(ti * bq, bq), bq) if bt > 1 else pl.ds(0, 1)
        cols = pl.ds(pl.multiple_of(tj * bk, bk), bk) if bs > 1 else pl.ds(0, 1)
        r["dbias"][tb, tn, rows, cols] = acc.astype(r["dbias"].dtype)
        return carry

    lax.fori_loop(0, num_k if bs > 1 else 1, key_tile, 0)


# --------------------------------------------------------------------------- launches


def _params(blocks):
    return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _extras(st, arrays, aux_names):
    """(names, operands, specs) of the optional operands a kernel reads (whole arrays)."""
    names, operands = [], []
    for name in ("bias", "mask", "seg_q", "seg_k", "slopes", *aux_names):
        if arrays.get(name) is not None:
            names.append(name)
            operands.append(arrays[name])
    return names, operands, [pl.no_block_spec] * len(operands)


def _forward(st, q, k, v, arrays):
    """(O (B, T', N, H) in q's dtype, L (B, N, T') float32 in base 2)."""
    blocks = st.config.forward
    bq, H = blocks.block_q, st.head_dim
    num_q = st.t_pad // bq
    heavy_last = _heavy_last(st)
    q_index = lambda i, b, n: (b, num_q - 1 - i if heavy_last else i, n, 0)
    kv_index = lambda i, b, n: (b, 0, n // st.group, 0)
    names, extra, extra_specs = _extras(st, arrays, ("table_fwd", "table_fwd_counts", "seg_range_fwd"))
    in_specs = [pl.BlockSpec((None, bq, None, H), q_index), pl.BlockSpec((None, st.s_pad, None, H), kv_index),
                pl.BlockSpec((None, st.s_pad, None, H), kv_index), *extra_specs]
    lse_index = lambda i, b, n: (b, n, num_q - 1 - i if heavy_last else i)
    names = ["q", "k", "v", *names, "o", "lse"]
    return pl.pallas_call(
        functools.partial(_forward_kernel, st=st, names=names),
        grid=(num_q, st.batch, st.num_heads), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, H), q_index), pl.BlockSpec((None, None, bq), lse_index)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((st.batch, st.num_heads, st.t_pad), jnp.float32)],
        interpret=st.interpret, name="flash_attention_forward", compiler_params=_params(blocks),
    )(q, k, v, *extra)


def _dq(st, q, k, v, do, lse, delta, arrays):
    blocks = st.config.dq
    bq, H = blocks.block_q, st.head_dim
    num_q = st.t_pad // bq
    order = (lambda i: num_q - 1 - i) if _heavy_last(st) else (lambda i: i)
    q_spec = pl.BlockSpec((None, bq, None, H), lambda i, b, n: (b, order(i), n, 0))
    kv_spec = pl.BlockSpec((None, st.s_pad, None, H), lambda i, b, n: (b, 0, n // st.group, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, order(i)))
    names, extra, extra_specs = _extras(st, arrays, ("table_dq", "table_dq_counts", "seg_range_dq"))
    names = ["q", "k", "v", "do", "lse", "delta", *names, "dq"]
    return pl.pallas_call(
        functools.partial(_dq_kernel, st=st, names=names),
        grid=(st.t_pad // bq, st.batch, st.num_heads),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *extra_specs], out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=st.interpret, name="flash_attention_dq", compiler_params=_params(blocks),
    )(q, k, v, do, lse, delta, *extra)


def _dkv(st, q, k, v, do, lse, delta, arrays):
    blocks = st.config.dkv
    bk, H, G = blocks.block_k, st.head_dim, st.group
    kv_spec = pl.BlockSpec((None, bk, None, H), lambda j, b, kh: (b, j, kh, 0))
    q_spec = pl.BlockSpec((None, st.t_pad, G, H), lambda j, b, kh: (b, 0, kh, 0))
    row_spec = pl.BlockSpec((None, G, st.t_pad), lambda j, b, kh: (b, kh, 0))
    names, extra, extra_specs = _extras(st, arrays, ("table_dkv", "table_dkv_counts", "seg_range_dkv"))
    names = ["q", "k", "v", "do", "lse", "delta", *names, "dk", "dv"]
    return pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, names=names),
        grid=(st.s_pad // bk, st.batch, st.num_kv_heads),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *extra_specs], out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=st.interpret, name="flash_attention_dkv", compiler_params=_params(blocks),
    )(q, k, v, do, lse, delta, *extra)


def _dbias(st, q, k, v, do, lse, delta, arrays, bias_dtype):
    blocks = st.config.dq
    bb, bn, bt, bs = st.bias_shape
    names, extra, extra_specs = _extras(st, arrays, ())
    names = ["q", "k", "v", "do", "lse", "delta", *names, "dbias"]
    return pl.pallas_call(
        functools.partial(_dbias_kernel, st=st, names=names),
        grid=(st.t_pad // blocks.block_q if bt > 1 else 1, bb, bn),
        in_specs=[pl.no_block_spec] * 6 + extra_specs, out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct(st.bias_shape, bias_dtype),
        interpret=st.interpret, name="flash_attention_dbias", compiler_params=_params(blocks),
    )(q, k, v, do, lse, delta, *extra)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st, q, k, v, bias, arrays):
    return _forward(st, q, k, v, dict(arrays, bias=bias))[0]


def _attention_fwd(st, q, k, v, bias, arrays):
    o, lse = _forward(st, q, k, v, dict(arrays, bias=bias))
    return o, (q, k, v, bias, arrays, o, lse)


def _attention_bwd(st, residuals, d_out):
    q, k, v, bias, arrays, o, lse = residuals
    arrays = dict(arrays, bias=bias)
    # D_i = rowsum(dO_i ∘ O_i), (B, N, T') float32
    delta = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32), o.astype(jnp.float32))
    dq = _dq(st, q, k, v, d_out, lse, delta, arrays)
    dk, dv = _dkv(st, q, k, v, d_out, lse, delta, arrays)
    d_bias = None if bias is None else _dbias(st, q, k, v, d_out, lse, delta, arrays, bias.dtype)
    return dq, dk, dv, d_bias, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# --------------------------------------------------------------------------- host-side preparation


def _clamp(blocks: Blocks, t_len: int, s_len: int) -> Blocks:
    fit = lambda block, length: min(block, max(16, pl.next_power_of_2(length)))
    return blocks._replace(block_q=fit(blocks.block_q, t_len), block_k=fit(blocks.block_k, s_len))


def _check_blocks(config: Config) -> None:
    for name, blocks in zip(Config._fields, config):
        for field in ("block_q", "block_k"):
            size = getattr(blocks, field)
            if not isinstance(size, int) or size < 16 or size & (size - 1):
                raise ValueError(f"{name}.{field} must be a power of two >= 16, got {size!r}")


def _round_up(x, m):
    return -(-x // m) * m


def _segment_ranges(q_ids, kv_ids, rows, cols, rows_are_queries):
    """(B, num_row_blocks, 2) int32 [first, stop) of the column blocks whose id range meets the row block's
    (rows, cols: block sizes along the padded queries and keys; transposed for the dK/dV kernel)."""
    def extent(ids, size):
        blocks = ids.reshape(ids.shape[0], -1, size)
        return blocks.min(axis=2), blocks.max(axis=2)

    (q_min, q_max), (k_min, k_max) = extent(q_ids, rows), extent(kv_ids, cols)
    if not rows_are_queries:
        (q_min, q_max), (k_min, k_max) = (k_min, k_max), (q_min, q_max)
    meets = (k_max[:, None, :] >= q_min[:, :, None]) & (k_min[:, None, :] <= q_max[:, :, None])
    num = meets.shape[2]
    first = jnp.argmax(meets, axis=2)
    stop = num - jnp.argmax(meets[:, :, ::-1], axis=2)
    any_ = meets.any(axis=2)
    return jnp.stack([jnp.where(any_, first, 0), jnp.where(any_, stop, 0)], axis=2).astype(jnp.int32)


def _layout_blocks(layout: np.ndarray, lb: int, t_len, s_len, t_pad, s_pad, bq, bk) -> np.ndarray:
    """(t_pad/bq, s_pad/bk) bool: the kernel blocks that meet a True block of `layout` (blocks of lb)."""
    prefix = np.zeros((layout.shape[0] + 1, layout.shape[1] + 1), np.int64)
    prefix[1:, 1:] = layout.astype(np.int64).cumsum(0).cumsum(1)

    def spans(size, pad, length):
        starts = np.arange(0, pad, size)
        lo = np.minimum(starts, length) // lb
        hi = -(-np.minimum(starts + size, length) // lb)
        return lo, hi

    (r0, r1), (c0, c1) = spans(bq, t_pad, t_len), spans(bk, s_pad, s_len)
    count = (prefix[r1[:, None], c1[None, :]] - prefix[r0[:, None], c1[None, :]]
             - prefix[r1[:, None], c0[None, :]] + prefix[r0[:, None], c0[None, :]])
    return count > 0


def _band_matrices(st, blocks, rows_are_queries):
    """(needed, full) bool (rows, cols) of the band (numpy), as `_visit` computes them for one row block."""
    bq, bk = blocks.block_q, blocks.block_k
    if rows_are_queries:
        own, length, other, num_other, other_len, band, pad = bq, st.q_len, bk, st.s_pad // bk, st.kv_len, st.band, True
        num_own = st.t_pad // bq
    else:
        band = None if st.band is None else tuple(None if x is None else -x for x in st.band[::-1])
        own, length, other, num_other, other_len, pad = bk, st.kv_len, bq, st.t_pad // bq, st.q_len, False
        num_own = st.s_pad // bk
    block = np.arange(num_own)
    first, stop, full_first, full_stop = (
        np.broadcast_to(x, block.shape) for x in
        block_ranges(block, own, length, other, num_other, other_len, band, pad,
                     maximum=np.maximum, minimum=np.minimum, div=np.floor_divide))
    cols = np.arange(num_other)[None, :]
    needed = (cols >= first[:, None]) & (cols < stop[:, None])
    full = (cols >= full_first[:, None]) & (cols < full_stop[:, None])
    positional = st.band is not None or (pad and st.kv_len % bk)
    return needed, full if positional else needed


def _table(needed: np.ndarray, full: np.ndarray):
    """Per row, the columns to visit, position-mask-free ones first: (table (rows, m) int32, counts (rows, 2)
    int32 = (number unmasked, number in all))."""
    order = np.argsort(np.where(needed, np.where(full, 0, 1), 2), axis=1, kind="stable")
    counts = np.stack([(needed & full).sum(1), needed.sum(1)], axis=1)
    width = max(1, int(counts[:, 1].max(initial=0)))
    return jnp.asarray(order[:, :width], jnp.int32), jnp.asarray(counts, jnp.int32)


def _element_layout_mask(layout: np.ndarray, lb: int):
    """(1, 1, T, S) int8 on the device from the (T/lb, S/lb) layout (for kernel blocks that straddle its
    blocks)."""
    blocks = jnp.asarray(layout, jnp.int8)
    return jnp.repeat(jnp.repeat(blocks, lb, axis=0), lb, axis=1)[None, None]


def _pad_axis(x, axis, size, mode="constant"):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, mode=mode) if size > x.shape[axis] else x


def _pad_scores_operand(x, t_pad, s_pad):
    """A (b, n, t, s) bias or mask padded with zeros along its full (not broadcast) t and s."""
    if x.shape[2] > 1:
        x = _pad_axis(x, 2, t_pad)
    return _pad_axis(x, 3, s_pad) if x.shape[3] > 1 else x


def flash_attention(query, key, value, bias=None, mask=None, segment_ids=None, *, scale: float, is_causal=False,
                    local_window=None, alibi_slopes=None, logit_soft_cap=None, layout=None, layout_block_size=None,
                    config: Config | None = None, interpret: bool | None = None, return_lse: bool = False):
    """softmax(scale · Q Kᵀ (soft-capped) + bias + ALiBi, masked) V by the kernels above, on checked inputs.

    Args (normalised as `jaxmodels.ops.attention.dot_product_attention` normalises its own; call that, or
    `attention.pallas_attention`, for checked inputs):
      query (B, T, N, H); key, value (B, S, K, H); one dtype of DTYPES; H a power of two in [16, 256].
      bias: None or 4-D (b, n, t, s), each dim 1 or full (B, N, T, S); any float dtype; differentiable.
      mask: None or 4-D boolean like bias (True = attend).
      segment_ids: None or (query ids (B, T), key ids (B, S)), integers.
      scale: a concrete float. is_causal: key j <= query i. local_window: None or (left, right):
        i - left <= j <= i + right.
      alibi_slopes: None or (N,) float: adds -slope_n · |i - j| to head n's scores (not differentiated).
      logit_soft_cap: None or a concrete float c > 0: scores c · tanh(scale · q·k / c) before bias and ALiBi.
      layout, layout_block_size: None, or a concrete (T/b, S/b) bool block layout and its block b: only the
        kernel blocks meeting a True layout block are computed, and pairs outside True layout blocks are
        masked (so the result is that of mask & repeat(layout, b)). With kernel blocks that straddle layout
        blocks (b not a multiple of the clamped blocks), the element mask is built on the device: O(T·S).
      config: the kernels' blocks (`Config`; default `default_config(H)`).
      interpret: run the Pallas interpreter (default: on non-GPU backends).
      return_lse: also return the log-sum-exp (B, N, T) float32 (natural log; +inf for fully masked rows);
        that call is not differentiable.

    Returns:
      (B, T, N, H) in query's dtype (and the log-sum-exp with return_lse). Differentiable in query, key,
      value and bias (reverse mode).
    """
    batch, q_len, num_heads, head_dim = query.shape
    kv_len, num_kv_heads = key.shape[1], key.shape[2]
    config = default_config(head_dim) if config is None else Config(*(Blocks(*map(int, b)) for b in config))
    _check_blocks(config)
    config = Config(*(_clamp(b, q_len, kv_len) for b in config))
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    t_pad = _round_up(q_len, max(b.block_q for b in config))
    s_pad = _round_up(kv_len, max(b.block_k for b in config))
    band = None
    if local_window is not None:
        band = (-int(local_window[0]), int(local_window[1]))
    if is_causal:
        band = (None if band is None else band[0], 0 if band is None else min(band[1], 0))

    arrays = {}
    layout_array = None
    if layout is not None:
        layout_array = np.asarray(layout, bool)
        lb = int(layout_block_size)
        nested = all(lb % blocks.block_q == 0 and lb % blocks.block_k == 0 for blocks in config)
        if not nested:
            element = _element_layout_mask(layout_array, lb)
            mask = element if mask is None else (mask & (element != 0))
    if mask is not None:
        mask = _pad_scores_operand(mask.astype(jnp.int8), t_pad, s_pad)
        arrays["mask"] = mask
    if bias is not None:
        bias = _pad_scores_operand(bias, t_pad, s_pad)
    if alibi_slopes is not None:
        arrays["slopes"] = jnp.asarray(alibi_slopes, jnp.float32).reshape(num_heads)
    st = _Static(batch, num_heads, num_kv_heads, head_dim, q_len, kv_len, t_pad, s_pad, float(scale), band,
                 None if logit_soft_cap is None else float(logit_soft_cap),
                 None if bias is None else tuple(bias.shape), None if mask is None else tuple(mask.shape),
                 segment_ids is not None, alibi_slopes is not None, layout is not None, config,
                 _precision(query.dtype), bool(interpret))
    if segment_ids is not None:
        q_ids = _pad_axis(jnp.asarray(segment_ids[0], jnp.int32), 1, t_pad, mode="edge")
        kv_ids = _pad_axis(jnp.asarray(segment_ids[1], jnp.int32), 1, s_pad, mode="edge")
        arrays.update(seg_q=q_ids, seg_k=kv_ids)
        if layout is None:
            for name, blocks, rows in (("fwd", config.forward, True), ("dq", config.dq, True),
                                       ("dkv", config.dkv, False)):
                arrays["seg_range_" + name] = _segment_ranges(q_ids, kv_ids, blocks.block_q, blocks.block_k, rows)
    if layout is not None:
        for name, blocks, rows in (("fwd", config.forward, True), ("dq", config.dq, True), ("dkv", config.dkv, False)):
            meets = _layout_blocks(layout_array, int(layout_block_size), q_len, kv_len, t_pad, s_pad,
                                   blocks.block_q, blocks.block_k)
            needed, full = _band_matrices(st, blocks, rows)
            if not rows:
                meets = meets.T
            arrays["table_" + name], arrays["table_" + name + "_counts"] = _table(needed & meets, full)

    q = _pad_axis(query, 1, t_pad)
    k, v = (_pad_axis(x, 1, s_pad) for x in (key, value))
    if return_lse:
        o, lse = _forward(st, q, k, v, dict(arrays, bias=bias))
        return o[:, :q_len], lse[:, :, :q_len] / LOG2E
    return _attention(st, q, k, v, bias, arrays)[:, :q_len]


def _precision(dtype):
    """The dot precision inside the kernels: for float32 inputs that of `jax.default_matmul_precision`
    (TF32 on the GPU unless it says "float32"/"highest"); bf16/f16 dots are exact products with float32 sums."""
    if jnp.dtype(dtype) != jnp.dtype(jnp.float32):
        return None
    setting = jax.config.jax_default_matmul_precision
    if setting in ("float32", "highest", "fastest_float32") or setting == lax.Precision.HIGHEST:
        return lax.Precision.HIGHEST
    return None
