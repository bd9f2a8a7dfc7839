"""jaxmodels.ops.ssm against closed forms and float64 NumPy/SciPy references; conv mode == recurrent mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.test_util import check_grads

from jaxmodels.ops.ssm import (
    c_tilde_to_c,
    causal_conv,
    discretize_bilinear,
    discretize_zoh,
    hippo_fout,
    hippo_lagt,
    hippo_legs,
    hippo_legt,
    nplr_legs,
    s4_kernel,
    s4d_kernel,
    ssm_scan_reference,
    ssm_step,
)

HIPPOS = {"legs": hippo_legs, "legt": hippo_legt, "lagt": hippo_lagt, "fout": hippo_fout}


def _stable_dense(seed, N):
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((N, N))
    return M - (np.abs(np.linalg.eigvals(M)).max() + 0.5) * np.eye(N), rng.standard_normal(N)


def _s4d_params(seed, H, N):
    rng = np.random.default_rng(seed)
    Lambda = -rng.uniform(0.1, 1.0, (H, N)) + 1j * np.pi * rng.uniform(0, 4, (H, N))
    B = rng.standard_normal((H, N)) + 1j * rng.standard_normal((H, N))
    C = rng.standard_normal((H, N)) + 1j * rng.standard_normal((H, N))
    step = rng.uniform(0.01, 0.2, H)
    return Lambda, B, C, step


def _np_kernel(Lambda, B, C, step, L):
    """float64 loop: K[h, l] = Re Σ_n C B̄ Ā^l with ZOH Ā = exp(ΔΛ), B̄ = (Ā - 1)/Λ B."""
    H, N = Lambda.shape
    K = np.zeros((H, L))
    for h in range(H):
        dA = np.exp(step[h] * Lambda[h])
        dB = (dA - 1) / Lambda[h] * B[h]
        for l in range(L):
            K[h, l] = np.real(np.sum(C[h] * dB * dA ** l))
    return K


def _np_causal_conv(u, K):
    Bt, L, H = u.shape
    y = np.zeros((Bt, L, H))
    for t in range(L):
        for l in range(min(t + 1, K.shape[1])):
            y[:, t] += K[:, l] * u[:, t - l]
    return y


# ------------------------------------------------------------------------------------ HiPPO


def test_legs_closed_form():
    N = 7
    A, B = hippo_legs(N)
    expected = np.zeros((N, N))
    for n in range(N):
        for k in range(N):
            if n > k:
                expected[n, k] = -np.sqrt(2 * n + 1) * np.sqrt(2 * k + 1)
            elif n == k:
                expected[n, k] = -(n + 1)
    assert A.dtype == np.float64 and B.dtype == np.float64
    np.testing.assert_allclose(A, expected, rtol=1e-14)
    np.testing.assert_allclose(B, np.sqrt(2 * np.arange(N) + 1), rtol=1e-14)


def test_lagt_closed_form():
    A, B = hippo_lagt(4)
    np.testing.assert_array_equal(A, -np.tril(np.ones((4, 4))) + 0.5 * np.eye(4))
    np.testing.assert_array_equal(B, np.ones(4))


def test_fout_structure():
    A, B = hippo_fout(5)
    S = A + np.outer(B, B)
    np.testing.assert_allclose(S, -S.T, atol=1e-14)
    np.testing.assert_allclose(B, [1, np.sqrt(2), 0, np.sqrt(2), 0])
    assert np.isclose(S[1, 2], 2 * np.pi) and np.isclose(S[3, 4], 4 * np.pi)


@pytest.mark.parametrize("name", sorted(HIPPOS))
@pytest.mark.parametrize("N", [1, 3, 9, 33])
def test_hippo_stable(name, N):
    A, B = HIPPOS[name](N)
    assert A.shape == (N, N) and B.shape == (N,)
    assert np.all(np.isfinite(A)) and np.all(np.isfinite(B))
    assert np.linalg.eigvals(A).real.max() < -1e-3


def test_hippo_bad_sizes():
    for f in HIPPOS.values():
        for bad, error in ((0, ValueError), (-2, ValueError), (2.5, TypeError), (True, TypeError)):
            with pytest.raises(error, match=f"state size N must be a positive int, got {bad!r}"):
                f(bad)
    with pytest.raises(ValueError, match="odd"):
        hippo_fout(4)


# ------------------------------------------------------------------------------------ NPLR


@pytest.mark.parametrize("N", [1, 4, 16])
def test_nplr_legs(N):
    A, B = hippo_legs(N)
    Lambda, P, Bt, V = nplr_legs(N)
    np.testing.assert_allclose(V.conj().T @ V, np.eye(N), atol=1e-12)
    np.testing.assert_allclose(Lambda.real, -0.5, atol=1e-12)
    # A = V (Λ - P P*) V*
    np.testing.assert_allclose(V @ (np.diag(Lambda) - np.outer(P, P.conj())) @ V.conj().T, A, atol=1e-10)
    p = V @ P  # back in the original basis: real sqrt(n + 1/2) (up to rounding)
    np.testing.assert_allclose(p, np.sqrt(np.arange(N) + 0.5), atol=1e-10)
    np.testing.assert_allclose(V @ Bt, B, atol=1e-10)
    normal = A + np.outer(p.real, p.real)
    np.testing.assert_allclose(normal @ normal.T, normal.T @ normal, atol=1e-9)
    np.testing.assert_allclose(normal + 0.5 * np.eye(N), -(normal + 0.5 * np.eye(N)).T, atol=1e-12)


# ------------------------------------------------------------------------------ discretisation


def test_zoh_dense_vs_expm():
    A, B = _stable_dense(0, 5)
    step = 0.3
    with jax.enable_x64(True):
        dA, dB = discretize_zoh(A, B, step)
        dA2, dB2 = discretize_zoh(A, np.stack([B, 2 * B], 1), step)
    ref_A = scipy.linalg.expm(step * A)
    ref_B = np.linalg.solve(A, (ref_A - np.eye(5)) @ B)
    np.testing.assert_allclose(np.asarray(dA), ref_A, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dB), ref_B, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dB2), np.stack([ref_B, 2 * ref_B], 1), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dA2), ref_A, rtol=1e-10, atol=1e-12)


def test_zoh_dense_singular_A():
    with jax.enable_x64(True):
        dA, dB = discretize_zoh(np.zeros((3, 3)), np.ones(3), 0.25)
    np.testing.assert_allclose(np.asarray(dA), np.eye(3), atol=1e-14)
    np.testing.assert_allclose(np.asarray(dB), 0.25 * np.ones(3), atol=1e-14)


def test_bilinear_dense_vs_formula():
    A, B = _stable_dense(1, 5)
    step = 0.2
    with jax.enable_x64(True):
        dA, dB = discretize_bilinear(A, B, step)
    back = np.linalg.inv(np.eye(5) - step / 2 * A)
    np.testing.assert_allclose(np.asarray(dA), back @ (np.eye(5) + step / 2 * A), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dB), back @ (step * B), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("discretize", [discretize_zoh, discretize_bilinear])
@pytest.mark.parametrize("complex_", [False, True])
def test_diagonal_matches_dense(discretize, complex_):
    rng = np.random.default_rng(2)
    lam = -rng.uniform(0.1, 2.0, 4) + (1j * rng.uniform(-3, 3, 4) if complex_ else 0)
    B = rng.standard_normal(4) + (1j * rng.standard_normal(4) if complex_ else 0)
    with jax.enable_x64(True):
        dA_diag, dB_diag = discretize(lam, B, 0.15)
        dA_dense, dB_dense = discretize(np.diag(lam), B, 0.15)
    np.testing.assert_allclose(np.diag(np.asarray(dA_dense)), np.asarray(dA_diag), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dA_dense) - np.diag(np.diag(np.asarray(dA_dense))), 0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dB_dense), np.asarray(dB_diag), rtol=1e-10, atol=1e-12)
    if discretize is discretize_zoh:
        np.testing.assert_allclose(np.asarray(dA_diag), np.exp(0.15 * lam), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(dB_diag), (np.exp(0.15 * lam) - 1) / lam * B, rtol=1e-12)


def test_discretize_errors():
    for f in (discretize_zoh, discretize_bilinear):
        with pytest.raises(ValueError, match="square"):
            f(np.zeros((3, 4)), np.ones(3), 0.1)
        with pytest.raises(ValueError, match="B must be"):
            f(np.eye(3), np.ones(4), 0.1)
        with pytest.raises(ValueError, match="A must be"):
            f(np.zeros((2, 2, 2)), np.ones(2), 0.1)
        for bad in (0.0, -0.1):
            with pytest.raises(ValueError, match="> 0"):
                f(np.eye(2), np.ones(2), bad)
        with pytest.raises(ValueError, match="scalar"):
            f(np.eye(2), np.ones(2), np.array([0.1, 0.2]))


# ------------------------------------------------------------------------- kernel and modes


def test_s4d_kernel_vs_numpy():
    Lambda, B, C, step = _s4d_params(3, H=3, N=4)
    L = 17
    with jax.enable_x64(True):
        K = s4d_kernel(Lambda, B, C, step, L)
        K1 = s4d_kernel(Lambda[1], B[1], C[1], step[1], L)  # no channel dim
    assert K.shape == (3, L) and K.dtype == jnp.float64 and K1.shape == (L,)
    ref = _np_kernel(Lambda, B, C, step, L)
    np.testing.assert_allclose(np.asarray(K), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(K1), ref[1], rtol=1e-10, atol=1e-12)
    # Scalar step broadcast over channels.
    with jax.enable_x64(True):
        Ks = s4d_kernel(Lambda, B, C, 0.05, L)
    np.testing.assert_allclose(np.asarray(Ks), _np_kernel(Lambda, B, C, np.full(3, 0.05), L),
                               rtol=1e-10, atol=1e-12)


def test_causal_conv_vs_numpy():
    rng = np.random.default_rng(4)
    u = rng.standard_normal((2, 11, 3))
    for Lk in (11, 5, 20):
        K = rng.standard_normal((3, Lk))
        with jax.enable_x64(True):
            y = causal_conv(u, K)
        assert y.shape == u.shape
        np.testing.assert_allclose(np.asarray(y), _np_causal_conv(u, K), rtol=1e-10, atol=1e-12)


def test_conv_mode_equals_recurrent_mode_float64():
    Lambda, B, C, step = _s4d_params(5, H=3, N=4)
    rng = np.random.default_rng(5)
    u = rng.standard_normal((2, 24, 3))
    D = rng.standard_normal(3)
    with jax.enable_x64(True):
        K = s4d_kernel(Lambda, B, C, step, 24)
        y_conv = causal_conv(u, K) + D * u
        dA = np.exp(step[:, None] * Lambda)
        dB = (dA - 1) / Lambda * B
        y_rec, x_last = ssm_scan_reference(dA, dB, C, u, D=D)
        # ssm_step, one step at a time, from zeros, and the vmapped discretisation agree too.
        dA_v, dB_v = jax.vmap(discretize_zoh)(Lambda, B, step)
        x = jnp.zeros((2, 3, 4), jnp.complex128)
        ys = []
        for t in range(24):
            x, y_t = ssm_step(dA_v, dB_v, C, x, u[:, t], D=D)
            ys.append(y_t)
    np.testing.assert_allclose(np.asarray(dA_v), dA, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(y_conv), np.asarray(y_rec), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(np.stack([np.asarray(y) for y in ys], 1), np.asarray(y_rec), rtol=1e-9,
                               atol=1e-10)
    np.testing.assert_allclose(np.asarray(x), np.asarray(x_last), rtol=1e-12, atol=1e-12)


def test_dense_recurrence_matches_dense_kernel():
    """Dense (H, N, N) Ā in the scan: y = conv with K_l = C Ā^l B̄ built by explicit powers."""
    A, B = hippo_legs(4)
    rng = np.random.default_rng(6)
    C = rng.standard_normal((1, 4))
    u = rng.standard_normal((1, 10, 1))
    with jax.enable_x64(True):
        dA, dB = discretize_bilinear(A, B, 0.1)
        y_rec, _ = ssm_scan_reference(dA[None], dB[None], C, u)
    dA, dB = np.asarray(dA), np.asarray(dB)
    K = np.array([[C[0] @ np.linalg.matrix_power(dA, l) @ dB for l in range(10)]])
    np.testing.assert_allclose(np.asarray(y_rec), _np_causal_conv(u, K), rtol=1e-10, atol=1e-12)


def test_conv_mode_equals_recurrent_mode_float32_jit():
    Lambda, B, C, step = _s4d_params(7, H=2, N=8)
    u = np.random.default_rng(7).standard_normal((2, 32, 2)).astype(np.float32)
    kernel = jax.jit(s4d_kernel, static_argnums=4)(Lambda.astype(np.complex64), B.astype(np.complex64),
                                                   C.astype(np.complex64), step.astype(np.float32), 32)
    assert kernel.dtype == jnp.float32
    y_conv = jax.jit(causal_conv)(u, kernel)
    dA = np.exp(step[:, None] * Lambda)
    y_rec, _ = ssm_scan_reference(dA.astype(np.complex64), ((dA - 1) / Lambda * B).astype(np.complex64),
                                  C.astype(np.complex64), u)
    assert y_conv.dtype == jnp.float32 and y_rec.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y_conv), np.asarray(y_rec), rtol=1e-3, atol=1e-3)


def test_conv_gradients_vs_finite_differences():
    Lambda, B, C, step = _s4d_params(8, H=2, N=2)
    u = np.random.default_rng(8).standard_normal((1, 6, 2))

    def f(u, C_re, C_im, step):
        return causal_conv(u, s4d_kernel(Lambda, B, C_re + 1j * C_im, step, 6))

    with jax.enable_x64(True):
        check_grads(f, (u, C.real, C.imag, step), order=1, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


def test_kernel_and_conv_errors():
    Lambda, B, C, step = _s4d_params(9, H=2, N=3)
    with pytest.raises(ValueError, match="same shape"):
        s4d_kernel(Lambda, B[:, :2], C, step, 4)
    with pytest.raises(ValueError, match="step"):
        s4d_kernel(Lambda, B, C, step[:1], 4)
    with pytest.raises(ValueError, match="> 0"):
        s4d_kernel(Lambda, B, C, -step, 4)
    with pytest.raises(ValueError, match="length"):
        s4d_kernel(Lambda, B, C, step, 0)
    with pytest.raises(ValueError, match=r"\(N,\) or \(H, N\)"):
        s4d_kernel(Lambda[None], B[None], C[None], step, 4)
    with pytest.raises(ValueError, match="batch, length, channels"):
        causal_conv(np.zeros((4, 2)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="kernel must be"):
        causal_conv(np.zeros((1, 4, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="channels"):
        ssm_scan_reference(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((1, 4, 5)))
    with pytest.raises(ValueError, match="A_bar"):
        ssm_scan_reference(np.zeros((2, 4)), np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((1, 4, 2)))
    with pytest.raises(ValueError, match="x must be"):
        ssm_step(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((1, 2, 4)), np.zeros((1, 2)))


# ------------------------------------------------------------------------------ S4 (DPLR) kernel


def _np_dense_bilinear_kernel(A, B, C, step, L):
    """float64: K_l = Re(C Ā^l B̄) with the dense bilinear Ā, B̄, by explicit powers."""
    eye = np.eye(A.shape[0])
    back = eye - step / 2 * A
    dA = np.linalg.solve(back, eye + step / 2 * A)
    dB = np.linalg.solve(back, step * B)
    return np.array([np.real(C @ np.linalg.matrix_power(dA, l) @ dB) for l in range(L)])


def _dplr_params(seed, H, N, r):
    rng = np.random.default_rng(seed)
    Lambda, B, C, step = _s4d_params(seed, H, N)
    P = (rng.standard_normal((H, r, N)) + 1j * rng.standard_normal((H, r, N))) * 0.3
    Q = (rng.standard_normal((H, r, N)) + 1j * rng.standard_normal((H, r, N))) * 0.3
    return Lambda, P, Q, B, C, step


@pytest.mark.parametrize("L", [16, 13])
def test_s4_kernel_legs_equals_dense_unrolled_kernel(L):
    """NPLR-LegS: A = Λ - P P* materialised densely, discretised, powered == Algorithm 1 (even and odd L)."""
    nplr = nplr_legs(6)
    C = np.random.default_rng(L).standard_normal(6) + 1j * np.random.default_rng(L + 1).standard_normal(6)
    with jax.enable_x64(True):
        K = jax.jit(s4_kernel, static_argnums=6)(nplr.Lambda, nplr.P, nplr.P, nplr.B, C, 0.1, L)
    assert K.shape == (L,) and K.dtype == jnp.float64
    A = np.diag(nplr.Lambda) - np.outer(nplr.P, nplr.P.conj())
    np.testing.assert_allclose(np.asarray(K), _np_dense_bilinear_kernel(A, nplr.B, C, 0.1, L), rtol=1e-9,
                               atol=1e-12)
    # In the original (real) basis, A V-rotates back to HiPPO-LegS: same kernel from the real system.
    A_legs, B_legs = hippo_legs(6)
    C_real = C @ nplr.V.conj().T
    np.testing.assert_allclose(np.asarray(K), _np_dense_bilinear_kernel(A_legs, B_legs, C_real, 0.1, L),
                               rtol=1e-8, atol=1e-11)


def test_s4_kernel_rank_r_per_channel_and_c_tilde():
    H, N, r, L = 3, 5, 2, 12
    Lambda, P, Q, B, C, step = _dplr_params(11, H, N, r)
    A = np.stack([np.diag(Lambda[h]) - P[h].T @ Q[h].conj() for h in range(H)])
    C_tilde = []
    for h in range(H):
        back = np.eye(N) - step[h] / 2 * A[h]
        dA = np.linalg.solve(back, np.eye(N) + step[h] / 2 * A[h])
        C_tilde.append(C[h] - C[h] @ np.linalg.matrix_power(dA, L))
    kernel = jax.jit(s4_kernel, static_argnums=6, static_argnames="c_tilde")
    with jax.enable_x64(True):
        K = kernel(Lambda, P, Q, B, C, step, L)
        K_tilde = kernel(Lambda, P, Q, B, np.stack(C_tilde), step, L, c_tilde=True)
        dA = jax.vmap(discretize_bilinear)(A, B, step)[0]
        C_back = jax.jit(c_tilde_to_c, static_argnums=2)(dA, np.stack(C_tilde), L)
    assert K.shape == (H, L)
    for h in range(H):
        ref = _np_dense_bilinear_kernel(A[h], B[h], C[h], step[h], L)
        np.testing.assert_allclose(np.asarray(K[h]), ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(K_tilde), np.asarray(K), rtol=1e-9, atol=1e-12)
    assert C_back.shape == (H, N) and C_back.dtype == jnp.complex128
    np.testing.assert_allclose(np.asarray(C_back), C, rtol=1e-9, atol=1e-10)   # C = C̃ (I - Ā^L)⁻¹


def test_s4_kernel_without_low_rank_equals_s4d_bilinear_and_recurrence():
    """S4 kernel (P = 0) == S4D bilinear Vandermonde kernel == the unrolled recurrence, same system."""
    Lambda, B, C, step = _s4d_params(12, H=2, N=4)
    L = 20
    u = np.random.default_rng(12).standard_normal((2, L, 2))
    @jax.jit
    def all_three(Lambda, B, C, step, u):
        K_s4 = s4_kernel(Lambda, jnp.zeros_like(Lambda), jnp.zeros_like(Lambda), B, C, step, L)
        K_s4d = s4d_kernel(Lambda, B, C, step, L, discretization="bilinear")
        dA, dB = jax.vmap(discretize_bilinear)(Lambda, B, step)
        return K_s4, K_s4d, ssm_scan_reference(dA, dB, C, u)[0], causal_conv(u, K_s4)

    with jax.enable_x64(True):
        K_s4, K_s4d, y_rec, y_conv = all_three(Lambda, B, C, step, u)
    np.testing.assert_allclose(np.asarray(K_s4), np.asarray(K_s4d), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(K_s4d), np.stack(
        [_np_dense_bilinear_kernel(np.diag(Lambda[h]), B[h], C[h], step[h], L) for h in range(2)]),
        rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(y_conv), np.asarray(y_rec), rtol=1e-9, atol=1e-10)


def test_s4_kernel_dense_recurrence_equals_conv_float32_jit():
    nplr = nplr_legs(8)
    H, L = 2, 32
    rng = np.random.default_rng(13)
    C = (rng.standard_normal((H, 8)) + 1j * rng.standard_normal((H, 8))).astype(np.complex64)
    tile = lambda x: np.broadcast_to(x, (H, 8)).astype(np.complex64)
    step = np.array([0.05, 0.2], np.float32)
    K = jax.jit(s4_kernel, static_argnums=6)(tile(nplr.Lambda), tile(nplr.P), tile(nplr.P), tile(nplr.B), C,
                                             step, L)
    assert K.dtype == jnp.float32
    u = rng.standard_normal((1, L, H)).astype(np.float32)
    A = np.diag(nplr.Lambda) - np.outer(nplr.P, nplr.P.conj())
    ref = np.stack([_np_dense_bilinear_kernel(A, nplr.B, C[h].astype(complex), float(step[h]), L)
                    for h in range(H)])
    np.testing.assert_allclose(np.asarray(K), ref, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(causal_conv(u, K)), _np_causal_conv(u.astype(float), ref),
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("r,c_tilde", [(1, False), (1, True), (2, True)])
def test_s4_kernel_gradients(r, c_tilde):
    """Gradients through Cauchy + Woodbury (rank 1: a division; rank 2: a solve) + FFT, and the C̃
    correction when C is not C̃, vs finite differences."""
    Lambda, P, Q, B, C, step = _dplr_params(14, H=1, N=3, r=r)

    def f(lam_re, p_re, c_im, step):
        return s4_kernel(lam_re + 1j * Lambda.imag, p_re + 1j * P.imag, Q, B, C.real + 1j * c_im, step, 6,
                         c_tilde=c_tilde)

    with jax.enable_x64(True):
        check_grads(jax.jit(f), (Lambda.real, P.real, C.imag, step), order=1, modes=("rev",), atol=1e-5,
                    rtol=1e-5)


def test_s4d_bilinear_and_s4_kernel_errors():
    Lambda, P, Q, B, C, step = _dplr_params(15, H=2, N=3, r=1)
    with pytest.raises(ValueError, match="discretization"):
        s4d_kernel(Lambda, B, C, step, 4, discretization="euler")
    with pytest.raises(ValueError, match="P and Q"):
        s4_kernel(Lambda, P, Q[:, :, :2], B, C, step, 4)
    with pytest.raises(ValueError, match="P and Q"):
        s4_kernel(Lambda, P[0], Q[0], B, C, step, 4)
    with pytest.raises(ValueError, match="same shape"):
        s4_kernel(Lambda, P, Q, B[:, :2], C, step, 4)
    with pytest.raises(ValueError, match="length"):
        s4_kernel(Lambda, P, Q, B, C, step, 0)
    with pytest.raises(ValueError, match="step"):
        s4_kernel(Lambda, P, Q, B, C, step[:1], 4)
    with pytest.raises(ValueError, match="> 0"):
        s4_kernel(Lambda, P, Q, B, C, -step, 4)
    with pytest.raises(ValueError, match="c_tilde_to_c: A_bar"):
        c_tilde_to_c(np.zeros((2, 3, 3)), C[:, :2], 4)
    with pytest.raises(ValueError, match="length must be a positive int, got 0"):
        c_tilde_to_c(np.zeros((2, 3, 3)), C, 0)
