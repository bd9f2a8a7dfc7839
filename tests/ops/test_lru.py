"""jaxmodels.ops.lru against a float64 NumPy loop: parallel == chunked == step-by-step, gradients included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops.lru import lru_chunked, lru_init, lru_init_state, lru_lambda, lru_parallel, lru_step


def _params(seed, N, H):
    rng = np.random.default_rng(seed)
    nu_log = np.log(rng.uniform(0.05, 1.0, N))
    theta_log = np.log(rng.uniform(0.1, 3.0, N))
    gamma_log = rng.uniform(-1.0, 0.0, N)
    B = (rng.standard_normal((N, H)) + 1j * rng.standard_normal((N, H))) / np.sqrt(2 * H)
    C = (rng.standard_normal((H, N)) + 1j * rng.standard_normal((H, N))) / np.sqrt(N)
    D = rng.standard_normal(H)
    return nu_log, theta_log, gamma_log, B, C, D


def _np_lru(u, nu_log, theta_log, gamma_log, B, C, D):
    """float64 loop of x_t = λ x_{t-1} + γ B u_t, y_t = Re(C x_t) + D u_t."""
    lam = np.exp(-np.exp(nu_log) + 1j * np.exp(theta_log))
    gamma = np.exp(gamma_log)
    b, L, H = u.shape
    x = np.zeros((b, len(nu_log)), complex)
    y = np.zeros((b, L, H))
    for t in range(L):
        x = lam * x + gamma * (u[:, t] @ B.T)
        y[:, t] = np.real(x @ C.T) + D * u[:, t]
    return y, x


def _all_forms(u, nu_log, theta_log, gamma_log, B, C, D, chunk_size=3):
    args = (nu_log, theta_log, gamma_log, B, C, D)
    y_par, x_par = jax.jit(lambda u, *a: lru_parallel(u, *a, return_last_state=True))(u, *args)
    y_chk, x_chk = jax.jit(lambda u, *a: lru_chunked(u, *a, chunk_size=chunk_size, return_last_state=True))(u, *args)
    x = lru_init_state(u.shape[0], len(nu_log), jnp.complex128 if u.dtype == np.float64 else jnp.complex64)
    ys, step = [], jax.jit(lru_step)
    for t in range(u.shape[1]):
        y_t, x = step(x, u[:, t], *args)
        ys.append(y_t)
    return (y_par, x_par), (y_chk, x_chk), (jnp.stack(ys, 1), x)


@pytest.mark.parametrize("shape", [(2, 11, 3, 4), (1, 8, 2, 5)])
def test_three_forms_equal_numpy_float64(shape):
    b, L, H, N = shape
    params = _params(L, N, H)
    u = np.random.default_rng(L + 1).standard_normal((b, L, H))
    y_ref, x_ref = _np_lru(u, *params)
    with jax.enable_x64(True):
        forms = _all_forms(u, *params)
    for y, x in forms:
        assert y.shape == (b, L, H) and y.dtype == jnp.float64 and x.dtype == jnp.complex128
        np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(x), x_ref, rtol=1e-10, atol=1e-12)


def test_float32_forms_agree_and_keep_dtype():
    params = [np.asarray(p, np.complex64 if np.iscomplexobj(p) else np.float32) for p in _params(3, 6, 4)]
    u = np.random.default_rng(4).standard_normal((2, 20, 4)).astype(np.float32)
    y_ref, _ = _np_lru(u.astype(np.float64), *[p.astype(np.complex128 if np.iscomplexobj(p) else np.float64)
                                               for p in params])
    for y, x in _all_forms(u, *params, chunk_size=6):
        assert y.dtype == jnp.float32 and x.dtype == jnp.complex64
        np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-4, atol=1e-4)


def test_gradients_match_numpy_finite_differences():
    """d(sum w * y)/d(params, u) of the three forms == central differences of the float64 NumPy loop."""
    b, L, H, N = 1, 7, 2, 3
    nu_log, theta_log, gamma_log, B, C, D = _params(5, N, H)
    rng = np.random.default_rng(6)
    u = rng.standard_normal((b, L, H))
    w = rng.standard_normal((b, L, H))
    flat = [u, nu_log, theta_log, gamma_log, B.real, B.imag, C.real, C.imag, D]

    def unpack(p, xp):
        u, nu, th, ga, Br, Bi, Cr, Ci, D = p
        return u, nu, th, ga, Br + 1j * Bi, Cr + 1j * Ci, D

    def np_loss(p):
        return float(np.sum(w * _np_lru(*unpack(p, np))[0]))

    eps = 1e-6
    fd = []
    for i, x in enumerate(flat):
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            plus = [p.copy() for p in flat]
            minus = [p.copy() for p in flat]
            plus[i][idx] += eps
            minus[i][idx] -= eps
            g[idx] = (np_loss(plus) - np_loss(minus)) / (2 * eps)
        fd.append(g)

    with jax.enable_x64(True):
        def loss(p, form):
            u, nu, th, ga, B, C, D = unpack(p, jnp)
            if form == "parallel":
                y = lru_parallel(u, nu, th, ga, B, C, D)
            elif form == "chunked":
                y = lru_chunked(u, nu, th, ga, B, C, D, chunk_size=2)
            else:
                x, ys = jnp.zeros((b, N), jnp.complex128), []
                for t in range(L):
                    y_t, x = lru_step(x, u[:, t], nu, th, ga, B, C, D)
                    ys.append(y_t)
                y = jnp.stack(ys, 1)
            return jnp.sum(w * y)

        for form in ("parallel", "chunked", "step"):
            grads = jax.jit(jax.grad(loss), static_argnums=1)([jnp.asarray(x) for x in flat], form)
            for g, ref in zip(grads, fd):
                np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-6, atol=1e-7)


def test_lambda_and_ring_init():
    nu_log, theta_log, gamma_log = lru_init(jax.random.key(0), 4096, r_min=0.4, r_max=0.9, max_phase=np.pi / 10)
    assert nu_log.shape == theta_log.shape == gamma_log.shape == (4096,) and nu_log.dtype == jnp.float32
    lam = np.asarray(lru_lambda(nu_log, theta_log))
    r, phase = np.abs(lam), np.angle(lam)
    assert r.min() >= 0.4 - 1e-6 and r.max() <= 0.9 + 1e-6
    assert phase.min() >= 0 and phase.max() <= np.pi / 10 + 1e-6
    # |λ|² uniform on [r_min², r_max²] (Lemma 3.2): its mean is the midpoint.
    assert abs(np.mean(r**2) - (0.4**2 + 0.9**2) / 2) < 0.01
    np.testing.assert_allclose(np.exp(np.asarray(gamma_log)), np.sqrt(1 - r**2), rtol=1e-4)
    # Stable for any real parameters.
    assert np.all(np.abs(np.asarray(lru_lambda(np.array([-5.0, 0.0, 3.0]), np.zeros(3)))) < 1)


def test_gamma_normalises_state_variance():
    """With γ = sqrt(1 - |λ|²) and white unit input, E|x_t|² -> |B row|² for every λ (§3.4)."""
    nu_log, theta_log, gamma_log = lru_init(jax.random.key(1), 3, r_min=0.9, r_max=0.99)
    B = np.ones((3, 1), np.complex64)
    u = jax.random.normal(jax.random.key(2), (1000, 300, 1))
    _, x = jax.jit(lambda *a: lru_parallel(*a, return_last_state=True))(u, nu_log, theta_log, gamma_log, B,
                                                                        np.zeros((1, 3), np.complex64))
    var = np.mean(np.abs(np.asarray(x)) ** 2, axis=0)
    radius = np.abs(np.asarray(lru_lambda(nu_log, theta_log)))
    expected = 1 - radius ** (2 * 300)   # finite-horizon sum, -> 1
    np.testing.assert_allclose(var, expected, rtol=0.1)


def test_bad_inputs_raise():
    nu_log, theta_log, gamma_log, B, C, D = _params(7, 3, 2)
    u = np.zeros((1, 4, 2))
    with pytest.raises(ValueError, match=r"u must be 3-D"):
        lru_parallel(u[0], nu_log, theta_log, gamma_log, B, C, D)
    with pytest.raises(ValueError, match=r"B must be \(N, H\)"):
        lru_parallel(u, nu_log, theta_log, gamma_log, B.T, C, D)
    with pytest.raises(ValueError, match=r"C must be \(H, N\)"):
        lru_chunked(u, nu_log, theta_log, gamma_log, B, C.T, D, chunk_size=2)
    with pytest.raises(ValueError, match="theta_log"):
        lru_parallel(u, nu_log, theta_log[:2], gamma_log, B, C, D)
    with pytest.raises(ValueError, match="D must be"):
        lru_parallel(u, nu_log, theta_log, gamma_log, B, C, D[:1])
    with pytest.raises(ValueError, match="chunk_size"):
        lru_chunked(u, nu_log, theta_log, gamma_log, B, C, D, chunk_size=0)
    with pytest.raises(TypeError, match="real floating"):
        lru_parallel(u.astype(np.int32), nu_log, theta_log, gamma_log, B, C, D)
    with pytest.raises(ValueError, match="state must be"):
        lru_step(np.zeros((1, 4), complex), u[:, 0], nu_log, theta_log, gamma_log, B, C, D)
    with pytest.raises(ValueError, match="r_min"):
        lru_init(jax.random.key(0), 4, r_min=0.9, r_max=0.5)
    with pytest.raises(ValueError, match="state_size"):
        lru_init(jax.random.key(0), 0)
