"""First-order linear recurrences and Mamba's selective scan.

`linear_recurrence` computes h_t = a_t * h_{t-1} + b_t (h_{-1} = 0) along axis 1 of (batch, length, ...)
arrays with `jax.lax.associative_scan` (Blelloch 1990, "Prefix sums and their applications", §1.4):
the pairs (a_t, b_t) compose under the associative operator

  (a1, b1) ∘ (a2, b2) = (a1·a2, a2·b1 + b2),

so the whole recurrence is a prefix "sum" in O(log L) depth. That form materialises O(L) intermediate
pairs; `chunked_linear_recurrence` scans associatively inside chunks of c positions and carries h
across chunks with `lax.scan`, so the scan itself works on O(c) positions at a time.

`selective_scan` is the selective state-space scan of Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence
Modeling with Selective State Spaces", Algorithm 2, and `selective_scan_ref` in the mamba_ssm code) with
channels-last inputs; `selective_scan_step` is its one-token recurrent (decoding) form. Shapes: b batch,
L length, d d_inner (channels), N state size, G groups of B/C (d a multiple of G; channel c reads group
c // (d // G)). The scan is computed in float32 (float64 for float64 inputs); y comes back in `u`'s dtype.

`selective_scan` has four implementations (`IMPLEMENTATIONS`, dispatched as DESIGN.md's "Kernels" says):
"associative" (the associative scan over all L positions), "chunked" (the same in chunks of `CHUNK`
positions), "fused" (the Pallas kernel of `jaxmodels.ops.kernels.fused_scan`) and "ssd", the state-space
dual chunked algorithm of Mamba-2 (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient
Algorithms Through Structured State Space Duality", §6 and Listing 1 `ssd_minimal_discrete`) for A scalar per
channel, stated as A of shape (d_inner, 1) broadcast over the N state entries (every implementation accepts
that shape). `segsum` is that algorithm's stable segment sum.
"""

import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxmodels.ops.checks import positive_int
from jaxmodels.ops.dispatch import check_implementation, fall_back
from jaxmodels.ops.kernels import fused_scan

IMPLEMENTATIONS = ("associative", "chunked", "fused", "ssd")
CHUNK = 256  # positions per chunk of the "chunked" implementation (capped at L)
# Positions per chunk Q of "ssd" (capped at L). With Δ per channel the decay matrix L is per channel, so the
# intra-chunk work and memory grow as L·d_inner·Q against the chunk states' L·d_inner·N: Q near N. On a 2-core CPU
# (d_inner 256, N 16, L 2048) Q = 16 ran the forward as fast as the associative scan, Q = 64 5x slower; not yet
# measured on a GPU.
SSD_CHUNK = 16


def _combine(left, right):
    """(a1, b1) ∘ (a2, b2) = (a1·a2, a2·b1 + b2): apply step 1, then step 2."""
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def _check_recurrence_inputs(name, a, b):
    a, b = jnp.asarray(a), jnp.asarray(b)
    if b.ndim < 2:
        raise ValueError(f"{name}: b must be at least 2-D (batch, length, ...), got shape {b.shape}")
    try:
        shape = jnp.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        shape = None
    if shape != b.shape:
        raise ValueError(f"{name}: a must broadcast to b's shape {b.shape}, got shape {a.shape}")
    dtype = jnp.result_type(a, b)
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.result_type(dtype, jnp.float32)
    return jnp.broadcast_to(a, b.shape).astype(dtype), b.astype(dtype)


def linear_recurrence(a, b, *, reverse=False) -> jax.Array:
    r"""First-order linear recurrence h_t = a_t·h_{t-1} + b_t, h_{-1} = 0, by associative scan.

    Uses `jax.lax.associative_scan` with (a1, b1) ∘ (a2, b2) = (a1·a2, a2·b1 + b2) (Blelloch 1990):
    O(L) work, O(log L) depth, O(L) memory for the intermediate pairs.

    Args:
      a: decay / transition coefficients, broadcastable to `b`'s shape.
      b: (batch, length, ...) inputs.
      reverse: run right to left, h_t = a_t·h_{t+1} + b_t with h_L = 0.

    Returns:
      h with `b`'s shape, in the result dtype of (a, b) (float32 for integer inputs).

    Raises:
      ValueError if `b` is not at least 2-D or `a` does not broadcast to `b`'s shape.
    """
    a, b = _check_recurrence_inputs("linear_recurrence", a, b)
    _, h = lax.associative_scan(_combine, (a, b), reverse=reverse, axis=1)
    return h


def chunked_linear_recurrence(a, b, *, chunk_size, reverse=False) -> jax.Array:
    r"""`linear_recurrence` in chunks: associative scan inside chunks, `lax.scan` across them.

    Positions are split into ceil(L / c) chunks of c = `chunk_size` (the last one padded with a = 1,
    b = 0, which leaves h unchanged); inside a chunk the associative scan gives the cumulative
    products P_t = Π a and the zero-start states H_t, and the state entering the chunk, h_in, is carried
    by `lax.scan`: h_t = P_t·h_in + H_t. Working memory of the scan is O(c) positions (plus the outputs).

    Args:
      a: broadcastable to `b`'s shape.
      b: (batch, length, ...).
      chunk_size: positive int; need not divide the length.
      reverse: run right to left (h_t = a_t·h_{t+1} + b_t, h_L = 0).

    Returns:
      h with `b`'s shape; equal to `linear_recurrence(a, b, reverse=reverse)` up to rounding.

    Raises:
      ValueError for the shape errors of `linear_recurrence`; `checks.positive_int`'s errors for chunk_size.
    """
    positive_int("chunk_size", chunk_size)
    a, b = _check_recurrence_inputs("chunked_linear_recurrence", a, b)
    batch, length, rest = b.shape[0], b.shape[1], b.shape[2:]
    c = min(chunk_size, max(length, 1))
    n_chunks = -(-length // c)
    pad = n_chunks * c - length
    if pad:
        widths = [(0, 0), (0, pad)] + [(0, 0)] * len(rest)
        a = jnp.pad(a, widths, constant_values=1)
        b = jnp.pad(b, widths, constant_values=0)
    # (n_chunks, batch, c, ...): chunks lead so lax.scan iterates over them.
    a = jnp.moveaxis(a.reshape((batch, n_chunks, c) + rest), 1, 0)
    b = jnp.moveaxis(b.reshape((batch, n_chunks, c) + rest), 1, 0)

    def step(h_in, chunk):
        a_c, b_c = chunk
        prod, h0 = lax.associative_scan(_combine, (a_c, b_c), reverse=reverse, axis=1)
        h = prod * h_in[:, None] + h0
        return (h[:, 0] if reverse else h[:, -1]), h

    init = jnp.zeros((batch,) + rest, b.dtype)
    _, h = lax.scan(step, init, (a, b), reverse=reverse)
    h = jnp.moveaxis(h, 0, 1).reshape((batch, n_chunks * c) + rest)
    return h[:, :length]


def _compute_dtype(u):
    return jnp.float64 if u.dtype == jnp.float64 else jnp.float32


def _check_bc(name, x, batch, length, d_inner, n_state, step):
    """B or C: (batch, [L,] N) or (batch, [L,] G, N) -> (batch, [L,] G, N) with d_inner % G == 0."""
    lead = (batch,) if step else (batch, length)
    layout = "(batch, N) or (batch, groups, N)" if step else "(batch, L, N) or (batch, L, groups, N)"
    if x.ndim == len(lead) + 1 and x.shape[:len(lead)] == lead and x.shape[-1] == n_state:
        return x[..., None, :]
    if x.ndim == len(lead) + 2 and x.shape[:len(lead)] == lead and x.shape[-1] == n_state:
        groups = x.shape[-2]
        if groups < 1 or d_inner % groups:
            raise ValueError(f"{name}: d_inner={d_inner} must be divisible by the number of groups, got {groups}")
        return x
    raise ValueError(f"{name} must have shape {layout} with batch={batch}"
                     f"{'' if step else f', L={length}'}, N={n_state}, got {x.shape}")


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, *, step):
    """Validates and casts the selective-scan inputs; returns the discretised delta and friends."""
    name = "selective_scan_step" if step else "selective_scan"
    u, delta, A, B, C = (jnp.asarray(x) for x in (u, delta, A, B, C))
    ndim = 2 if step else 3
    layout = "(batch, d_inner)" if step else "(batch, L, d_inner)"
    if u.ndim != ndim:
        raise ValueError(f"{name}: u must be {ndim}-D {layout}, got shape {u.shape}")
    if not jnp.issubdtype(u.dtype, jnp.floating):
        raise TypeError(f"{name}: u must be a real floating array, got dtype {u.dtype}")
    if delta.shape != u.shape:
        raise ValueError(f"{name}: delta must have u's shape {u.shape}, got {delta.shape}")
    d_inner = u.shape[-1]
    if A.ndim != 2 or A.shape[0] != d_inner:
        raise ValueError(f"{name}: A must have shape (d_inner={d_inner}, N) or (d_inner={d_inner}, 1), got {A.shape}")
    if jnp.iscomplexobj(A):
        raise TypeError(f"{name}: only real A is supported, got dtype {A.dtype}")
    n_state = _state_size(A, B)
    batch, length = u.shape[0], (None if step else u.shape[1])
    B = _check_bc(f"{name}: B", B, batch, length, d_inner, n_state, step)
    C = _check_bc(f"{name}: C", C, batch, length, d_inner, n_state, step)
    if z is not None and jnp.shape(z) != u.shape:
        raise ValueError(f"{name}: z must have u's shape {u.shape}, got {jnp.shape(z)}")
    for arg, value in (("D", D), ("delta_bias", delta_bias)):
        if value is not None and jnp.shape(value) != (d_inner,):
            raise ValueError(f"{name}: {arg} must have shape (d_inner={d_inner},), got {jnp.shape(value)}")

    dt = _compute_dtype(u)
    delta = delta.astype(dt)
    if delta_bias is not None:
        delta = delta + jnp.asarray(delta_bias, dt)
    if delta_softplus:
        delta = jax.nn.softplus(delta)
    return u.astype(dt), delta, A.astype(dt), B.astype(dt), C.astype(dt), dt


def _state_size(A, B) -> int:
    """N: A's second axis, or B's last one where A is (d_inner, 1), scalar per channel and broadcast over N."""
    return B.shape[-1] if A.shape[1] == 1 and B.ndim else A.shape[1]


def _group(x, groups):
    """(..., d) -> (..., G, d // G, 1): channel c lands in group c // (d // G)."""
    return x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups, 1))


def _output(y, u, D, z, dt):
    """y (+ D·u), gated by silu(z); all in the compute dtype."""
    if D is not None:
        y = y + jnp.asarray(D, dt) * u
    if z is not None:
        y = y * jax.nn.silu(jnp.asarray(z, dt))
    return y


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, chunk_size=None, implementation="associative"):
    r"""Mamba's selective scan (Gu & Dao 2023, Algorithm 2; mamba_ssm `selective_scan_ref`), channels last.

    With Δ = softplus(delta + delta_bias) (bias and softplus optional), per batch, position t, channel c
    and state index n:

      Ā_t = exp(Δ_t,c · A_c,n),   B̄u_t = Δ_t,c · B_t,g(c),n · u_t,c      (zero-order-hold Ā, Euler B̄)
      h_t = Ā_t · h_{t-1} + B̄u_t,  h_{-1} = 0
      y_t,c = Σ_n C_t,g(c),n · h_t,c,n  (+ D_c · u_t,c),  then y *= silu(z) if z is given

    where g(c) = c // (d_inner // G). "associative" runs the recurrence through `linear_recurrence` (an
    associative scan over L, materialising the (b, L, d, N) states), "chunked" through
    `chunked_linear_recurrence`; "fused" is `jaxmodels.ops.kernels.fused_scan.fused_selective_scan`,
    which keeps the state in registers (Gu & Dao 2023, §3.3.2). "ssd" (A of shape (d_inner, 1) only) is the
    chunked state-space-dual form of `_ssd_scan` (Dao & Gu 2024, §6): masked quadratic forms inside chunks
    of Q positions, a recurrence over the chunk states between them.

    Args:
      u: (batch, L, d_inner) real float input.
      delta: (batch, L, d_inner) step sizes (before bias / softplus).
      A: (d_inner, N) real state matrix (diagonal per channel; usually negative, -exp(A_log)), or (d_inner, 1):
        one scalar per channel broadcast over the N state entries (Mamba-2's scalar A; N is then B's last axis).
      B, C: (batch, L, N) or (batch, L, G, N), d_inner divisible by G (B and C may differ in G).
      D: optional (d_inner,) skip connection.
      z: optional (batch, L, d_inner) gate.
      delta_bias: optional (d_inner,) added to delta.
      delta_softplus: apply softplus to delta (after the bias).
      return_last_state: also return h at the last position.
      chunk_size: optional positive int: scan in chunks of this many positions (same result); the chunk
        length of "chunked" (default min(CHUNK, L)) and of "ssd" (Q, default min(SSD_CHUNK, L)), and with
        "associative" or None it selects the chunked scan. Not with "fused" (the kernel walks the whole sequence).
      implementation: "associative" (the default), "chunked", "fused", "ssd" or None (`IMPLEMENTATIONS`). None
        picks "fused" on the GPU where `fused_scan.supports` the inputs and no chunk_size is given, else
        "associative"; it never picks "ssd", which is offered explicitly until it is measured faster
        (benchmarks/ssm.py). "fused" runs the Pallas interpreter off the GPU; on inputs the kernel does not cover
        (float64, grouped B/C, d_inner not a multiple of 8, N not a power of two) it falls back to
        "associative" with a one-time warning. "ssd" needs A of shape (d_inner, 1) (decided from the shape, so
        an A of shape (d_inner, N) with equal rows does not qualify); any other A falls back to "associative"
        with a one-time warning.

    Returns:
      y: (batch, L, d_inner) in `u`'s dtype; with `return_last_state`, (y, last_state) where
      last_state is (batch, d_inner, N) in the compute dtype (float32, float64 for float64 `u`).
      L = 0 is allowed with every implementation: y is empty and last_state the initial state, zeros.

    Raises:
      ValueError for wrong ranks or shapes (A not (d_inner, N) or (d_inner, 1), B/C not matching, d_inner not divisible
      by the groups, D / delta_bias not (d_inner,), z or delta not u's shape), an unknown implementation or
      chunk_size with "fused"; TypeError for non-float u or complex A.
    """
    check_implementation(implementation, IMPLEMENTATIONS)
    u, delta, A, B, C = (jnp.asarray(x) for x in (u, delta, A, B, C))
    prepared = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, step=False)
    length, n_state = u.shape[1], _state_size(A, B)
    if length == 0:  # nothing to scan: every implementation's answer is the empty y and h_{-1} = 0
        positive_int("chunk_size", chunk_size, allow_none=True)
        _scan_implementation(implementation, u, A, B, C, chunk_size)  # its errors, whatever L
        return _empty_scan(prepared[0], n_state, u.dtype, return_last_state)
    implementation = _scan_implementation(implementation, u, A, B, C, chunk_size)
    if implementation == "fused":
        A = jnp.broadcast_to(A, (A.shape[0], n_state))
        return fused_scan.fused_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if implementation == "ssd":
        positive_int("chunk_size", chunk_size, allow_none=True)
        chunk_size = min(SSD_CHUNK, length) if chunk_size is None else chunk_size
        return _ssd_scan(*prepared, D, z, u.dtype, return_last_state, chunk_size)
    if implementation == "chunked" and chunk_size is None:
        chunk_size = min(CHUNK, length)
    return _associative_scan(*prepared, D, z, u.dtype, return_last_state, chunk_size)


def _empty_scan(u, n_state, out_dtype, return_last_state):
    """`selective_scan` of L = 0 positions: y (batch, 0, d_inner) and, with `return_last_state`, the initial
    state h_{-1} = 0 (batch, d_inner, N)."""
    y = jnp.zeros(u.shape, out_dtype)
    return (y, jnp.zeros((u.shape[0], u.shape[2], n_state), u.dtype)) if return_last_state else y


def _scan_implementation(implementation, u, A, B, C, chunk_size) -> str:
    """The implementation `selective_scan` runs for a requested one (its docstring) on these inputs."""
    if implementation == "fused" and chunk_size is not None:
        raise ValueError(f"chunk_size={chunk_size!r} does not apply to implementation 'fused' (the kernel walks the "
                         "whole sequence); leave chunk_size None or use 'chunked'")
    if implementation is None:
        on_gpu = jax.default_backend() == "gpu"
        return "fused" if chunk_size is None and on_gpu and fused_scan.supports(u, B, C) is None else "associative"
    if implementation == "fused":
        reason = fused_scan.supports(u, B, C)
    elif implementation == "ssd" and A.shape[1] != 1:
        reason = f"A of shape {A.shape} is not scalar per channel, shape (d_inner, 1)"
    else:
        reason = None
    return fall_back("selective_scan", implementation, reason, "associative") if reason else implementation


def _associative_scan(u, delta, A, B, C, dt, D, z, out_dtype, return_last_state, chunk_size):
    """`selective_scan` by associative scan, over all of L or in chunks of chunk_size, on `_prepare`d inputs."""
    batch, length, d_inner = u.shape
    n_state = B.shape[-1]
    groups_b, groups_c = B.shape[2], C.shape[2]

    delta_a = jnp.exp(delta[..., None] * A)                                  # (b, L, d, N)
    delta_u = _group(delta * u, groups_b)                                    # (b, L, G, d/G, 1)
    delta_b_u = (delta_u * B[:, :, :, None, :]).reshape(batch, length, d_inner, n_state)
    if chunk_size is None:
        h = linear_recurrence(delta_a, delta_b_u)
    else:
        h = chunked_linear_recurrence(delta_a, delta_b_u, chunk_size=chunk_size)
    h_grouped = h.reshape(batch, length, groups_c, d_inner // groups_c, n_state)
    y = jnp.einsum("blgdn,blgn->blgd", h_grouped, C).reshape(batch, length, d_inner)
    y = _output(y, u, D, z, dt).astype(out_dtype)
    if return_last_state:
        return y, h[:, -1]
    return y


def segsum(a) -> jax.Array:
    r"""Segment sums along the last axis (Dao & Gu 2024, "Transformers are SSMs", §6, Listing 1 `segsum`).

    out[..., t, s] = Σ_{k=s+1}^{t} a[..., k] for s ≤ t (0 on the diagonal) and -inf for s > t, so exp(out) is
    the lower-triangular 1-semiseparable matrix L[t, s] = Π_{k=s+1}^{t} exp(a_k) of the SSD algorithm. Computed
    the paper's stable way, as a cumulative sum of a repeated and masked below the diagonal: each entry sums
    only the a_k it covers, where the difference of prefix sums cumsum_t - cumsum_s loses the small sums to
    rounding once the prefix sums grow, and exp(cumsum_t) · exp(-cumsum_s) overflows.

    Args:
      a: (..., T) real floating array (for SSD, the log-decays Δ·A of T consecutive positions).

    Returns:
      (..., T, T) in `a`'s dtype.

    Raises:
      ValueError if `a` is 0-D; TypeError if it is not real floating.
    """
    a = jnp.asarray(a)
    if a.ndim < 1:
        raise ValueError(f"segsum: a must be at least 1-D (..., T), got shape {a.shape}")
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"segsum: a must be a real floating array, got dtype {a.dtype}")
    size = a.shape[-1]
    below = jnp.tril(jnp.ones((size, size), bool), -1)
    repeated = jnp.where(below, a[..., :, None], 0)                       # [k, s] = a_k where k > s
    sums = jnp.cumsum(repeated, axis=-2)                                     # [t, s] = Σ_{s<k≤t} a_k
    return jnp.where(below | jnp.eye(size, dtype=bool), sums, -jnp.inf)


def _ssd_scan(u, delta, A, B, C, dt, D, z, out_dtype, return_last_state, chunk_size):
    r"""`selective_scan` for A (d_inner, 1) by the SSD chunked algorithm (Dao & Gu 2024, §6, Listing 1
    `ssd_minimal_discrete`) on `_prepare`d inputs.

    With x_t = Δ_t·u_t and log-decay a_t = Δ_t·A per channel, positions are cut into chunks of Q (the last
    one padded with Δ = 0, u = 0, B = C = 0, which changes neither y nor the state). Per chunk, with the
    decay matrix L = exp(segsum(a)):
      1. intra-chunk (the "diagonal blocks"): y_t = Σ_{s≤t} (C_t·B_s) L[t, s] x_s, a masked quadratic form;
      2. the chunk's own state at its end, from a zero start: h_end = Σ_s L[Q-1, s] x_s B_s;
      3. the states entering each chunk by the recurrence h_in[z+1] = exp(Σ_chunk a)·h_in[z] + h_end[z]
         over the L/Q chunks (`linear_recurrence`);
      4. their contribution to the outputs: y_t += C_t·h_in · exp(Σ_{k≤t} a_k).
    B and C are brought to G = lcm(G_B, G_C) groups so channel c of group c // (d_inner/G) reads both.
    Contractions in float32 (float64 for float64 inputs) at full matmul precision.
    """
    batch, length, d_inner = u.shape
    n_state = B.shape[-1]
    groups = math.lcm(B.shape[2], C.shape[2])
    width = d_inner // groups                                                  # channels per group, P
    n_chunks = -(-length // chunk_size)
    pad = n_chunks * chunk_size - length

    def chunks(x):  # (b, L, ...) -> (b, Z, Q, ...), zero-padded to Z·Q positions
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((batch, n_chunks, chunk_size) + x.shape[2:])

    B = chunks(jnp.repeat(B, groups // B.shape[2], axis=2))                  # (b, Z, Q, G, N)
    C = chunks(jnp.repeat(C, groups // C.shape[2], axis=2))
    x = chunks(delta * u).reshape(batch, n_chunks, chunk_size, groups, width)            # (b, Z, Q, G, P)
    log_a = jnp.moveaxis(chunks(delta * A[:, 0]).reshape(x.shape), 2, -1)               # (b, Z, G, P, Q)
    decay = jnp.exp(segsum(log_a))                                             # (b, Z, G, P, Q, Q)
    hi = lax.Precision.HIGHEST

    scores = jnp.einsum("bztgn,bzsgn->bzgts", C, B, precision=hi)             # C_t·B_s
    y_diag = jnp.einsum("bzgts,bzgpts,bzsgp->bztgp", scores, decay, x, precision=hi)
    h_end = jnp.einsum("bzsgn,bzgps,bzsgp->bzgpn", B, decay[..., -1, :], x, precision=hi)
    log_prefix = jnp.cumsum(log_a, axis=-1)                                    # Σ_{k≤t} a_k within the chunk
    h_out = linear_recurrence(jnp.exp(log_prefix[..., -1:]), h_end)           # state after each chunk
    h_in = jnp.concatenate([jnp.zeros_like(h_out[:, :1]), h_out[:, :-1]], axis=1)
    y_off = jnp.einsum("bztgn,bzgpn,bzgpt->bztgp", C, h_in, jnp.exp(log_prefix), precision=hi)

    y = (y_diag + y_off).reshape(batch, n_chunks * chunk_size, d_inner)[:, :length]
    y = _output(y, u, D, z, dt).astype(out_dtype)
    if return_last_state:
        return y, h_out[:, -1].reshape(batch, d_inner, n_state)
    return y


def selective_scan_init_state(batch, d_inner, n_state, dtype=jnp.float32) -> jax.Array:
    """Zero state (batch, d_inner, N) for `selective_scan_step`."""
    return jnp.zeros((batch, d_inner, n_state), dtype)


def selective_scan_step(state, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    r"""One decoding step of `selective_scan` (Gu & Dao 2023, Algorithm 2, recurrent mode).

    h' = exp(Δ·A)·h + Δ·B·u,  y = Σ_n C_n h'_n (+ D·u), y *= silu(z); with Δ as in `selective_scan`.
    Running it over t = 0..L-1 from a zero state reproduces `selective_scan` and its last state.

    Args:
      state: (batch, d_inner, N) state h_{t-1} (zeros at the start, or `selective_scan`'s last state).
      u, delta: (batch, d_inner); z: optional (batch, d_inner).
      A: (d_inner, N) or (d_inner, 1) (scalar per channel); B, C: (batch, N) or (batch, G, N); D, delta_bias:
        optional (d_inner,).
      delta_softplus: as in `selective_scan`.

    Returns:
      (y, new_state): y (batch, d_inner) in `u`'s dtype; new_state (batch, d_inner, N) in the compute
      dtype (float32, float64 for float64 `u`).

    Raises:
      ValueError / TypeError as `selective_scan`, and for a state that is not (batch, d_inner, N).
    """
    out_dtype = jnp.asarray(u).dtype
    u, delta, A, B, C, dt = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, step=True)
    batch, d_inner = u.shape
    n_state = B.shape[-1]
    state = jnp.asarray(state)
    if state.shape != (batch, d_inner, n_state):
        raise ValueError(f"selective_scan_step: state must have shape (batch={batch}, d_inner={d_inner}, "
                         f"N={n_state}), got {state.shape}")
    delta_a = jnp.exp(delta[..., None] * A)                                  # (b, d, N)
    delta_u = _group(delta * u, B.shape[1])                                  # (b, G, d/G, 1)
    delta_b_u = (delta_u * B[:, :, None, :]).reshape(batch, d_inner, n_state)
    new_state = delta_a * state.astype(dt) + delta_b_u
    h_grouped = new_state.reshape(batch, C.shape[1], d_inner // C.shape[1], n_state)
    y = jnp.einsum("bgdn,bgn->bgd", h_grouped, C).reshape(batch, d_inner)
    y = _output(y, u, D, z, dt).astype(out_dtype)
    return y, new_state
