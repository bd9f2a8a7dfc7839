"""The Linear Recurrent Unit (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for Long
Sequences", §3 and Algorithm 1): a diagonal complex linear RNN on the scan primitive of `scan.py`.

    λ = exp(-exp(ν_log) + i exp(θ_log))                 (stable exponential parameterisation, §3.3)
    x_t = λ ∘ x_{t-1} + γ ∘ (B u_t),  x_{-1} = 0,  γ = exp(γ_log)  (γ_log = log sqrt(1 - |λ|²) at init, §3.4)
    y_t = Re(C x_t) + D ∘ u_t

|λ| = exp(-exp(ν_log)) < 1 for every real ν_log, so the recurrence is stable by construction.
Three equal forms: `lru_parallel` (associative scan, `linear_recurrence`), `lru_chunked`
(`chunked_linear_recurrence`) and `lru_step` (one step of the recurrence, for decoding).

Shapes: b batch, L length, H model width (input = output channels), N state size. u is real
(b, L, H); B (N, H) and C (H, N) are complex; ν_log, θ_log, γ_log and D are real (N,), (N,), (N,),
(H,). The state and the scan are complex64 (complex128 for float64 u); y comes back in u's dtype.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.ops.checks import positive_int
from jaxmodels.ops.scan import chunked_linear_recurrence, linear_recurrence


def lru_lambda(nu_log, theta_log) -> jax.Array:
    """λ = exp(-exp(ν_log) + i exp(θ_log)) (Orvieto et al. 2023, §3.3, eq. (6)).

    Args:
      nu_log, theta_log: (N,) real.

    Returns:
      (N,) complex λ with |λ| < 1 (complex64, complex128 for float64 inputs).
    """
    nu_log, theta_log = jnp.asarray(nu_log), jnp.asarray(theta_log)
    return jnp.exp(jax.lax.complex(-jnp.exp(nu_log), jnp.exp(theta_log)))


def lru_init(key, state_size, *, r_min=0.0, r_max=1.0, max_phase=2 * np.pi, dtype=jnp.float32):
    """Ring initialisation of λ and the γ normalisation (Orvieto et al. 2023, §3.3 and §3.4).

    λ is drawn uniformly on the ring r_min <= |λ| <= r_max, arg λ in [0, max_phase]:
    |λ|² = u₁ (r_max² - r_min²) + r_min², ν_log = log(-log|λ|), θ_log = log(max_phase · u₂) with
    u₁, u₂ ~ U[0, 1]; γ_log = log sqrt(1 - |λ|²) normalises the state's variance for white input.

    Args:
      key: a PRNG key.
      state_size: N, a positive int.
      r_min, r_max: 0 <= r_min < r_max <= 1 (r_max = 1 gives |λ| arbitrarily close to 1).
      max_phase: > 0, the largest phase (2π for the whole ring; the paper uses π/10 on long tasks).
      dtype: real dtype of the outputs.

    Returns:
      (nu_log, theta_log, gamma_log), each (N,) in `dtype`.
    """
    positive_int("state_size", state_size)
    if not 0.0 <= r_min < r_max <= 1.0:
        raise ValueError(f"lru_init: need 0 <= r_min < r_max <= 1, got r_min={r_min}, r_max={r_max}")
    if not max_phase > 0:
        raise ValueError(f"lru_init: max_phase must be > 0, got {max_phase}")
    k1, k2 = jax.random.split(key)
    # u in (0, 1]: |λ|² stays below 1 (ν_log finite) and the phase above 0 (θ_log finite).
    u1 = 1.0 - jax.random.uniform(k1, (state_size,), jnp.float32)
    u2 = 1.0 - jax.random.uniform(k2, (state_size,), jnp.float32)
    radius_sq = u1 * (r_min**2 - r_max**2) + r_max**2   # uniform on [r_min², r_max²), never r_max² = 1
    nu_log = jnp.log(-0.5 * jnp.log(radius_sq))
    theta_log = jnp.log(max_phase * u2)
    gamma_log = 0.5 * jnp.log(1 - radius_sq)
    return nu_log.astype(dtype), theta_log.astype(dtype), gamma_log.astype(dtype)


def lru_init_state(batch, state_size, dtype=jnp.complex64) -> jax.Array:
    """Zero state (batch, N) for `lru_step`."""
    return jnp.zeros((batch, state_size), dtype)


def _prepare(name, u, nu_log, theta_log, gamma_log, B, C, D, *, step):
    """Validates shapes; returns (u, λ, γ, B, C, D) cast to the compute dtypes."""
    u = jnp.asarray(u)
    ndim, layout = (2, "(batch, H)") if step else (3, "(batch, L, H)")
    if u.ndim != ndim:
        raise ValueError(f"{name}: u must be {ndim}-D {layout}, got shape {u.shape}")
    if not jnp.issubdtype(u.dtype, jnp.floating):
        raise TypeError(f"{name}: u must be a real floating array, got dtype {u.dtype}")
    H = u.shape[-1]
    nu_log, theta_log, gamma_log, B, C = (jnp.asarray(x) for x in (nu_log, theta_log, gamma_log, B, C))
    if nu_log.ndim != 1:
        raise ValueError(f"{name}: nu_log must be (N,), got shape {nu_log.shape}")
    N = nu_log.shape[0]
    for arg, value in (("theta_log", theta_log), ("gamma_log", gamma_log)):
        if value.shape != (N,):
            raise ValueError(f"{name}: {arg} must be (N,) = ({N},) like nu_log, got shape {value.shape}")
        if jnp.iscomplexobj(value):
            raise TypeError(f"{name}: {arg} must be real, got dtype {value.dtype}")
    if B.shape != (N, H):
        raise ValueError(f"{name}: B must be (N, H) = {(N, H)}, got shape {B.shape}")
    if C.shape != (H, N):
        raise ValueError(f"{name}: C must be (H, N) = {(H, N)}, got shape {C.shape}")
    if D is not None and jnp.shape(D) != (H,):
        raise ValueError(f"{name}: D must be (H,) = ({H},), got shape {jnp.shape(D)}")
    real = jnp.float64 if u.dtype == jnp.float64 else jnp.float32
    cplx = jnp.complex128 if real == jnp.float64 else jnp.complex64
    lam = lru_lambda(nu_log.astype(real), theta_log.astype(real)).astype(cplx)
    gamma = jnp.exp(gamma_log.astype(real))
    D = None if D is None else jnp.asarray(D, real)
    return u.astype(real), lam, gamma, B.astype(cplx), C.astype(cplx), D


def _readout(x, u, C, D, out_dtype):
    """y = Re(C x) + D u, in out_dtype. x: (..., N) complex, u: (..., H)."""
    y = jnp.einsum("...n,hn->...h", x, C).real
    if D is not None:
        y = y + D * u
    return y.astype(out_dtype)


def _lru_sequence(name, u, nu_log, theta_log, gamma_log, B, C, D, return_last_state, recurrence):
    out_dtype = jnp.asarray(u).dtype
    u, lam, gamma, B, C, D = _prepare(name, u, nu_log, theta_log, gamma_log, B, C, D, step=False)
    bu = gamma * jnp.einsum("blh,nh->bln", u.astype(B.dtype), B)     # (b, L, N) complex
    x = recurrence(lam, bu)
    y = _readout(x, u, C, D, out_dtype)
    return (y, x[:, -1]) if return_last_state else y


def lru_parallel(u, nu_log, theta_log, gamma_log, B, C, D=None, *, return_last_state=False):
    """The LRU over a whole sequence by associative scan (Orvieto et al. 2023, §3, Appendix A).

    x_t = λ ∘ x_{t-1} + γ ∘ (B u_t) (x_{-1} = 0) through `jaxmodels.ops.scan.linear_recurrence` on
    complex numbers; y_t = Re(C x_t) + D ∘ u_t.

    Args:
      u: (b, L, H) real float input.
      nu_log, theta_log, gamma_log: (N,) real (see `lru_init`); gamma_log = 0 turns γ off.
      B: (N, H) complex input matrix; C: (H, N) complex output matrix; D: optional (H,) real skip.
      return_last_state: also return x_{L-1}.

    Returns:
      y (b, L, H) in u's dtype; with return_last_state, (y, x_last) with x_last (b, N) complex64
      (complex128 for float64 u).

    Raises:
      ValueError for inconsistent shapes; TypeError for a non-float u or complex ν/θ/γ.
    """
    return _lru_sequence("lru_parallel", u, nu_log, theta_log, gamma_log, B, C, D, return_last_state,
                         linear_recurrence)


def lru_chunked(u, nu_log, theta_log, gamma_log, B, C, D=None, *, chunk_size, return_last_state=False):
    """`lru_parallel` through `chunked_linear_recurrence`: associative scan inside chunks of
    `chunk_size` positions, `lax.scan` across them (same result, O(chunk_size) scan memory).

    Args and returns as `lru_parallel`; chunk_size is a positive int (need not divide L).
    """
    def recurrence(a, b):
        return chunked_linear_recurrence(a, b, chunk_size=chunk_size)

    return _lru_sequence("lru_chunked", u, nu_log, theta_log, gamma_log, B, C, D, return_last_state, recurrence)


def lru_step(state, u, nu_log, theta_log, gamma_log, B, C, D=None):
    """One step of the LRU recurrence (Orvieto et al. 2023, eq. (7)): x' = λ ∘ x + γ ∘ (B u), y = Re(C x') + D u.

    Run over t = 0..L-1 from a zero state it reproduces `lru_parallel` and its last state.

    Args:
      state: (b, N) complex previous state (zeros at the start, `lru_init_state`).
      u: (b, H) real float input at time t.
      nu_log, theta_log, gamma_log, B, C, D: as in `lru_parallel`.

    Returns:
      (y, new_state): y (b, H) in u's dtype, new_state (b, N) complex64 (complex128 for float64 u).
    """
    out_dtype = jnp.asarray(u).dtype
    u, lam, gamma, B, C, D = _prepare("lru_step", u, nu_log, theta_log, gamma_log, B, C, D, step=True)
    state = jnp.asarray(state)
    if state.shape != (u.shape[0], lam.shape[0]):
        raise ValueError(f"lru_step: state must be (batch, N) = {(u.shape[0], lam.shape[0])}, got shape "
                         f"{state.shape}")
    new_state = lam * state.astype(lam.dtype) + gamma * (u.astype(B.dtype) @ B.T)
    return _readout(new_state, u, C, D, out_dtype), new_state
