"""Sparse attention patterns (Child et al. 2019, "Generating Long Sequences with Sparse Transformers")
and a block-sparse softmax attention that computes only the non-empty blocks.

Patterns, each as an element mask (T, T) and directly as a block layout (T/b, T/b) without
building the element mask (numpy bool, True = attend; query i is the row, key j the column):

  strided       (Child et al. §4, Fig. 3b): j within the previous `stride` positions of i, or
                (i - j) mod stride = 0. Causal in the paper (j <= i).
  fixed         (§4, Fig. 3c): j in the same block of length l as i, or j among the last c
                (`num_summary`) positions of its block ("summary" cells). Causal in the paper.
  local_global  Longformer (Beltagy et al. 2020) / BigBird (Zaheer et al. 2020) style: a band of
                blocks around the diagonal, plus global blocks whose queries see every key and whose
                keys every query sees. Non-causal by default.

`block_sparse_attention` takes a layout and an optional element mask refining it inside the blocks,
and equals `dot_product_attention(query, key, value, mask=mask & block_mask(layout))`; its implementations
(`IMPLEMENTATIONS`) are "gather" (key blocks gathered per query block, in jnp) and "pallas" (the Pallas
FlashAttention-2 kernels visiting the layout's blocks from a static table, `attention.pallas_attention`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.ops.attention import dot_product_attention, pallas_attention
from jaxmodels.ops.checks import as_scores_operand, check_qkv, non_negative_int, positive_int
from jaxmodels.ops.dispatch import backend_platform, check_implementation, fall_back
from jaxmodels.ops.kernels import flash_attention as pallas_kernels

IMPLEMENTATIONS = ("gather", "pallas")  # of `block_sparse_attention`

# ---------------------------------------------------------------- patterns as predicates of (i, j)

def _strided(i, j, *, stride, causal):
    d = i - j
    allowed = (np.abs(d) < stride) | (d % stride == 0)
    return allowed & (d >= 0) if causal else allowed


def _fixed(i, j, *, block, num_summary, causal):
    allowed = (i // block == j // block) | (j % block >= block - num_summary)
    return allowed & (j <= i) if causal else allowed


def _local_global(i, j, *, block, window_blocks, global_blocks, causal):
    bi, bj = i // block, j // block
    allowed = (np.abs(bi - bj) <= window_blocks) | (bi < global_blocks) | (bj < global_blocks)
    return allowed & (j <= i) if causal else allowed


def _pattern_mask(predicate, length):
    positions = np.arange(length)
    return predicate(positions[:, None], positions[None, :])


def _pattern_layout(predicate, length, block_size):
    """block_layout(_pattern_mask(predicate, length), block_size), one row of blocks at a time:
    O(block_size · length) memory instead of O(length²)."""
    _check_divisible(length, block_size)
    keys = np.arange(length)[None, :]
    return np.stack([predicate(np.arange(r, r + block_size)[:, None], keys)
                     .reshape(block_size, -1, block_size).any(axis=(0, 2)) for r in range(0, length, block_size)])


def _check_divisible(length, block_size):
    positive_int("length", length)
    positive_int("block_size", block_size)
    if length % block_size:
        raise ValueError(f"length {length} must be a multiple of block_size {block_size}; pad the sequence "
                         f"to {-(-length // block_size) * block_size} and mask the padding")


def _strided_predicate(length, stride, causal):
    positive_int("length", length)
    positive_int("stride", stride)
    return functools.partial(_strided, stride=stride, causal=causal)


def _fixed_predicate(length, block, num_summary, causal):
    positive_int("length", length)
    positive_int("block", block)
    if not 0 <= num_summary <= block:
        raise ValueError(f"num_summary must be in [0, block={block}], got {num_summary}")
    return functools.partial(_fixed, block=block, num_summary=num_summary, causal=causal)


def _local_global_predicate(length, block, window_blocks, global_blocks, causal):
    positive_int("length", length)
    positive_int("block", block)
    non_negative_int("window_blocks", window_blocks)
    non_negative_int("global_blocks", global_blocks)
    return functools.partial(_local_global, block=block, window_blocks=window_blocks,
                             global_blocks=global_blocks, causal=causal)


# ---------------------------------------------------------------- public masks and layouts

def strided_mask(length: int, stride: int, *, causal: bool = True) -> np.ndarray:
    """Strided pattern (Child et al. 2019, §4): A(1)_i = {t, ..., i}, t = max(0, i - l), and
    A(2)_i = {j : (i - j) mod l = 0}, l = `stride`; mask = A(1) ∪ A(2). Returns (length, length) bool.
    Without `causal`, the band is |i - j| < l on both sides and the strided columns too."""
    return _pattern_mask(_strided_predicate(length, stride, causal), length)


def fixed_mask(length: int, block: int, num_summary: int, *, causal: bool = True) -> np.ndarray:
    """Fixed pattern (Child et al. 2019, §4): A(1)_i = {j : floor(j/l) = floor(i/l)} and
    A(2)_i = {j : j mod l ∈ {l - c, ..., l - 1}}, l = `block`, c = `num_summary` (0-indexed form of the
    paper's {t, ..., l}, t = l - c); mask = A(1) ∪ A(2), and j <= i when causal. Returns (length, length) bool."""
    return _pattern_mask(_fixed_predicate(length, block, num_summary, causal), length)


def local_global_mask(length: int, block: int, *, window_blocks: int = 1, global_blocks: int = 1,
                      causal: bool = False) -> np.ndarray:
    """Local band + global blocks (Longformer, Beltagy et al. 2020; BigBird's ITC form, Zaheer et al. 2020):
    query i sees key j when their blocks (of `block` tokens) are at most `window_blocks` apart, or
    either lies in the first `global_blocks` blocks (global tokens attend and are attended by all);
    and j <= i when causal. Returns (length, length) bool."""
    return _pattern_mask(_local_global_predicate(length, block, window_blocks, global_blocks, causal), length)


def strided_layout(length: int, stride: int, block_size: int, *, causal: bool = True) -> np.ndarray:
    """block_layout(strided_mask(length, stride, causal=causal), block_size), without the (T, T) mask."""
    return _pattern_layout(_strided_predicate(length, stride, causal), length, block_size)


def fixed_layout(length: int, block: int, num_summary: int, block_size: int, *, causal: bool = True) -> np.ndarray:
    """block_layout(fixed_mask(length, block, num_summary, causal=causal), block_size), without the (T, T) mask."""
    return _pattern_layout(_fixed_predicate(length, block, num_summary, causal), length, block_size)


def local_global_layout(length: int, block: int, block_size: int, *, window_blocks: int = 1, global_blocks: int = 1,
                        causal: bool = False) -> np.ndarray:
    """block_layout(local_global_mask(...), block_size), without the (T, T) mask."""
    return _pattern_layout(_local_global_predicate(length, block, window_blocks, global_blocks, causal),
                           length, block_size)


def block_layout(mask, block_size: int) -> np.ndarray:
    """(T, S) boolean mask -> (T/b, S/b) bool layout: a block is non-empty if any of its entries is True.

    `mask` must be concrete (numpy or a non-traced jax array): layouts fix the shapes of
    `block_sparse_attention`. T and S must be multiples of b = `block_size`.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.bool_:
        raise ValueError(f"mask must be a 2-D boolean (T, S) array, got {mask.dtype} of shape {mask.shape}")
    for length in mask.shape:
        _check_divisible(length, block_size)
    t, s = mask.shape
    return mask.reshape(t // block_size, block_size, s // block_size, block_size).any(axis=(1, 3))


def layout_indices(layout) -> tuple[np.ndarray, np.ndarray]:
    """The non-empty key blocks of each query block, padded to the longest row.

    layout: (T/b, S/b) bool. Returns (indices, valid), both (T/b, m) with m = max(1, max row count):
    indices[r, :n_r] are the n_r non-empty key blocks of row r in increasing order, the rest 0;
    valid[r, c] = c < n_r.
    """
    layout = np.asarray(layout, bool)
    counts = layout.sum(axis=1)
    width = max(1, int(counts.max(initial=0)))
    valid = np.arange(width)[None, :] < counts[:, None]
    indices = np.zeros(valid.shape, np.int32)
    indices[valid] = np.nonzero(layout)[1]  # row-major: each row's columns in increasing order
    return indices, valid


# ---------------------------------------------------------------- computation

def block_sparse_attention(query, key, value, layout, *, block_size: int, mask=None, scale=None,
                           implementation=None) -> jax.Array:
    r"""softmax(Q Kᵀ · scale) V over the non-empty (query block, key block) pairs of `layout` only,
    the computation of Child et al. 2019's block-sparse kernels, in jnp.

    Query blocks are grouped by the number n of key blocks they attend, rounded up to a power of two
    (at most ceil(log2(S/b)) + 1 groups). For each group, the key/value blocks of each query block
    are gathered (rows with fewer blocks are padded to the group's largest n with masked blocks) and
    attention over them is `jaxmodels.ops.attention`'s reference implementation, vmapped over query
    blocks: exact softmax in float32 over the gathered keys. Memory and work are O(B · N · nnz · b²)
    with nnz the non-empty blocks (under 2 nnz with the padding), never O(T · S): grouping keeps a
    few dense rows (global tokens) from making every row as wide as theirs.

    Args:
      query: (B, T, N, H) float; key, value: (B, S, K, H), same dtype, N a multiple of K
        (grouped-query heads as in `dot_product_attention`).
      layout: concrete (T/b, S/b) bool, True = compute this block (e.g. `block_layout(mask, b)` or
        `strided_layout(...)`).
      block_size: b; T and S must be multiples of b (a ValueError says to pad otherwise: pad the
        sequence and mask the padding with `mask`).
      mask: optional boolean broadcastable to (B, N, T, S) as in `dot_product_attention`; refines the
        layout inside its blocks (strided and fixed patterns are not block-aligned). A numpy mask is
        gathered at trace time, so no (T, S) array enters the computation.
      scale: score multiplier, default 1/sqrt(H).
      implementation: None, "gather" (the computation above) or "pallas": `attention.pallas_attention` with
        this layout, whose kernels visit only the layout's blocks (a static table of (query block, key block)
        pairs) and apply `mask` inside them (the (T, S) mask is then read block by block from the device);
        interpreted off the GPU, and "gather" with a one-time warning where the kernels cannot run the case
        (`kernels.flash_attention.supports`). None: `select_block_sparse_implementation` ("pallas" on an NVIDIA
        GPU where the kernels run the case, else "gather").

    Returns:
      (B, T, N, H) in `query`'s dtype; equal to `dot_product_attention(query, key, value,
      mask=mask & repeat(layout, b))` with "reference" semantics: a query row with no allowed key
      (an empty layout row included) returns zeros.
    """
    check_implementation(implementation, IMPLEMENTATIONS)
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    check_qkv(query, key, value)
    batch, q_len, num_heads, head_dim = query.shape
    kv_len = key.shape[1]
    _check_divisible(q_len, block_size)
    _check_divisible(kv_len, block_size)
    layout = np.asarray(layout)
    if layout.dtype != np.bool_ or layout.shape != (q_len // block_size, kv_len // block_size):
        raise ValueError(f"layout must be a boolean (T/b, S/b) = {(q_len // block_size, kv_len // block_size)} "
                         f"array, got {layout.dtype} of shape {layout.shape}")
    if mask is not None:
        mask = mask if isinstance(mask, jax.Array) else np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must be boolean (True = attend), got dtype {mask.dtype}")
        mask = as_scores_operand(mask, (batch, num_heads, q_len, kv_len), "mask")
    scale = head_dim**-0.5 if scale is None else scale
    reason = pallas_kernels.supports(query, key, value, scale=scale, layout=layout, layout_block_size=block_size)
    if implementation is None:
        implementation = select_block_sparse_implementation(backend_platform(), pallas_runs=reason is None)
    if implementation == "pallas":
        if reason is None:
            return pallas_attention(query, key, value, mask=None if mask is None else jnp.asarray(mask), scale=scale,
                                    layout=layout, layout_block_size=block_size)
        fall_back("block_sparse_attention", "pallas", reason, "gather")

    num_q_blocks, num_kv_blocks = layout.shape
    q_blocks = query.reshape(batch, num_q_blocks, block_size, num_heads, head_dim)
    k_blocks, v_blocks = (x.reshape(batch, num_kv_blocks, block_size, *x.shape[2:]) for x in (key, value))
    def attend_block(q, k, v, m):  # a query block: q (B, b, N, H), gathered k, v (B, m·b, K, H), mask (., ., b, m·b)
        return dot_product_attention(q, k, v, mask=m, scale=scale, implementation="reference")

    attend = jax.vmap(attend_block, in_axes=1, out_axes=1)
    rows, outs = [], []
    for group in _row_groups(layout.sum(axis=1)):
        indices, valid = layout_indices(layout[group])  # (R, m)
        block_mask = np.repeat(valid, block_size, axis=1)[None, :, None, None]  # (1, R, 1, 1, m·b)
        if mask is not None:
            block_mask = block_mask & _gather_mask(mask, group, indices, block_size)
        k_rows, v_rows = (x[:, indices].reshape(batch, len(group), -1, *x.shape[3:]) for x in (k_blocks, v_blocks))
        outs.append(attend(q_blocks[:, group], k_rows, v_rows, block_mask))  # (B, R, b, N, H)
        rows.append(group)
    out = jnp.concatenate(outs, axis=1)[:, np.argsort(np.concatenate(rows))]
    return out.reshape(query.shape)


def select_block_sparse_implementation(platform: str, *, pallas_runs: bool) -> str:
    """`block_sparse_attention`'s implementation=None: "pallas" on an NVIDIA GPU (platform "cuda", see
    `dispatch.backend_platform`) where the kernels run the case (pallas_runs: `kernels.flash_attention.supports` is
    None), else "gather". Measured (one H200, bf16, forward + backward, T=16k, H=128, layouts at block 128;
    benchmarks/results/flash_attention_h200.json, "summary" rows of section "sparse"): the kernels 5.0-7.4x
    "gather" on the strided, fixed and local + global layouts. The case table: `attention.select_implementation`.
    """
    return "pallas" if platform == "cuda" and pallas_runs else "gather"


def _row_groups(counts) -> list[np.ndarray]:
    """Query-block indices grouped by ceil(log2(count)) (empty rows with the count-1 rows)."""
    buckets = np.ceil(np.log2(np.maximum(counts, 1))).astype(int)
    return [np.nonzero(buckets == b)[0] for b in np.unique(buckets)]


def _gather_mask(mask, rows, indices, block_size):
    """mask (b, n, T, S) -> (b, R, n, b_size, m·b_size): its entries for query blocks `rows` (R,) and
    their key blocks `indices` (R, m). numpy in, numpy out (at trace time); jax in, jax out."""
    b, n, q_len, kv_len = mask.shape
    r, m = indices.shape
    blocks = mask.reshape(b, n, q_len // block_size, block_size, kv_len // block_size, block_size)
    blocks = blocks[:, :, rows[:, None], :, indices, :]  # (R, m, b, n, bs, bs): advanced axes go first
    return blocks.transpose(2, 0, 3, 4, 1, 5).reshape(b, r, n, block_size, m * block_size)
