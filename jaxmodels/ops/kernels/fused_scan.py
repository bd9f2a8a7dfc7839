"""Mamba's selective scan as one Pallas kernel that keeps the state in registers: implementation "fused" of
`jaxmodels.ops.scan.selective_scan`, which checks the inputs and chooses the implementation.

The associative form of `selective_scan` builds Ā = exp(Δ·A) and B̄u = Δ·B·u for every position, a
(batch, L, d_inner, N) array, and scans it associatively: O(L·d·N) bytes through device memory, several
times. The recurrence only ever needs the current state, so a kernel that walks the sequence can hold
h (block_d, N) in registers and read each input and write each output once (Gu & Dao 2023, §3.3.2,
"hardware-aware algorithm": kernel fusion and no materialised state). This is that kernel:

  grid (batch, d_inner / block_d); program (b, j) owns channels j·block_d .. (j+1)·block_d of sequence b
  h ← 0
  for t in 0..L-1:                 Δ = softplus(delta_t + bias) (options as in selective_scan)
      h ← exp(Δ ⊗ A) ⊙ h + (Δ·u_t) ⊗ B_t
      y_t = h · C_t (+ D·u_t), then y_t *= silu(z_t)

Bytes moved: u, delta, z and y (batch·L·d each) plus B and C (batch·L·N, read once per program).
Each step is short, so the time goes in waiting for its loads: the loop runs `unroll` positions per
iteration and loads the next iteration's rows before computing this one's (`_walk`).
The gradient is a second kernel (`custom_vjp`): per program, a forward pass saves the state before
each chunk of ≤ 64 positions; then, chunk by chunk from the end, it recomputes the chunk's states into
a small scratch buffer and walks them backwards (Mamba's CUDA kernel recomputes the same way). dB and
dC come out as per-program partial sums, added up by XLA.

On CPU the kernel runs through the Pallas interpreter (`interpret=True`): slow, used by the tests.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton


def supports(u, B, C) -> str | None:
    """None if the fused kernel computes selective_scan for these inputs, else the reason it cannot.

    u (batch, L, d_inner) and B, C (batch, L, N) or grouped (batch, L, G, N), arrays or ShapeDtypeStructs."""
    if u.dtype == jnp.float64:
        return "float64 inputs (the kernel computes in float32)"
    if B.ndim != 3 or C.ndim != 3:
        return "grouped B/C (the kernel takes B, C of shape (batch, L, N))"
    d_inner, n_state = u.shape[-1], B.shape[-1]
    if d_inner % 8:
        return f"d_inner={d_inner} is not a multiple of 8"
    if n_state & (n_state - 1):
        return f"N={n_state} is not a power of two"
    return None


def _check_block_d(block_d: int, d_inner: int) -> None:
    if block_d < 1 or block_d & (block_d - 1) or d_inner % block_d:
        raise ValueError(f"block_d={block_d} must be a power of two dividing d_inner={d_inner}")


def _load(refs, t):
    """Row t of each (L, ·) ref, as stored: the loads only, so loads issued ahead of use do not wait."""
    return tuple(ref[t, :] for ref in refs)


def _convert(u_t, delta_t, bias, delta_softplus):
    """Loaded u, delta rows in float32: u (block_d,), Δ (block_d,) and dΔ/d(delta) (block_d,)."""
    pre = delta_t.astype(jnp.float32) + bias
    if delta_softplus:
        delta_t = jnp.where(pre > 20.0, pre, jnp.log1p(jnp.exp(jnp.minimum(pre, 20.0))))
        ddelta_dpre = jax.nn.sigmoid(pre)
    else:
        delta_t, ddelta_dpre = pre, jnp.ones_like(pre)
    return u_t.astype(jnp.float32), delta_t, ddelta_dpre


def _update(a, h, u_t, delta_t, b_t):
    """One step of the recurrence on float32 rows: h (block_d, N) ← exp(Δ ⊗ A) ⊙ h + (Δ·u) ⊗ B."""
    return jnp.exp(delta_t[:, None] * a) * h + (delta_t * u_t)[:, None] * b_t[None, :]


def _walk(start, count, refs, body, carry, *, unroll, reverse=False):
    """carry ← body(t, rows of `refs` at t, carry) for t = start .. start+count-1 (backwards if `reverse`).

    `unroll` positions per loop iteration, written out (Pallas on Triton has no scan unroll), whose rows
    were loaded during the previous iteration: the loads' latency overlaps the recurrence instead of
    adding to it. `start` may be traced; `count` is a Python int.
    """
    def position(k):
        return start + count - 1 - k if reverse else start + k

    whole = count // unroll * unroll

    def iteration(i, state):
        carry, loaded = state
        ahead = jnp.minimum((i + 1) * unroll, whole - unroll)  # the last iteration reloads its own rows
        upcoming = tuple(_load(refs, position(ahead + k)) for k in range(unroll))
        for k in range(unroll):
            carry = body(position(i * unroll + k), loaded[k], carry)
        return carry, upcoming

    if whole:
        first = tuple(_load(refs, position(k)) for k in range(unroll))
        carry, _ = lax.fori_loop(0, count // unroll, iteration, (carry, first))
    return lax.fori_loop(whole, count, lambda k, carry: body(position(k), _load(refs, position(k)), carry), carry)


def _kernel(u_ref, delta_ref, a_ref, b_ref, c_ref, d_ref, bias_ref, *rest, delta_softplus, has_z, length,
            unroll):
    if has_z:
        z_ref, y_ref, last_ref = rest
    else:
        (y_ref, last_ref), z_ref = rest, None
    a = a_ref[...].astype(jnp.float32)                       # (block_d, N)
    skip = d_ref[...].astype(jnp.float32)                    # (block_d,)
    bias = bias_ref[...].astype(jnp.float32)

    refs = (u_ref, delta_ref, b_ref, c_ref) + ((z_ref,) if has_z else ())

    def step(t, loaded, h):
        u_t, delta_t, _ = _convert(*loaded[:2], bias, delta_softplus)
        b_t, c_t = loaded[2].astype(jnp.float32), loaded[3].astype(jnp.float32)
        h = _update(a, h, u_t, delta_t, b_t)
        y_t = jnp.sum(h * c_t[None, :], axis=1) + skip * u_t
        if has_z:
            z_t = loaded[4].astype(jnp.float32)
            y_t = y_t * z_t * jax.nn.sigmoid(z_t)
        y_ref[t, :] = y_t.astype(y_ref.dtype)
        return h

    last_ref[...] = _walk(0, length, refs, step, jnp.zeros(a.shape, jnp.float32), unroll=unroll)


def _backward_kernel(u_ref, delta_ref, a_ref, b_ref, c_ref, d_ref, bias_ref, *rest, delta_softplus, has_z,
                     length, chunk, unroll, barrier):
    """Reverse-mode of `_kernel` for one program, never holding more than `chunk` states.

    1. Forward over the sequence, saving the state before each chunk (ckpt).
    2. Chunks last to first: recompute the chunk's states into `hist` from its checkpoint, then walk it
       backwards with S = dL/dh_t from the future (S ← dlast at the end):
         G = S + g_t ⊗ C_t (g = dy, times silu(z) when gated),  S ← G ⊙ Ā_t
         dB_t = Σ_c G x_t, dC_t = Σ_c g h_t, dx = G·B_t (x = Δu), dΔ = dx u + Σ_n G h_{t-1} Ā_t A,
         dA += G h_{t-1} Ā_t Δ, du = dx Δ + g D, dD += g u.
    dB, dC are this program's partial sums over its channels; dA, dD, dbias are per batch element.
    `barrier`: synchronise the program's threads after writing scratch that other threads may read back
    (on the GPU; the interpreter has no barrier and needs none).
    """
    if has_z:
        z_ref, dy_ref, dlast_ref, du_ref, ddelta_ref, dz_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref, \
            ckpt_ref, hist_ref = rest
    else:
        dy_ref, dlast_ref, du_ref, ddelta_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref, ckpt_ref, hist_ref = rest
        z_ref = dz_ref = None
    a = a_ref[...].astype(jnp.float32)
    skip = d_ref[...].astype(jnp.float32)
    bias = bias_ref[...].astype(jnp.float32)
    num_chunks = length // chunk
    walk = functools.partial(_walk, unroll=unroll)
    forward_refs = (u_ref, delta_ref, b_ref)
    backward_refs = (u_ref, delta_ref, b_ref, c_ref, dy_ref) + ((z_ref,) if has_z else ())

    def advance(t, loaded, h):
        u_t, delta_t, _ = _convert(*loaded[:2], bias, delta_softplus)
        return _update(a, h, u_t, delta_t, loaded[2].astype(jnp.float32))

    def save(k, h):
        ckpt_ref[k] = h
        return walk(k * chunk, chunk, forward_refs, advance, h)

    lax.fori_loop(0, num_chunks, save, jnp.zeros(a.shape, jnp.float32))
    if barrier:
        pl_triton.debug_barrier()

    def chunk_backward(i, carry):
        start = (num_chunks - 1 - i) * chunk
        h0 = ckpt_ref[num_chunks - 1 - i]

        def record(t, loaded, h):
            h = advance(t, loaded, h)
            hist_ref[t - start] = h
            return h

        if barrier:  # the previous chunk's backward walk has read all of hist
            pl_triton.debug_barrier()
        walk(start, chunk, forward_refs, record, h0)
        if barrier:  # hist is written before any thread reads it
            pl_triton.debug_barrier()

        def back(t, loaded, carry):
            s, da_acc, dd_acc, dbias_acc = carry
            u_t, delta_t, ddelta_dpre = _convert(*loaded[:2], bias, delta_softplus)
            b_t, c_t = loaded[2].astype(jnp.float32), loaded[3].astype(jnp.float32)
            h_t = hist_ref[t - start]
            h_prev = jnp.where(t > start, hist_ref[jnp.maximum(t - start - 1, 0)], h0)
            g = loaded[4].astype(jnp.float32)
            if has_z:
                z_t = loaded[5].astype(jnp.float32)
                sig = jax.nn.sigmoid(z_t)
                y_scan = jnp.sum(h_t * c_t[None, :], axis=1) + skip * u_t
                dz_ref[t, :] = g * y_scan * sig * (1.0 + z_t * (1.0 - sig))
                g = g * z_t * sig
            dc_ref[t, :] = jnp.sum(g[:, None] * h_t, axis=0)
            G = s + g[:, None] * c_t[None, :]
            db_ref[t, :] = jnp.sum(G * (delta_t * u_t)[:, None], axis=0)
            dx = jnp.sum(G * b_t[None, :], axis=1)
            a_t = jnp.exp(delta_t[:, None] * a)
            d_exponent = G * h_prev * a_t                                   # dL/d(Δ·A)
            dpre = (dx * u_t + jnp.sum(d_exponent * a, axis=1)) * ddelta_dpre
            du_ref[t, :] = dx * delta_t + g * skip
            ddelta_ref[t, :] = dpre
            return G * a_t, da_acc + d_exponent * delta_t[:, None], dd_acc + g * u_t, dbias_acc + dpre

        return walk(start, chunk, backward_refs, back, carry, reverse=True)

    zeros_d = jnp.zeros(skip.shape, jnp.float32)
    init = (dlast_ref[...].astype(jnp.float32), jnp.zeros(a.shape, jnp.float32), zeros_d, zeros_d)
    _, da, dd, dbias = lax.fori_loop(0, num_chunks, chunk_backward, init)
    da_ref[...] = da
    dd_ref[...] = dd
    dbias_ref[...] = dbias


@functools.partial(jax.jit, static_argnames=("delta_softplus", "interpret", "options"))
def _fused_forward(u, delta, A, B, C, D, z, delta_bias, *, delta_softplus, interpret, options):
    batch, length, d_inner = u.shape
    n_state = A.shape[1]
    block_d, num_warps, unroll = options
    grid = (batch, d_inner // block_d)
    seq = pl.BlockSpec((None, length, block_d), lambda b, j: (b, 0, j))
    state = pl.BlockSpec((None, length, n_state), lambda b, j: (b, 0, 0))
    channel = pl.BlockSpec((block_d,), lambda b, j: (j,))
    in_specs = [seq, seq, pl.BlockSpec((block_d, n_state), lambda b, j: (j, 0)), state, state, channel, channel]
    args = [u, delta, A, B, C, D, delta_bias]
    if z is not None:
        in_specs.append(seq)
        args.append(z)
    kernel = functools.partial(_kernel, delta_softplus=delta_softplus, has_z=z is not None, length=length,
                               unroll=unroll)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs,
        out_specs=[seq, pl.BlockSpec((None, block_d, n_state), lambda b, j: (b, j, 0))],
        out_shape=[jax.ShapeDtypeStruct(u.shape, u.dtype),
                   jax.ShapeDtypeStruct((batch, d_inner, n_state), jnp.float32)],
        interpret=interpret, name="fused_selective_scan",
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps),
    )(*args)


def _backward_chunk(length: int) -> int:
    """Positions per recomputed chunk of the backward kernel: the largest power of two <= 64 dividing L."""
    return next(c for c in (64, 32, 16, 8, 4, 2, 1) if length % c == 0)


@functools.partial(jax.jit, static_argnames=("delta_softplus", "interpret", "options"))
def _fused_backward(u, delta, A, B, C, D, z, delta_bias, dy, dlast, *, delta_softplus, interpret, options):
    batch, length, d_inner = u.shape
    n_state = A.shape[1]
    block_d, num_warps, unroll = options
    nblk, chunk = d_inner // block_d, _backward_chunk(length)
    grid = (batch, nblk)
    seq = pl.BlockSpec((None, length, block_d), lambda b, j: (b, 0, j))
    state = pl.BlockSpec((None, length, n_state), lambda b, j: (b, 0, 0))
    channel = pl.BlockSpec((block_d,), lambda b, j: (j,))
    per_state = pl.BlockSpec((None, block_d, n_state), lambda b, j: (b, j, 0))
    in_specs = [seq, seq, pl.BlockSpec((block_d, n_state), lambda b, j: (j, 0)), state, state, channel, channel]
    args = [u, delta, A, B, C, D, delta_bias]
    if z is not None:
        in_specs.append(seq)
        args.append(z)
    in_specs += [seq, per_state]
    args += [dy, dlast]
    f32 = jnp.float32
    partial_bc = pl.BlockSpec((None, None, length, n_state), lambda b, j: (b, j, 0, 0))
    per_channel = pl.BlockSpec((None, block_d), lambda b, j: (b, j))

    def stack(n):  # per-program scratch of n states
        return pl.BlockSpec((None, None, n, block_d, n_state), lambda b, j: (b, j, 0, 0, 0))

    out = [(seq, u.shape), (seq, u.shape)] + ([(seq, u.shape)] if z is not None else []) + [
        (partial_bc, (batch, nblk, length, n_state)), (partial_bc, (batch, nblk, length, n_state)),
        (per_state, (batch, d_inner, n_state)), (per_channel, (batch, d_inner)), (per_channel, (batch, d_inner)),
        (stack(length // chunk), (batch, nblk, length // chunk, block_d, n_state)),
        (stack(chunk), (batch, nblk, chunk, block_d, n_state))]
    kernel = functools.partial(_backward_kernel, delta_softplus=delta_softplus, has_z=z is not None, length=length,
                               chunk=chunk, unroll=unroll, barrier=not interpret)
    results = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=[spec for spec, _ in out],
        out_shape=[jax.ShapeDtypeStruct(shape, f32) for _, shape in out],
        interpret=interpret, name="fused_selective_scan_backward",
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps),
    )(*args)
    du, ddelta = results[0], results[1]
    dz = results[2] if z is not None else None
    db, dc, da, dd, dbias = results[3 if z is not None else 2:-2]
    return (du.astype(u.dtype), ddelta.astype(delta.dtype), da.sum(0).astype(A.dtype), db.sum(1).astype(B.dtype),
            dc.sum(1).astype(C.dtype), dd.sum(0).astype(D.dtype), None if z is None else dz.astype(z.dtype),
            dbias.sum(0).astype(delta_bias.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus, interpret, options):
    return _fused_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus=delta_softplus, interpret=interpret,
                          options=options)


def _fused_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, interpret, options):
    out = _fused_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus=delta_softplus, interpret=interpret,
                         options=options)
    return out, (u, delta, A, B, C, D, z, delta_bias)


def _fused_bwd(delta_softplus, interpret, options, residuals, cotangents):
    dy, dlast = cotangents
    return _fused_backward(*residuals, dy, dlast, delta_softplus=delta_softplus, interpret=interpret,
                           options=options)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, *, interpret=None, block_d=8, num_warps=1, unroll=4):
    """`selective_scan` (same arguments, same results) through the fused Pallas kernel.

    Args as `jaxmodels.ops.scan.selective_scan` with ungrouped B, C (batch, L, N); N a power of two and
    d_inner a multiple of 8. The shapes are those `selective_scan` checks before it calls this function
    (call it with implementation="fused" for checked inputs). `interpret`: run the Pallas interpreter
    (default: on non-GPU backends). `block_d`: channels per program (a power of two dividing d_inner; the
    default 8 with 1 warp is the fastest of benchmarks/ssm.py's fused_d*_w*_u* variants); `num_warps`: Triton
    warps per program; `unroll`: positions per loop iteration, whose inputs are loaded during the previous
    one (same result).

    Returns:
      y (batch, L, d_inner) in u's dtype; with `return_last_state`, (y, last_state (batch, d_inner, N) f32).

    Raises:
      ValueError naming the reason when the kernel does not cover the inputs (`supports`: float64, grouped
      B/C, d_inner not a multiple of 8, N not a power of two) or block_d does not tile d_inner.
    """
    u, delta, A, B, C = (jnp.asarray(x) for x in (u, delta, A, B, C))
    reason = supports(u, B, C)
    if reason:
        raise ValueError(f"fused_selective_scan does not cover these inputs: {reason}")
    d_inner = u.shape[-1]
    D = jnp.zeros((d_inner,), jnp.float32) if D is None else jnp.asarray(D, jnp.float32)
    delta_bias = jnp.zeros((d_inner,), jnp.float32) if delta_bias is None else jnp.asarray(delta_bias, jnp.float32)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    _check_block_d(block_d, d_inner)
    y, last = _fused(u, delta, A.astype(jnp.float32), B, C, D, z, delta_bias, bool(delta_softplus), interpret,
                     (int(block_d), int(num_warps), int(unroll)))
    return (y, last) if return_last_state else y
