"""Structured state space models: HiPPO matrices, NPLR, discretisation, S4D kernels, conv/recurrent modes.

A linear time-invariant state space model (SSM) maps an input u(t) to an output y(t) through an
N-dimensional state x(t):

    x'(t) = A x(t) + B u(t),        y(t) = Re(C x(t)) + D u(t)                       (continuous)
    x_t = Ā x_{t-1} + B̄ u_t,        y_t = Re(C x_t) + D u_t,   x_{-1} = 0           (discrete, step Δ)

Unrolling the recurrence gives the convolution y_t = Σ_{l ≤ t} K_l u_{t-l} + D u_t with the kernel
K_l = Re(C Ā^l B̄) (Gu et al. 2022, "Efficiently Modeling Long Sequences with Structured State
Spaces" (S4), eq. 4-5), so an SSM layer can be trained in convolution mode (`s4d_kernel` +
`causal_conv`, O(L log L)) and run in recurrent mode (`ssm_step`, O(1) per step); the two agree.

  piece                       functions
  HiPPO initialisers          hippo_legs, hippo_legt, hippo_lagt, hippo_fout  -> float64 NumPy (A, B)
  S4 structure                nplr_legs: A = V Λ V* - P Pᵀ (normal plus low rank)
  discretisation              discretize_zoh, discretize_bilinear (dense (N, N) or diagonal (N,) A)
  convolution mode            s4d_kernel (diagonal SSM kernel, Vandermonde product), s4_kernel (DPLR
                              kernel: Cauchy + Woodbury at the roots of unity, inverse FFT), causal_conv (FFT)
  recurrent mode              ssm_step, ssm_scan_reference; c_tilde_to_c (S4's learned C̃ -> C)
  linear recurrences (scan.py) linear_recurrence, chunked_linear_recurrence (associative scan);
                              selective_scan, selective_scan_step (Mamba, Gu & Dao 2023), re-exported here

Shapes: H channels (independent SSMs, one per feature), N state size, L sequence length, Bt batch.
Sequences are channels-last, (Bt, L, H); kernels are (H, L). The HiPPO/NPLR initialisers are
NumPy float64 (they run once, at initialisation); everything else is jnp and jit/vmap/grad-safe.
Argument checks on `step` (> 0) happen only when it is concrete (not traced under jit).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmodels.ops.checks import one_of, positive_int
from jaxmodels.ops.scan import (  # noqa: F401 -- the selective (time-varying) half of the SSM family
    chunked_linear_recurrence,
    linear_recurrence,
    selective_scan,
    selective_scan_init_state,
    selective_scan_step,
)

# ----------------------------------------------------------------------------------------------
# HiPPO matrices (Gu et al. 2020, "HiPPO: Recurrent Memory with Optimal Polynomial Projections")
# ----------------------------------------------------------------------------------------------


def _check_state_size(N):
    return int(positive_int("state size N", N))


def hippo_legs(N):
    """HiPPO-LegS (scaled Legendre measure; Gu et al. 2020, §3.3 and Appendix D.3, eq. (29)).

    A_nk = -sqrt(2n+1) sqrt(2k+1) for n > k, -(n+1) for n = k, 0 for n < k;  B_n = sqrt(2n+1).
    (This is the time-invariant form used by S4: the 1/t of the scaled measure is dropped.)

    Args:
      N: state size, a positive int.

    Returns:
      (A, B): (N, N) and (N,) float64 NumPy arrays of x' = A x + B u. A is lower triangular with
      eigenvalues -1, ..., -N.
    """
    N = _check_state_size(N)
    r = np.sqrt(2.0 * np.arange(N) + 1.0)
    A = -np.tril(np.outer(r, r), -1) - np.diag(np.arange(N) + 1.0)
    return A, r.copy()


def hippo_legt(N):
    """HiPPO-LegT (translated Legendre measure on a window of length θ = 1; Gu et al. 2020, §3.3 and
    Appendix D.1, eq. (20), in the normalised basis of the S4 code).

    A_nk = -sqrt(2n+1) sqrt(2k+1) · (1 if n >= k else (-1)^(n-k));  B_n = sqrt(2n+1).

    Args:
      N: state size, a positive int.

    Returns:
      (A, B): (N, N) and (N,) float64 NumPy arrays; eigenvalues of A have negative real part.
    """
    N = _check_state_size(N)
    q = np.arange(N)
    r = np.sqrt(2.0 * q + 1.0)
    n, k = np.meshgrid(q, q, indexing="ij")
    sign = np.where(n >= k, 1.0, (-1.0) ** (n - k))
    return -np.outer(r, r) * sign, r.copy()


def hippo_lagt(N):
    """HiPPO-LagT (translated Laguerre measure, generalised-Laguerre parameter 0, β = 1; Gu et al.
    2020, Appendix D.2, eq. (24)).

    A_nk = -1 for n > k, -1/2 for n = k, 0 for n < k;  B_n = 1.

    Args:
      N: state size, a positive int.

    Returns:
      (A, B): (N, N) and (N,) float64 NumPy arrays; every eigenvalue of A is -1/2.
    """
    N = _check_state_size(N)
    return np.eye(N) / 2.0 - np.tril(np.ones((N, N))), np.ones(N)


def hippo_fout(N):
    """HiPPO-FouT (translated Fourier basis, uniform measure on the window [t-1, t]; Gu et al. 2022,
    "How to Train Your HiPPO", §4.1 / Appendix, derived as for LegT in Gu et al. 2020, §3.3).

    State c = [c_0, c_1, s_1, ..., c_K, s_K] (N = 2K + 1): coefficients of f on the orthonormal
    basis 1, √2 cos(2πkτ), √2 sin(2πkτ) of the window, τ = s - t + 1. Differentiating the window
    integrals gives c' = S c + B (f(t) - f(t-1)), with f(t-1) ≈ Bᵀ c the reconstruction at τ = 0, so

        A = S - B Bᵀ,  B = [1, √2, 0, √2, 0, ...],  S[c_k, s_k] = 2πk = -S[s_k, c_k] (skew).

    Unlike the S4 code's "fout", there is no identically-zero s_0 state, and N must be odd: a
    truncated pair would leave a zero eigenvalue, breaking stability (Re λ < 0).

    Args:
      N: state size, a positive odd int.

    Returns:
      (A, B): (N, N) and (N,) float64 NumPy arrays; eigenvalues of A have negative real part.
    """
    N = _check_state_size(N)
    if N % 2 == 0:
        raise ValueError(f"hippo_fout: state size N must be odd (1 + 2 per frequency), got {N}")
    K = N // 2
    S = np.zeros((N, N))
    B = np.zeros(N)
    B[0] = 1.0
    for k in range(1, K + 1):
        c, s = 2 * k - 1, 2 * k
        S[c, s], S[s, c] = 2 * np.pi * k, -2 * np.pi * k
        B[c] = np.sqrt(2.0)
    return S - np.outer(B, B), B


class NPLR(NamedTuple):
    """Normal plus low-rank form of a HiPPO matrix (S4, Gu et al. 2022, §3.1, Theorem 1).

    A = V (diag(Lambda) - P P*) V*, i.e. A = V Λ V* - p pᵀ with p = V P (real).

    Lambda: (N,) complex128 eigenvalues of the normal part A + p pᵀ.
    P: (N,) complex128 low-rank term in the eigenbasis, V* p.
    B: (N,) complex128 input vector in the eigenbasis, V* B.
    V: (N, N) complex128 unitary eigenvectors.
    """
    Lambda: np.ndarray
    P: np.ndarray
    B: np.ndarray
    V: np.ndarray


def nplr_legs(N):
    """NPLR decomposition of HiPPO-LegS (S4, Gu et al. 2022, §3.1 and Appendix C.1).

    With p_n = sqrt(n + 1/2), A + p pᵀ = -I/2 + S with S skew-symmetric, so A + p pᵀ is normal and
    unitarily diagonalisable: S = V (iω) V* with ω real (from the Hermitian eigenproblem of -iS).
    Hence A = V Λ V* - p pᵀ with Λ = -1/2 + iω.

    Args:
      N: state size, a positive int.

    Returns:
      NPLR(Lambda, P, B, V): Lambda (N,), P (N,), B (N,) complex128 in the eigenbasis, V (N, N)
      unitary complex128. Λ's real parts are all -1/2; S4D-LegS uses Lambda as its diagonal.
    """
    A, B = hippo_legs(N)
    p = np.sqrt(np.arange(N) + 0.5)
    normal = A + np.outer(p, p)
    S = normal + np.eye(N) / 2.0  # skew-symmetric
    omega, V = np.linalg.eigh(-1j * S)  # -iS Hermitian: S = V diag(i ω) V*
    Lambda = -0.5 + 1j * omega
    Vh = V.conj().T
    return NPLR(Lambda=Lambda, P=Vh @ p, B=Vh @ B, V=V)


# ----------------------------------------------------------------------------------------------
# Discretisation
# ----------------------------------------------------------------------------------------------


def _check_step(step):
    """Validates `step` when concrete; returns it as an array."""
    if not isinstance(step, jax.core.Tracer):
        s = np.asarray(step)
        if not np.issubdtype(s.dtype, np.number) or np.iscomplexobj(s):
            raise ValueError(f"step must be real, got dtype {s.dtype}")
        if not np.all(s > 0):
            raise ValueError(f"step must be > 0, got {step!r}")
    return jnp.asarray(step)


def _check_system(A, B, name):
    A, B = jnp.asarray(A), jnp.asarray(B)
    if A.ndim == 2:
        if A.shape[0] != A.shape[1]:
            raise ValueError(f"{name}: dense A must be square (N, N), got shape {A.shape}")
    elif A.ndim != 1:
        raise ValueError(f"{name}: A must be (N, N) (dense) or (N,) (diagonal), got shape {A.shape}")
    N = A.shape[0]
    if B.ndim not in (1, 2) or B.shape[0] != N:
        raise ValueError(f"{name}: B must be (N,) or (N, M) with N = {N}, got shape {B.shape}")
    dtype = jnp.result_type(A, B, float)
    return A.astype(dtype), B.astype(dtype)


def discretize_zoh(A, B, step):
    """Zero-order-hold discretisation (S4D, Gu et al. 2022, "On the Parameterization and
    Initialization of Diagonal State Space Models", §2 / eq. (5)).

    Ā = exp(ΔA),  B̄ = (∫_0^Δ exp(sA) ds) B = A⁻¹(Ā - I) B (the latter when A is invertible).

    Dense A: both come from one matrix exponential of the augmented matrix Δ[[A, B], [0, 0]], which
    needs no inverse (singular A is fine). Diagonal A: elementwise, B̄ = (exp(ΔΛ) - 1)/Λ · B
    (Λ must have no zero entries).

    Args:
      A: (N, N) dense or (N,) diagonal (the eigenvalues Λ), real or complex.
      B: (N,) or (N, M), real or complex.
      step: Δ > 0, a scalar. For per-channel steps, vmap.

    Returns:
      (Ā, B̄): Ā with A's shape, B̄ with B's shape, in the common (at least float) dtype.
    """
    A, B = _check_system(A, B, "discretize_zoh")
    step = _scalar_step(step, A, "discretize_zoh")
    if A.ndim == 1:
        dA = jnp.exp(step * A)
        scale = (dA - 1) / A
        return dA, (scale[:, None] if B.ndim == 2 else scale) * B
    N = A.shape[0]
    B2 = B if B.ndim == 2 else B[:, None]
    M = B2.shape[1]
    aug = jnp.zeros((N + M, N + M), A.dtype).at[:N, :N].set(A).at[:N, N:].set(B2)
    E = jax.scipy.linalg.expm(step * aug)
    dB = E[:N, N:]
    return E[:N, :N], dB if B.ndim == 2 else dB[:, 0]


def _scalar_step(step, A, name):
    """step checked (> 0 when concrete, a scalar) and cast to A's real dtype."""
    step = _check_step(step).astype(jnp.real(jnp.zeros((), A.dtype)).dtype)
    if jnp.ndim(step) != 0:
        raise ValueError(f"{name}: step must be a scalar, got shape {jnp.shape(step)}")
    return step


def discretize_bilinear(A, B, step):
    """Bilinear (Tustin) discretisation (S4, Gu et al. 2022, §2.3 eq. (3)).

    Ā = (I - Δ/2 A)⁻¹ (I + Δ/2 A),  B̄ = (I - Δ/2 A)⁻¹ Δ B; for diagonal A elementwise:
    Ā = (1 + ΔΛ/2) / (1 - ΔΛ/2),  B̄ = Δ B / (1 - ΔΛ/2).

    Args:
      A: (N, N) dense or (N,) diagonal, real or complex.
      B: (N,) or (N, M), real or complex.
      step: Δ > 0, a scalar. For per-channel steps, vmap.

    Returns:
      (Ā, B̄): Ā with A's shape, B̄ with B's shape, in the common (at least float) dtype.
    """
    A, B = _check_system(A, B, "discretize_bilinear")
    step = _scalar_step(step, A, "discretize_bilinear")
    if A.ndim == 1:
        inv = 1 / (1 - step / 2 * A)
        return inv * (1 + step / 2 * A), (inv[:, None] if B.ndim == 2 else inv) * step * B
    eye = jnp.eye(A.shape[0], dtype=A.dtype)
    back = eye - step / 2 * A
    dA = jnp.linalg.solve(back, eye + step / 2 * A)
    B2 = B if B.ndim == 2 else B[:, None]
    dB = jnp.linalg.solve(back, step * B2)
    return dA, dB if B.ndim == 2 else dB[:, 0]


# ----------------------------------------------------------------------------------------------
# Convolution mode
# ----------------------------------------------------------------------------------------------


_DISCRETIZATIONS = ("zoh", "bilinear")


def s4d_kernel(Lambda, B, C, step, length, *, discretization="zoh"):
    """Convolution kernel of a ZOH- (or bilinear-) discretised diagonal SSM (S4D, Gu et al. 2022, "On the
    Parameterization and Initialization of Diagonal State Space Models", §3.1, eq. (6)-(7)).

    K_l = Re(Σ_n C_n B̄_n Ā_n^l),  Ā = exp(ΔΛ),  B̄ = (exp(ΔΛ) - 1)/Λ · B,  l = 0..length-1,

    computed as the Vandermonde product (C ∘ B̄) · V with V_nl = exp(ΔΛ_n l) (an (N, L) matrix;
    exp of the product rather than powers, for accuracy). For a real-parameterised SSM with
    complex-conjugate eigenvalue pairs, keep one of each pair and multiply C by 2 (S4D's convention).
    With discretization="bilinear" (S4, §2.3 eq. (3); S4D §3.1 offers both): Ā = (1 + ΔΛ/2)/(1 - ΔΛ/2),
    B̄ = ΔB/(1 - ΔΛ/2), and V_nl = exp(l log Ā_n) (= Ā_n^l on any branch of the log).

    Args:
      Lambda: (N,) or (H, N) complex, Re(Λ) < 0 for a stable SSM, no zero entries.
      B: same shape as Lambda, real or complex.
      C: same shape as Lambda, real or complex.
      step: Δ > 0: a scalar, or (H,) (one step per channel) when Lambda is (H, N).
      length: L >= 1, a Python int.
      discretization: "zoh" (default) or "bilinear".

    Returns:
      (L,) or (H, L) real kernel (float64 if the inputs are complex128/float64, else float32).
    """
    one_of("discretization", discretization, _DISCRETIZATIONS)
    Lambda, B, C = jnp.asarray(Lambda), jnp.asarray(B), jnp.asarray(C)
    if Lambda.ndim not in (1, 2):
        raise ValueError(f"s4d_kernel: Lambda must be (N,) or (H, N), got shape {Lambda.shape}")
    if B.shape != Lambda.shape or C.shape != Lambda.shape:
        raise ValueError(f"s4d_kernel: Lambda, B, C must have the same shape, got {Lambda.shape}, "
                         f"{B.shape}, {C.shape}")
    positive_int("length", length)
    step = _check_step(step)
    if step.ndim > 1 or (step.ndim == 1 and (Lambda.ndim != 2 or step.shape[0] != Lambda.shape[0])):
        raise ValueError(f"s4d_kernel: step must be a scalar or (H,) = ({Lambda.shape[0]},) for "
                         f"(H, N) Lambda, got shape {step.shape} with Lambda {Lambda.shape}")
    ctype = jnp.result_type(Lambda, B, C, jnp.complex64)
    Lambda, B, C = Lambda.astype(ctype), B.astype(ctype), C.astype(ctype)
    step = step.astype(jnp.real(jnp.zeros((), ctype)).dtype)[..., None]  # (..., 1)
    dtA = step * Lambda                                                  # (..., N)
    if discretization == "zoh":
        dB = (jnp.exp(dtA) - 1) / Lambda * B
        log_dA = dtA
    else:
        dB = step * B / (1 - dtA / 2)
        log_dA = jnp.log((1 + dtA / 2) / (1 - dtA / 2))
    vandermonde = jnp.exp(log_dA[..., None] * jnp.arange(length, dtype=step.dtype))  # (..., N, L)
    return jnp.einsum("...n,...nl->...l", C * dB, vandermonde).real


def s4_kernel(Lambda, P, Q, B, C, step, length, *, c_tilde=False):
    """Convolution kernel of a bilinear-discretised DPLR SSM (S4, Gu et al. 2022, §3.3 and Algorithm 1).

    A = diag(Λ) - Σ_r P_r Q_r* (diagonal plus low rank; the NPLR form of HiPPO in the eigenbasis,
    `nplr_legs`, has Q = P and rank 1), discretised bilinearly (eq. (3)), K_l = Re(C Ā^l B̄),
    l = 0..L-1. Instead of powers of Ā, Algorithm 1 evaluates the truncated generating function
    K̂(z) = Σ_{l<L} K_l z^l = C̃ (I - Ā z)⁻¹ B̄ at the L roots of unity z_k = exp(-2πik/L), with
    C̃ = C (I - Ā^L) (z^L = 1 there; S4 Appendix C.3), then inverts the FFT. With the bilinear Ā,

        C̃ (I - Āz)⁻¹ B̄ = 2/(1+z) · C̃ R(g) B,  R(g) = (g - A)⁻¹,  g = (2/Δ)(1-z)/(1+z)

    and the Woodbury identity reduces R(g) to the diagonal resolvent D = (g - Λ)⁻¹:
    C̃ R B = k_00 - k_01 (I + k_11)⁻¹ k_10 with the Cauchy sums k_ab = Σ_n a_n b_n D_n over
    (a, b) ∈ {C̃, Q*} × {B, P} (the Cauchy kernel). Here D_n = (1+z)/d_n with d_n = (2/Δ)(1-z) - Λ_n(1+z),
    so the factor 2/(1+z) cancels analytically: K̂ = 2 (ĉ_00 - (1+z) ĉ_01 (I + (1+z) ĉ_11)⁻¹ ĉ_10),
    ĉ_ab = Σ_n a_n b_n / d_n, which stays finite at z = -1 (even L). The kernel is Re(ifft(K̂)), so a
    complex system needs no conjugate-pair symmetry (for a real system kept as one of each
    conjugate pair, multiply C by 2, as in `s4d_kernel`).

    Args:
      Lambda: (N,) or (H, N) complex diagonal, Re(Λ) < 0 for a stable SSM.
      P, Q: Lambda's shape (rank 1) or Lambda.shape[:-1] + (r, N) (rank r), the low-rank factors.
      B, C: Lambda's shape. C is the output vector; with c_tilde=True it is already C̃ (Algorithm 1
        learns C̃ directly, so training never forms Ā), else C̃ = C (I - Ā^L) is formed from the dense
        bilinear Ā (a dense solve and ⌈log₂ L⌉ squarings, O(N³ log L) per channel).
      step: Δ > 0: a scalar, or (H,) for (H, N) Lambda.
      length: L >= 1, a Python int.
      c_tilde: whether C is C̃ (for the recurrent mode, C = `c_tilde_to_c`(Ā, C̃, L)).

    With c_tilde=True and rank 1 (S4's NPLR) the kernel calls no LAPACK routine: the Woodbury
    capacitance is a scalar and is divided by. (Batched CPU LAPACK kernels wait on the XLA CPU thread
    pool they run on, so independent large batched solves, e.g. those of stacked layers, can deadlock
    it. Rank r > 1 still solves its r x r systems with `jnp.linalg.solve`.)

    Returns:
      (L,) or (H, L) real kernel (float64 for complex128/float64 inputs, else float32). With P = 0 it
      equals `s4d_kernel(..., discretization="bilinear")`.
    """
    Lambda, P, Q, B, C = (jnp.asarray(x) for x in (Lambda, P, Q, B, C))
    if Lambda.ndim not in (1, 2):
        raise ValueError(f"s4_kernel: Lambda must be (N,) or (H, N), got shape {Lambda.shape}")
    if B.shape != Lambda.shape or C.shape != Lambda.shape:
        raise ValueError(f"s4_kernel: Lambda, B, C must have the same shape, got {Lambda.shape}, {B.shape}, "
                         f"{C.shape}")
    low_rank_shapes = (Lambda.shape, Lambda.shape[:-1] + (None, Lambda.shape[-1]))
    if P.shape != Q.shape or not (P.shape == Lambda.shape or (
            P.ndim == Lambda.ndim + 1 and P.shape[:-2] == Lambda.shape[:-1] and P.shape[-1] == Lambda.shape[-1])):
        raise ValueError(f"s4_kernel: P and Q must both have shape {low_rank_shapes[0]} (rank 1) or "
                         f"{low_rank_shapes[1]} (rank r), got {P.shape} and {Q.shape}")
    positive_int("length", length)
    step = _check_step(step)
    if step.ndim > 1 or (step.ndim == 1 and (Lambda.ndim != 2 or step.shape[0] != Lambda.shape[0])):
        raise ValueError(f"s4_kernel: step must be a scalar or (H,) = ({Lambda.shape[0]},) for (H, N) Lambda, "
                         f"got shape {step.shape} with Lambda {Lambda.shape}")
    if P.shape == Lambda.shape:
        P, Q = P[..., None, :], Q[..., None, :]
    ctype = jnp.result_type(Lambda, P, Q, B, C, jnp.complex64)
    Lambda, P, Q, B, C = (x.astype(ctype) for x in (Lambda, P, Q, B, C))
    step = step.astype(jnp.real(jnp.zeros((), ctype)).dtype)
    kernel = functools.partial(_s4_kernel_single, length=int(length), c_tilde=c_tilde)
    if Lambda.ndim == 1:
        return kernel(Lambda, P, Q, B, C, step)
    return jax.vmap(kernel)(Lambda, P, Q, B, C, jnp.broadcast_to(step, Lambda.shape[:1]))


def _s4_kernel_single(Lambda, P, Q, B, C, step, *, length, c_tilde):
    """`s4_kernel` for one channel: Lambda, B, C (N,), P, Q (r, N), scalar step."""
    if not c_tilde:
        A = jnp.diag(Lambda) - P.T @ Q.conj()
        dA, _ = discretize_bilinear(A, B, step)
        C = C - C @ jnp.linalg.matrix_power(dA, length)
    z = jnp.exp(-2j * jnp.pi * jnp.arange(length) / length).astype(Lambda.dtype)     # (L,)
    inv_d = 1 / ((2 / step) * (1 - z)[:, None] - Lambda * (1 + z)[:, None])           # (L, N)
    c00 = inv_d @ (C * B)                                                             # (L,)
    c01 = inv_d @ (C * P).T                                                           # (L, r)
    c10 = inv_d @ (Q.conj() * B).T                                                    # (L, r)
    c11 = jnp.einsum("ln,an,bn->lab", inv_d, Q.conj(), P)                             # (L, r, r)
    s = (1 + z)[:, None]
    capacitance = jnp.eye(P.shape[0], dtype=Lambda.dtype) + s[..., None] * c11      # (L, r, r)
    if P.shape[0] == 1:
        solved = c10 / capacitance[..., 0]                                            # (L, 1)
    else:
        solved = jnp.linalg.solve(capacitance, c10[..., None])[..., 0]                # (L, r)
    k_hat = 2 * (c00 - s[:, 0] * jnp.sum(c01 * solved, axis=-1))
    return jnp.fft.ifft(k_hat).real


def c_tilde_to_c(A_bar, C_tilde, length):
    """The output vector C of the SSM whose length-L kernel Algorithm 1 computes from C̃ (S4, Gu et al.
    2022, §3.3 and Appendix C.3): C̃ = C (I - Ā^L), so C = C̃ (I - Ā^L)⁻¹.

    `s4_kernel(..., C̃, L, c_tilde=True)` is the kernel K_l = Re(C Ā^l B̄), l < L, of this C, so the
    recurrent mode (`ssm_step` with the dense Ā, B̄ and this C) reproduces the convolution mode at
    positions t < L. Ā^L by ⌈log₂ L⌉ squarings, then one dense solve: O(N³ log L) per channel, meant
    for setting up the recurrent mode, not for the training path.

    Args:
      A_bar: (N, N) or (H, N, N) dense discrete state matrix (e.g. `discretize_bilinear` of Λ - P Q*).
      C_tilde: (N,) or (H, N) (A_bar.shape[:-1]).
      length: L >= 1, the kernel length C̃ belongs to, a Python int.

    Returns:
      C with C_tilde's shape, in the common (at least complex64) dtype.
    """
    A_bar, C_tilde = jnp.asarray(A_bar), jnp.asarray(C_tilde)
    if A_bar.ndim not in (2, 3) or A_bar.shape[-1] != A_bar.shape[-2] or C_tilde.shape != A_bar.shape[:-1]:
        raise ValueError(f"c_tilde_to_c: A_bar must be (N, N) or (H, N, N) and C_tilde A_bar.shape[:-1], got "
                         f"shapes {A_bar.shape} and {C_tilde.shape}")
    positive_int("length", length)
    dtype = jnp.result_type(A_bar, C_tilde, jnp.complex64)
    A_bar, C_tilde = A_bar.astype(dtype), C_tilde.astype(dtype)
    M = jnp.eye(A_bar.shape[-1], dtype=dtype) - jnp.linalg.matrix_power(A_bar, int(length))
    return jnp.linalg.solve(jnp.swapaxes(M, -1, -2), C_tilde[..., None])[..., 0]   # Mᵀ Cᵀ = C̃ᵀ


def causal_conv(u, kernel):
    """Causal convolution y_t = Σ_{l ≤ t} K_l u_{t-l} per channel, via FFT (S4, Gu et al. 2022, §3.3).

    Both signals are zero-padded to L + Lk (>= 2L when Lk = L) before the real FFT, so the circular
    convolution equals the linear one on the kept outputs t < L.

    Args:
      u: (Bt, L, H) real input, channels last.
      kernel: (H, Lk) real kernel, Lk >= 1 (as returned by `s4d_kernel`); taps l >= L never reach
        an output, and a shorter kernel (Lk < L) means K_l = 0 for l >= Lk.

    Returns:
      (Bt, L, H) in the common real dtype of u and kernel.
    """
    u, kernel = jnp.asarray(u), jnp.asarray(kernel)
    if u.ndim != 3:
        raise ValueError(f"causal_conv: u must be (batch, length, channels), got shape {u.shape}")
    if kernel.ndim != 2 or kernel.shape[0] != u.shape[2]:
        raise ValueError(f"causal_conv: kernel must be (H, Lk) with H = {u.shape[2]} (u's channels), "
                         f"got shape {kernel.shape}")
    if jnp.iscomplexobj(u) or jnp.iscomplexobj(kernel):
        raise ValueError("causal_conv: u and kernel must be real")
    L, Lk = u.shape[1], kernel.shape[1]
    dtype = jnp.result_type(u, kernel, jnp.float32)
    n = L + Lk
    u_f = jnp.fft.rfft(u.astype(dtype), n=n, axis=1)                  # (Bt, n//2+1, H)
    k_f = jnp.fft.rfft(kernel.astype(dtype), n=n, axis=1).T           # (n//2+1, H)
    return jnp.fft.irfft(u_f * k_f, n=n, axis=1)[:, :L].astype(dtype)


# ----------------------------------------------------------------------------------------------
# Recurrent mode
# ----------------------------------------------------------------------------------------------


def _check_recurrent(A_bar, B_bar, C, D, H_u, name):
    A_bar, B_bar, C = jnp.asarray(A_bar), jnp.asarray(B_bar), jnp.asarray(C)
    if C.ndim != 2:
        raise ValueError(f"{name}: C must be (H, N), got shape {C.shape}")
    H, N = C.shape
    if B_bar.shape != (H, N):
        raise ValueError(f"{name}: B_bar must be (H, N) = {(H, N)}, got shape {B_bar.shape}")
    if A_bar.shape not in ((H, N), (H, N, N)):
        raise ValueError(f"{name}: A_bar must be (H, N) (diagonal) or (H, N, N) (dense) with "
                         f"(H, N) = {(H, N)}, got shape {A_bar.shape}")
    if H_u != H:
        raise ValueError(f"{name}: u has {H_u} channels, the SSM has H = {H}")
    if D is not None and jnp.shape(D) not in ((), (H,)):
        raise ValueError(f"{name}: D must be a scalar or (H,), got shape {jnp.shape(D)}")
    return A_bar, B_bar, C


def _step(A_bar, B_bar, C, D, x, u):
    if A_bar.ndim == 3:
        x = jnp.einsum("hnm,...hm->...hn", A_bar, x) + B_bar * u[..., None]
    else:
        x = A_bar * x + B_bar * u[..., None]
    y = jnp.sum(C * x, axis=-1).real.astype(u.dtype)
    if D is not None:
        y = y + D * u
    return x, y


def ssm_step(A_bar, B_bar, C, x, u, D=None):
    """One step of the discrete SSM's recurrent mode (S4, Gu et al. 2022, eq. (3)).

    x_t = Ā x_{t-1} + B̄ u_t,  y_t = Re(C x_t) + D u_t, independently for each channel h.

    Args:
      A_bar: (H, N) diagonal or (H, N, N) dense discrete state matrix.
      B_bar: (H, N); C: (H, N) (real or complex).
      x: (Bt, H, N) previous state x_{t-1} (zeros at the start), in the state dtype
        (result_type(A_bar, B_bar, u)).
      u: (Bt, H) real input at time t.
      D: optional scalar or (H,) skip connection.

    Returns:
      (x_t, y_t): the new state (Bt, H, N) and the output (Bt, H) in u's dtype (+ D's promotion).
    """
    u = jnp.asarray(u)
    if u.ndim != 2:
        raise ValueError(f"ssm_step: u must be (batch, channels), got shape {u.shape}")
    A_bar, B_bar, C = _check_recurrent(A_bar, B_bar, C, D, u.shape[1], "ssm_step")
    if jnp.shape(x) != u.shape + (C.shape[1],):
        raise ValueError(f"ssm_step: x must be (Bt, H, N) = {u.shape + (C.shape[1],)}, got "
                         f"shape {jnp.shape(x)}")
    return _step(A_bar, B_bar, C, D, x, u)


def ssm_scan_reference(A_bar, B_bar, C, u, D=None, x0=None):
    """The discrete SSM run step by step (recurrent mode) over a whole sequence, with `lax.scan`.

    y_t = Re(C x_t) + D u_t,  x_t = Ā x_{t-1} + B̄ u_t,  x_{-1} = x0 (zeros by default). With zero
    x0 this equals `causal_conv(u, K) + D u` for K_l = Re(C Ā^l B̄) (e.g. `s4d_kernel`).

    Args:
      A_bar: (H, N) diagonal or (H, N, N) dense; B_bar, C: (H, N).
      u: (Bt, L, H) real input.
      D: optional scalar or (H,).
      x0: optional (Bt, H, N) initial state.

    Returns:
      (y, x_last): (Bt, L, H) outputs in u's dtype and the final state (Bt, H, N).
    """
    u = jnp.asarray(u)
    if u.ndim != 3:
        raise ValueError(f"ssm_scan_reference: u must be (batch, length, channels), got shape {u.shape}")
    A_bar, B_bar, C = _check_recurrent(A_bar, B_bar, C, D, u.shape[2], "ssm_scan_reference")
    Bt, _, H = u.shape
    N = C.shape[1]
    state_dtype = jnp.result_type(A_bar, B_bar, u)
    if x0 is None:
        x0 = jnp.zeros((Bt, H, N), state_dtype)
    elif jnp.shape(x0) != (Bt, H, N):
        raise ValueError(f"ssm_scan_reference: x0 must be (Bt, H, N) = {(Bt, H, N)}, got "
                         f"shape {jnp.shape(x0)}")
    x0 = jnp.asarray(x0).astype(state_dtype)

    def body(x, u_t):
        return _step(A_bar, B_bar, C, D, x, u_t)

    x_last, ys = lax.scan(body, x0, jnp.swapaxes(u, 0, 1))
    return jnp.swapaxes(ys, 0, 1), x_last
