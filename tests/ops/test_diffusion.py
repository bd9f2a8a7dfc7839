"""jaxmodels.ops.diffusion against float64 NumPy transcriptions of the papers' formulas, and every sampler
driven by the exact denoiser of Gaussian data (mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu)) must reproduce
the data's mean and covariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate

from jaxmodels.ops import diffusion as df

MU = np.array([0.5, -0.3])
SIGMA = np.array([[0.8, 0.3], [0.3, 0.5]])
N_SAMPLES = 4000


def gaussian_denoiser(mu=MU, cov=SIGMA):
    """E[x0 | x0 + sigma eps = x] for x0 ~ N(mu, cov), in float32 JAX."""
    mu32, cov32 = jnp.asarray(mu, jnp.float32), jnp.asarray(cov, jnp.float32)

    def denoiser(x, sigma):
        gain = cov32 @ jnp.linalg.inv(cov32 + jnp.square(sigma)[:, None, None] * jnp.eye(2))
        return mu32 + jnp.einsum("bij,bj->bi", gain, x - mu32)

    return denoiser


def gaussian_velocity(x, t):
    """Exact rectified-flow velocity E[eps - x0 | x_t] for x0 ~ N(MU, SIGMA), x_t = (1 - t) x0 + t eps."""
    tt = t[:, None, None]
    cinv = jnp.linalg.inv((1 - tt) ** 2 * SIGMA + tt ** 2 * jnp.eye(2))
    r = x - (1 - t)[:, None] * MU
    ex0 = MU + (1 - t)[:, None] * jnp.einsum("ij,bjk,bk->bi", SIGMA, cinv, r)
    eeps = t[:, None] * jnp.einsum("bij,bj->bi", cinv, r)
    return eeps - ex0


def _noise(seed=0, n=N_SAMPLES):
    return jax.random.normal(jax.random.key(seed), (n, 2), jnp.float32)


def _euler_expected_cov(sigmas):
    """Covariance produced by Euler steps of the EDM ODE (= DDIM, eta = 0) on Gaussian data, float64: per
    eigenvalue lam of SIGMA, x - mu is multiplied by (lam + s_t s_s) / (lam + s_t^2) per step."""
    lam, V = np.linalg.eigh(SIGMA)
    var = np.full(2, float(sigmas[0]) ** 2)
    for a, b in zip(np.asarray(sigmas[:-1], np.float64), np.asarray(sigmas[1:], np.float64)):
        var *= ((lam + a * b) / (lam + a * a)) ** 2
    return V @ np.diag(var) @ V.T


def _ddpm_expected_cov(ab, eta):
    """Covariance of DDIM(eta) (eta = 1: DDPM) on Gaussian data, by the float64 variance recursion of
    Song et al. eq. 12 in the eigenbasis (z_T ~ N(0, 1))."""
    lam, V = np.linalg.eigh(SIGMA)
    ab = np.append(np.asarray(ab, np.float64), 1.0)
    var = np.ones(2)
    for a_t, a_s in zip(ab[:-1], ab[1:]):
        k = lam / (lam + (1 - a_t) / a_t)  # x0_hat - mu = k (z / sqrt(a_t) - mu)
        sig2 = eta ** 2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
        c_eps = np.sqrt(max(1 - a_s - sig2, 0.0)) / np.sqrt(1 - a_t)
        gain = np.sqrt(a_s) * k / np.sqrt(a_t) + c_eps * (1 - k)
        var = gain ** 2 * var + sig2
    return V @ np.diag(var) @ V.T


def _np_sde(kind, t):
    """float64 (m, s, f, g^2) of the VP (beta 0.1..20) / VE (sigma 0.01..50) SDEs (Song et al. eq. 9, 11, 29-30)."""
    if kind == "vp":
        m = np.exp(-0.25 * t ** 2 * 19.9 - 0.05 * t)
        beta = 0.1 + 19.9 * t
        return m, np.sqrt(1 - m ** 2), -0.5 * beta, beta
    s = 0.01 * 5000.0 ** t
    return 1.0, s, 0.0, 2 * s ** 2 * np.log(5000.0)


def _pf_euler_expected_cov(kind, num_steps, t_eps=1e-3):
    """Covariance from Euler on the probability-flow ODE + final denoising, for Gaussian data, float64: in the
    eigenbasis the score is (k - 1)(x - m mu) / s^2 with k = lam / (lam + (s / m)^2)."""
    lam, V = np.linalg.eigh(SIGMA)
    ts = np.linspace(1.0, t_eps, num_steps + 1)
    var = np.full(2, _np_sde(kind, 1.0)[1] ** 2)
    for t, t_next in zip(ts[:-1], ts[1:]):
        m, s, f, g2 = _np_sde(kind, t)
        k = lam / (lam + (s / m) ** 2)
        var *= (1 + (t_next - t) * (f - 0.5 * g2 * (k - 1) / s ** 2)) ** 2
    m, s, _, _ = _np_sde(kind, ts[-1])
    var *= (lam / (lam + (s / m) ** 2) / m) ** 2
    return V @ np.diag(var) @ V.T


def assert_gaussian_moments(samples, cov=SIGMA, mu=MU):
    """Sample mean and covariance within 4 standard errors of (mu, cov)."""
    x = np.asarray(samples, np.float64)
    n = x.shape[0]
    assert np.all(np.isfinite(x))
    se_mean = np.sqrt(np.diag(cov) / n)
    np.testing.assert_array_less(np.abs(x.mean(0) - mu), 4 * se_mean)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov ** 2) / n)
    np.testing.assert_array_less(np.abs(np.cov(x.T) - cov), 4 * se_cov)


# ------------------------------------------------------------------------------------- schedules


def test_beta_schedules_against_numpy():
    T = 1000
    np.testing.assert_allclose(df.beta_schedule("linear", T), np.linspace(1e-4, 0.02, T), rtol=1e-6)
    sd = df.beta_schedule("scaled_linear", T, beta_start=0.00085, beta_end=0.012)
    np.testing.assert_allclose(sd, np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T) ** 2, rtol=1e-6)
    # Nichol & Dhariwal eq. 17, transcribed as a loop.
    f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
    ref = [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]
    np.testing.assert_allclose(df.beta_schedule("cosine", T), ref, rtol=1e-5, atol=1e-9)
    ab = np.asarray(df.alphas_cumprod(df.beta_schedule("cosine", T)), np.float64)
    np.testing.assert_allclose(ab[:900], [f(t + 1) / f(0) for t in range(900)], rtol=1e-4)
    for name in df.BETA_SCHEDULES:
        ab = np.asarray(df.alphas_cumprod(df.beta_schedule(name, T)))
        assert ab.dtype == np.float32 and np.all(np.diff(ab) < 0) and ab[0] < 1 and ab[-1] >= 0


def test_schedule_errors():
    with pytest.raises(ValueError, match="schedule='sigmoid' is not valid; choose one of"):
        df.beta_schedule("sigmoid", 10)
    with pytest.raises(ValueError, match="num_timesteps must be a positive int, got 0"):
        df.beta_schedule("linear", 0)
    with pytest.raises(TypeError, match="num_steps must be a positive int, got 2.0"):
        df.flow_timesteps(2.0)
    with pytest.raises(ValueError, match="num_steps"):
        df.edm_sigmas(0)
    with pytest.raises(ValueError, match="num_steps"):
        df.spaced_timesteps(10, 11)
    with pytest.raises(ValueError, match="1-D"):
        df.alphas_cumprod(jnp.ones((2, 3)))


def test_snr_sigma_conversions():
    ab = np.random.default_rng(0).uniform(0.01, 0.99, 50)
    np.testing.assert_allclose(df.snr(ab), ab / (1 - ab), rtol=1e-5)
    np.testing.assert_allclose(df.log_snr(ab), np.log(ab / (1 - ab)), rtol=1e-5, atol=1e-6)
    sigma = df.alpha_bar_to_sigma(ab)
    np.testing.assert_allclose(sigma, np.sqrt((1 - ab) / ab), rtol=1e-5)
    np.testing.assert_allclose(df.sigma_to_alpha_bar(sigma), ab, rtol=1e-5)
    np.testing.assert_allclose(df.snr(ab), 1 / np.asarray(sigma, np.float64) ** 2, rtol=1e-5)
    table = df.alphas_cumprod(df.beta_schedule("linear", 1000))
    ts = np.array([0, 3, 250, 999])
    np.testing.assert_allclose(df.sigma_to_timestep(df.alpha_bar_to_sigma(table[ts]), table), ts, atol=2e-3)
    np.testing.assert_array_equal(df.spaced_timesteps(1000, 5), [999, 749, 500, 250, 0])


def test_vp_ve_marginals_and_coefficients():
    beta = lambda s: 0.1 + s * (20.0 - 0.1)
    for t in (0.0, 0.1, 0.5, 1.0):
        m, s = df.vp_marginal(t)
        np.testing.assert_allclose(m, np.exp(-0.5 * scipy.integrate.quad(beta, 0, t)[0]), rtol=1e-5)
        np.testing.assert_allclose(m ** 2 + s ** 2, 1.0, rtol=1e-6)
        np.testing.assert_allclose(df.ve_marginal(t)[1], 0.01 * 5000.0 ** t, rtol=1e-5)
    # the SDE coefficients generate the marginals: dm/dt = f m, d(s^2)/dt = 2 f s^2 + g^2 (Sarkka & Solin eq. 5.51)
    h = 1e-3
    for sde in (df.vp_sde(), df.ve_sde()):
        for t in (0.2, 0.7):
            f, g = (np.float64(v) for v in df.sde_coefficients(sde, t))
            (m0, s0), (m1, s1) = df.sde_marginal(sde, t - h), df.sde_marginal(sde, t + h)
            m, s = (np.float64(v) for v in df.sde_marginal(sde, t))
            np.testing.assert_allclose((m1 - m0) / (2 * h), f * m, rtol=2e-3, atol=1e-4)
            np.testing.assert_allclose((s1 ** 2 - s0 ** 2) / (2 * h), 2 * f * s ** 2 + g ** 2, rtol=5e-3)
    with pytest.raises(TypeError, match="SDE"):
        df.sde_marginal("vp", 0.5)
    with pytest.raises(ValueError, match="sigma_min"):
        df.ve_sde(sigma_min=10.0, sigma_max=1.0)


def test_edm_sigmas_formula():
    n, smin, smax, rho = 18, 0.002, 80.0, 7.0
    ref = [(smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in range(n)]
    s = df.edm_sigmas(n, smin, smax, rho)
    assert s.shape == (n + 1,) and s[-1] == 0
    np.testing.assert_allclose(s[:-1], ref, rtol=1e-6)
    np.testing.assert_allclose(df.edm_sigmas(1), [80.0, 0.0])


@pytest.mark.parametrize("rho", [1 / 256, 1e-3])
def test_edm_sigmas_small_rho_stays_finite(rho):
    # sigma_max^(1/rho) overflows a float here (16^256 = 2^1024); the schedule does not.
    s = np.asarray(df.edm_sigmas(4, 1.0, 16.0, rho), np.float64)
    assert np.isfinite(s).all() and s[0] == 16.0 and s[-2] == 1.0 and s[-1] == 0 and np.all(np.diff(s) < 0)


def test_shift_and_logit_normal():
    t = np.random.default_rng(1).uniform(0, 1, 100)
    for s in (1.0, 0.5, 3.0):
        np.testing.assert_allclose(df.shift_timesteps(t, s), s * t / (1 + (s - 1) * t), rtol=1e-6)
    np.testing.assert_allclose(df.shift_timesteps(t, 3.0), t * 3 / (1 + 2 * t), rtol=1e-6)
    assert np.all(np.asarray(df.shift_timesteps(t, 3.0)) >= t)
    np.testing.assert_allclose(df.flow_timesteps(4, 2.0), [1.0, 6 / 7, 2 / 3, 0.4, 0.0], rtol=1e-6)
    u = np.asarray(df.logit_normal_timesteps(jax.random.key(0), (20000,), 0.5, 0.8), np.float64)
    logit = np.log(u / (1 - u))
    assert abs(logit.mean() - 0.5) < 4 * 0.8 / np.sqrt(20000) and abs(logit.std() - 0.8) < 0.02
    with pytest.raises(ValueError, match="shift"):
        df.shift_timesteps(t, 0.0)


# ----------------------------------------------------------------------------- noising, conversions


def _path_sample(seed, shape=(5, 3, 2)):
    rng = np.random.default_rng(seed)
    x0, eps = rng.standard_normal(shape), rng.standard_normal(shape)
    alpha, sigma = rng.uniform(0.2, 1.0, shape[0]), rng.uniform(0.1, 2.0, shape[0])
    return x0, eps, alpha, sigma


def _representations(x0, eps, alpha, sigma):
    a, s = alpha.reshape(-1, 1, 1), sigma.reshape(-1, 1, 1)
    return {"x0": x0, "eps": eps, "score": -eps / s, "v": a * eps - s * x0, "velocity": eps - x0}


def test_convert_prediction_round_trips():
    for seed in range(3):
        x0, eps, alpha, sigma = _path_sample(seed)
        x_t = alpha[:, None, None] * x0 + sigma[:, None, None] * eps
        reps = _representations(x0, eps, alpha, sigma)
        for source in df.PREDICTIONS:
            for target in df.PREDICTIONS:
                out = df.convert_prediction(jnp.asarray(reps[source]), jnp.asarray(x_t), alpha, sigma,
                                            source=source, target=target)
                np.testing.assert_allclose(out, reps[target], rtol=1e-4, atol=1e-4, err_msg=f"{source}->{target}")
    with pytest.raises(ValueError, match="source='noise' is not valid; choose one of"):
        df.convert_prediction(x_t, x_t, alpha, sigma, source="noise", target="x0")
    with pytest.raises(ValueError, match="shape"):
        df.convert_prediction(x_t[:, :2], x_t, alpha, sigma, source="eps", target="x0")


def test_forward_noising():
    x0, eps, _, sigma = _path_sample(4)
    ab = np.random.default_rng(5).uniform(0.05, 0.95, 5)
    np.testing.assert_allclose(df.ddpm_noise(x0, eps, ab),
                               np.sqrt(ab)[:, None, None] * x0 + np.sqrt(1 - ab)[:, None, None] * eps,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(df.edm_noise(x0, eps, sigma), x0 + sigma[:, None, None] * eps, rtol=1e-5, atol=1e-6)
    t = ab
    np.testing.assert_allclose(df.flow_noise(x0, eps, t), (1 - t)[:, None, None] * x0 + t[:, None, None] * eps,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="per-example"):
        df.edm_noise(x0, eps, sigma[:3])
    with pytest.raises(ValueError, match="noise must have"):
        df.edm_noise(x0, eps[:, :1], sigma)


@pytest.mark.parametrize("path", df.PATHS)
@pytest.mark.parametrize("prediction", df.PREDICTIONS)
def test_denoiser_from_model_recovers_x0(path, prediction):
    """An oracle network returning the exact prediction for the path's input gives D(x, sigma) = x0."""
    x0, eps, _, sigma = _path_sample(7)
    alpha = {"vp": 1 / np.sqrt(1 + sigma ** 2), "ve": np.ones_like(sigma), "rf": 1 / (1 + sigma)}[path]
    sigma_t = alpha * sigma
    time = {"vp": sigma, "ve": sigma, "rf": sigma / (1 + sigma)}[path]
    truth = _representations(x0, eps, alpha, sigma_t)[prediction]
    x_path = alpha[:, None, None] * x0 + sigma_t[:, None, None] * eps

    def oracle(x_in, c):
        np.testing.assert_allclose(x_in, x_path, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c, time, rtol=1e-6)
        return jnp.asarray(truth, jnp.float32)

    D = df.denoiser_from_model(oracle, prediction=prediction, path=path)
    np.testing.assert_allclose(D(jnp.asarray(x0 + sigma[:, None, None] * eps, jnp.float32), jnp.asarray(sigma)),
                               x0, rtol=1e-4, atol=2e-4)


def test_velocity_from_denoiser_matches_exact_velocity():
    x = np.random.default_rng(3).standard_normal((6, 2)).astype(np.float32)
    t = jnp.asarray([0.01, 0.2, 0.5, 0.7, 0.9, 0.98], jnp.float32)
    v = df.velocity_from_denoiser(gaussian_denoiser())(jnp.asarray(x), t)
    np.testing.assert_allclose(v, gaussian_velocity(jnp.asarray(x), t), rtol=1e-3, atol=1e-3)


def test_edm_preconditioning_table_and_unit_variance():
    sd = 0.5
    sigma = np.exp(np.random.default_rng(0).normal(-1.2, 1.2, 64))
    c_skip, c_out, c_in, c_noise = (np.float64(np.asarray(c)) for c in df.edm_preconditioning(sigma, sd))
    np.testing.assert_allclose(c_skip, sd ** 2 / (sigma ** 2 + sd ** 2), rtol=1e-6)
    np.testing.assert_allclose(c_out, sigma * sd / np.sqrt(sigma ** 2 + sd ** 2), rtol=1e-6)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(sd ** 2 + sigma ** 2), rtol=1e-6)
    np.testing.assert_allclose(c_noise, np.log(sigma) / 4, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(df.edm_loss_weight(sigma, sd), 1 / c_out ** 2, rtol=1e-5)
    # Var[c_in x] = 1 and Var[(x0 - c_skip x) / c_out] = 1 when Var[x0] = sd^2 (EDM App. B.6), in closed form ...
    np.testing.assert_allclose(c_in ** 2 * (sd ** 2 + sigma ** 2), 1.0, rtol=1e-5)
    np.testing.assert_allclose(((1 - c_skip) ** 2 * sd ** 2 + c_skip ** 2 * sigma ** 2) / c_out ** 2, 1.0, rtol=1e-5)
    # ... and by Monte Carlo for one sigma.
    rng = np.random.default_rng(1)
    x0, n = sd * rng.standard_normal(200000), rng.standard_normal(200000)
    s = 1.7
    cs, co, _, _ = df.edm_preconditioning(s, sd)
    assert abs(np.std((x0 - float(cs) * (x0 + s * n)) / float(co)) - 1) < 0.01


def test_edm_loss_is_unit_weight_loss_on_raw_network():
    rng = np.random.default_rng(2)
    x0, noise = (jnp.asarray(rng.standard_normal((8, 4)), jnp.float32) for _ in range(2))
    sigma = jnp.asarray(np.exp(rng.normal(-1.2, 1.2, 8)), jnp.float32)
    W = jnp.asarray(rng.standard_normal((4, 4)) * 0.3, jnp.float32)
    F = lambda x, c: x @ W + c[:, None]
    loss = df.edm_loss(df.edm_denoiser(F), x0, None, sigma=sigma, noise=noise)
    c_skip, c_out, c_in, c_noise = df.edm_preconditioning(sigma)
    x = x0 + sigma[:, None] * noise
    target = (x0 - c_skip[:, None] * x) / c_out[:, None]
    np.testing.assert_allclose(loss, jnp.mean((F(c_in[:, None] * x, c_noise) - target) ** 2, axis=1), rtol=1e-4)
    assert loss.dtype == jnp.float32 and loss.shape == (8,)


# ------------------------------------------------------------------------------------------ losses


def test_min_snr_weight_formula():
    s = np.exp(np.random.default_rng(0).uniform(-5, 5, 100))
    for gamma in (1.0, 5.0):
        np.testing.assert_allclose(df.min_snr_weight(s, gamma, "x0"), np.minimum(s, gamma), rtol=1e-6)
        np.testing.assert_allclose(df.min_snr_weight(s, gamma, "eps"), np.minimum(s, gamma) / s, rtol=1e-6)
        np.testing.assert_allclose(df.min_snr_weight(s, gamma, "v"), np.minimum(s, gamma) / (s + 1), rtol=1e-6)
    with pytest.raises(ValueError, match="target"):
        df.min_snr_weight(s, 5.0, "score")


def _linear(params, x, c):
    return x @ params["W"] + c[:, None] * params["b"]


def _np_weighted_mse_grad(u, c, scale, offset, target, weight):
    """float64 loss sum_i w_i mean_d((offset_i + scale_i (u_i W + c_i b) - target_i)^2) is computed by the
    caller; this returns its gradient w.r.t. (W, b) for a model with output offset + scale * linear."""

    def grads(W, b):
        pred = offset + scale[:, None] * (u @ W + c[:, None] * b)
        r = 2.0 / u.shape[1] * weight[:, None] * (pred - target) * scale[:, None]
        return u.T @ r, (c[:, None] * r).sum(0)

    return grads


def _loss_case(name, rng):
    """(jax loss of params, float64 NumPy gradient function) for each loss, with fixed noise and levels."""
    B, d = 6, 3
    x0 = rng.standard_normal((B, d))
    noise = rng.standard_normal((B, d))
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    if name.startswith("ddpm"):
        target = name.split("_")[1]
        table = np.asarray(df.alphas_cumprod(df.beta_schedule("cosine", 100)), np.float64)
        t = rng.integers(0, 100, B)
        ab = table[t]
        z = np.sqrt(ab)[:, None] * x0 + np.sqrt(1 - ab)[:, None] * noise
        tgt = {"eps": noise, "x0": x0, "v": np.sqrt(ab)[:, None] * noise - np.sqrt(1 - ab)[:, None] * x0}[target]
        s = ab / (1 - ab)
        w = {"eps": np.minimum(s, 5) / s, "x0": np.minimum(s, 5), "v": np.minimum(s, 5) / (s + 1)}[target]
        loss = lambda p: df.ddpm_loss(lambda x, tt: _linear(p, x, tt.astype(jnp.float32) / 100), f32(x0), None,
                                      table, target=target, min_snr_gamma=5.0, t=jnp.asarray(t), noise=f32(noise))
        return loss, _np_weighted_mse_grad(z, t / 100, np.ones(B), 0.0, tgt, w)
    if name == "edm":
        sigma = np.exp(rng.normal(-1.2, 1.2, B))
        sd = 0.5
        c_skip, c_out = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / np.sqrt(sigma ** 2 + sd ** 2)
        c_in = 1 / np.sqrt(sigma ** 2 + sd ** 2)
        x = x0 + sigma[:, None] * noise
        w = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        loss = lambda p: df.edm_loss(df.edm_denoiser(lambda u, c: _linear(p, u, c)), f32(x0), None,
                                     sigma=f32(sigma), noise=f32(noise))
        return loss, _np_weighted_mse_grad(c_in[:, None] * x, np.log(sigma) / 4, c_out, c_skip[:, None] * x, x0, w)
    if name == "flow":
        t = rng.uniform(0, 1, B)
        x_t = (1 - t)[:, None] * x0 + t[:, None] * noise
        loss = lambda p: df.flow_matching_loss(lambda x, tt: _linear(p, x, tt), f32(x0), None, t=f32(t),
                                               noise=f32(noise))
        return loss, _np_weighted_mse_grad(x_t, t, np.ones(B), 0.0, noise - x0, np.ones(B))
    t = rng.uniform(0.05, 1, B)  # score matching, VP
    m = np.exp(-0.25 * t ** 2 * 19.9 - 0.05 * t)
    s = np.sqrt(1 - m ** 2)
    x_t = m[:, None] * x0 + s[:, None] * noise
    loss = lambda p: df.score_matching_loss(lambda x, tt: _linear(p, x, tt), f32(x0), None, df.vp_sde(), t=f32(t),
                                            noise=f32(noise))
    return loss, _np_weighted_mse_grad(x_t, t, s, 0.0, -noise, np.ones(B))


@pytest.mark.parametrize("name", ["ddpm_eps", "ddpm_x0", "ddpm_v", "edm", "flow", "score"])
def test_loss_gradients_match_float64_reference(name):
    rng = np.random.default_rng(hash(name) % 2 ** 32)
    loss_fn, ref_grads = _loss_case(name, rng)
    W, b = rng.standard_normal((3, 3)) * 0.5, rng.standard_normal(3) * 0.5
    params = {"W": jnp.asarray(W, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
    per_example = loss_fn(params)
    assert per_example.shape == (6,) and per_example.dtype == jnp.float32
    g = jax.grad(lambda p: jnp.sum(loss_fn(p)))(params)
    gW, gb = ref_grads(W, b)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in g.values())
    np.testing.assert_allclose(g["W"], gW, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(g["b"], gb, rtol=2e-3, atol=2e-4)


def test_losses_draw_from_key_and_check_inputs():
    x0 = jnp.ones((4, 2, 3))
    key = jax.random.key(0)
    table = df.alphas_cumprod(df.beta_schedule("linear", 50))
    zero = lambda x, c: jnp.zeros_like(x)
    for loss in (df.ddpm_loss(zero, x0, key, table), df.edm_loss(zero, x0, key),
                 df.flow_matching_loss(zero, x0, key, t_sampling="uniform", shift=3.0),
                 df.score_matching_loss(zero, x0, key, df.ve_sde())):
        assert loss.shape == (4,) and loss.dtype == jnp.float32 and np.all(np.isfinite(loss))
    np.testing.assert_allclose(df.edm_loss(zero, x0, key, sigma=jnp.full((4,), 0.5)),
                               (0.25 + 0.25) / (0.25 * 0.25) * 1.0, rtol=1e-6)  # lambda(sigma) |x0|^2
    bf16 = df.flow_matching_loss(zero, x0.astype(jnp.bfloat16), key)
    assert bf16.dtype == jnp.float32  # losses are accumulated in float32 whatever the input dtype
    with pytest.raises(ValueError, match="key is required"):
        df.edm_loss(zero, x0, None)
    with pytest.raises(ValueError, match="target"):
        df.ddpm_loss(zero, x0, key, table, target="score")
    with pytest.raises(ValueError, match="t must have shape"):
        df.flow_matching_loss(zero, x0, key, t=jnp.ones((3,)))
    with pytest.raises(ValueError, match="t_sampling"):
        df.flow_matching_loss(zero, x0, key, t_sampling="beta")


# ---------------------------------------------------------------------------------------- samplers


def _ab_steps(num_steps, schedule="cosine"):
    return df.alphas_cumprod(df.beta_schedule(schedule, 1000))[df.spaced_timesteps(1000, num_steps)]


def test_ddpm_and_ddim_gaussian_moments():
    D = gaussian_denoiser()
    ab = _ab_steps(50)
    z = _noise()
    key = jax.random.key(1)
    ddpm = jax.jit(lambda z: df.ddpm_sample(D, z, ab, key=key))(z)
    assert ddpm.shape == z.shape and ddpm.dtype == jnp.float32
    assert_gaussian_moments(ddpm, _ddpm_expected_cov(ab, 1.0))
    assert_gaussian_moments(df.ddim_sample(D, z, ab, eta=0.5, key=key), _ddpm_expected_cov(ab, 0.5))
    assert_gaussian_moments(df.ddim_sample(D, z, ab), _ddpm_expected_cov(ab, 0.0))
    # the discretised samplers are close to the data distribution itself (first order in the step)
    np.testing.assert_allclose(_ddpm_expected_cov(ab, 1.0), SIGMA, rtol=0.12)
    np.testing.assert_allclose(_ddpm_expected_cov(ab, 0.0), SIGMA, rtol=0.06)
    # DDIM with eta = 1 is DDPM's ancestral sampler (same noise draws)
    np.testing.assert_allclose(df.ddim_sample(D, z, ab, eta=1.0, key=key), ddpm, rtol=1e-4, atol=1e-4)


def test_ddim_deterministic_equals_edm_euler_and_inverts():
    D = gaussian_denoiser()
    ab = _ab_steps(50)
    z = _noise(seed=3, n=64)
    a = df.ddim_sample(D, z, ab)
    np.testing.assert_array_equal(a, df.ddim_sample(D, z, ab, eta=0.0, key=jax.random.key(9)))
    # eta = 0 is Euler on the EDM ODE with sigma = sqrt((1 - abar) / abar), x = z / sqrt(abar_T)
    sigmas = jnp.append(df.alpha_bar_to_sigma(ab), 0.0)
    np.testing.assert_allclose(a, df.edm_sample(D, z * jnp.sqrt(1 + sigmas[0] ** 2) / sigmas[0], sigmas,
                                                solver="euler"), rtol=1e-3, atol=1e-3)
    # inversion: invert, regenerate ~ original, with a first-order error (halves when the steps double)
    x0 = jnp.asarray(np.random.default_rng(0).multivariate_normal(MU, SIGMA, 64), jnp.float32)
    errs = [float(jnp.max(jnp.abs(df.ddim_sample(D, df.ddim_invert(D, x0, _ab_steps(n)), _ab_steps(n)) - x0)))
            for n in (25, 50)]
    assert errs[1] < 0.12 and 0.4 < errs[1] / errs[0] < 0.6, errs


def test_edm_samplers_gaussian_moments():
    D = gaussian_denoiser()
    z = _noise(seed=4)
    sig50 = df.edm_sigmas(50)
    assert_gaussian_moments(df.edm_sample(D, z, sig50, solver="euler"), _euler_expected_cov(sig50))
    np.testing.assert_allclose(_euler_expected_cov(df.edm_sigmas(2000)), SIGMA, rtol=5e-3)
    assert_gaussian_moments(jax.jit(lambda z: df.edm_sample(D, z, sig50))(z))
    churned = df.edm_sample(D, z, sig50, S_churn=10.0, S_tmin=0.05, S_tmax=50.0, S_noise=1.0,
                            key=jax.random.key(5))
    assert_gaussian_moments(churned)
    with pytest.raises(ValueError, match="key"):
        df.edm_sample(D, z, sig50, S_churn=1.0)
    with pytest.raises(ValueError, match="solver"):
        df.edm_sample(D, z, sig50, solver="rk4")
    with pytest.raises(ValueError, match="one step"):
        df.edm_sample(D, z, sig50[:1])


@pytest.mark.parametrize("sde", [df.vp_sde(), df.ve_sde()], ids=["vp", "ve"])
def test_sde_samplers_gaussian_moments(sde):
    D = gaussian_denoiser()
    z = _noise(seed=6)
    assert_gaussian_moments(df.reverse_sde_sample(D, z, sde, num_steps=50, key=jax.random.key(7)))
    assert_gaussian_moments(df.probability_flow_sample(D, z, sde, num_steps=50))
    euler = df.probability_flow_sample(D, z, sde, num_steps=50, solver="euler")
    assert_gaussian_moments(euler, _pf_euler_expected_cov(sde.kind, 50))
    # the Euler reference converges to the data covariance (the first-order bias is the step's, not a bug's)
    np.testing.assert_allclose(_pf_euler_expected_cov(sde.kind, 20000), SIGMA, rtol=3e-3)
    with pytest.raises(ValueError, match="num_steps"):
        df.probability_flow_sample(D, z, sde, num_steps=0)


def test_rectified_flow_gaussian_moments_and_reflow():
    z = _noise(seed=8)
    ts = df.flow_timesteps(50)
    # Euler on the exact flow is Euler on the EDM ODE with sigma = t / (1 - t) (t = 1 <-> sigma = inf)
    sig = jnp.append(jnp.asarray([1e8], jnp.float32), ts[1:-1] / (1 - ts[1:-1]))
    euler = df.rectified_flow_sample(gaussian_velocity, z, ts)
    assert_gaussian_moments(euler, _euler_expected_cov(jnp.append(sig, 0.0)))
    assert_gaussian_moments(df.rectified_flow_sample(gaussian_velocity, z, df.flow_timesteps(25, 3.0), solver="heun"))
    noise, samples = df.reflow_pairs(jax.random.key(0), lambda n: df.rectified_flow_sample(gaussian_velocity, n, ts),
                                     (16, 2))
    np.testing.assert_allclose(samples, df.rectified_flow_sample(gaussian_velocity, noise, ts), rtol=1e-6)
    loss = df.flow_matching_loss(gaussian_velocity, samples, None, noise=noise, t=jnp.full((16,), 0.5))
    assert loss.shape == (16,)


# ------------------------------------------------------------------------------------ sampler steps


def _nonlinear_denoiser(W):
    """A nonlinear D(x, sigma) = tanh(x W) / (1 + sigma) + x / (1 + sigma^2) on flattened x, as a float32 JAX
    function and its float64 NumPy twin."""
    W32 = jnp.asarray(W, jnp.float32)

    def jax_denoiser(x, sigma):
        h = x.reshape(x.shape[0], -1)
        s = sigma[:, None]
        return (jnp.tanh(h @ W32) / (1 + s) + h / (1 + s ** 2)).reshape(x.shape)

    def np_denoiser(x, sigma):
        h, s = x.reshape(x.shape[0], -1), sigma[:, None]
        return (np.tanh(h @ W) / (1 + s) + h / (1 + s ** 2)).reshape(x.shape)

    return jax_denoiser, np_denoiser


def _step_case(seed, shape):
    """Fresh (float64 x, float32 x, jax denoiser, numpy denoiser, key, float64 xi = normal(key)) for a step test."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape[1:]))
    D32, D64 = _nonlinear_denoiser(rng.standard_normal((d, d)) / np.sqrt(d))
    x = rng.standard_normal(shape)
    key = jax.random.key(seed)
    xi = np.asarray(jax.random.normal(key, shape, jnp.float32), np.float64)
    return rng, x, jnp.asarray(x, jnp.float32), D32, D64, key, xi


STEP_SHAPES = [(4, 2), (3, 2, 3, 2)]


@pytest.mark.parametrize("shape", STEP_SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_ddpm_and_ddim_steps_against_float64_equations(seed, shape):
    rng, z, z32, D32, D64, key, xi = _step_case(seed, shape)
    ab_t, ab_s = np.sort(rng.uniform(0.05, 0.95, 2))
    x0 = D64(z / np.sqrt(ab_t), np.full(shape[0], np.sqrt((1 - ab_t) / ab_t)))
    # Ho et al. eq. 6-7: the posterior q(z_s | z_t, x0_hat)
    a_ts = ab_t / ab_s
    mean = np.sqrt(ab_s) * (1 - a_ts) / (1 - ab_t) * x0 + np.sqrt(a_ts) * (1 - ab_s) / (1 - ab_t) * z
    want = mean + np.sqrt((1 - ab_s) / (1 - ab_t) * (1 - a_ts)) * xi
    np.testing.assert_allclose(df.ddpm_step(D32, z32, ab_t, ab_s, key=key), want, rtol=1e-4, atol=1e-5)
    # Song et al. eq. 12 and 16
    eps = (z - np.sqrt(ab_t) * x0) / np.sqrt(1 - ab_t)
    for eta in (0.0, 0.4, 1.0):
        sig = eta * np.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
        want = np.sqrt(ab_s) * x0 + np.sqrt(1 - ab_s - sig ** 2) * eps + sig * xi
        got = df.ddim_step(D32, z32, ab_t, ab_s, eta=eta, key=key)
        assert got.shape == shape and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"eta={eta}")
    # eta = 0 backwards (abar_s < abar_t) is the inversion step, eq. 13
    x0_s = D64(z / np.sqrt(ab_s), np.full(shape[0], np.sqrt((1 - ab_s) / ab_s)))
    eps_s = (z - np.sqrt(ab_s) * x0_s) / np.sqrt(1 - ab_s)
    np.testing.assert_allclose(df.ddim_step(D32, z32, ab_s, ab_t), np.sqrt(ab_t) * x0_s + np.sqrt(1 - ab_t) * eps_s,
                               rtol=1e-4, atol=1e-5)
    # the last step (abar_s = 1) returns x0_hat
    np.testing.assert_allclose(df.ddim_step(D32, z32, ab_t, 1.0), x0, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="key"):
        df.ddim_step(D32, z32, ab_t, ab_s, eta=0.5)


def _np_edm_step(D64, x, sigma, sigma_next, solver, gamma=0.0, S_noise=1.0, xi=None):
    """Karras et al. 2022, Algorithm 2, lines 4-11, transcribed in float64."""
    sigma_hat = sigma * (1 + gamma)
    if xi is not None:
        x = x + np.sqrt(sigma_hat ** 2 - sigma ** 2) * S_noise * xi
    b = np.full(x.shape[0], sigma_hat)
    d = (x - D64(x, b)) / sigma_hat
    x_next = x + (sigma_next - sigma_hat) * d
    if solver == "heun" and sigma_next != 0:
        d_next = (x_next - D64(x_next, np.full(x.shape[0], sigma_next))) / sigma_next
        x_next = x + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
    return x_next


@pytest.mark.parametrize("shape", STEP_SHAPES)
@pytest.mark.parametrize("solver", df.SOLVERS)
def test_edm_step_against_float64_algorithm(solver, shape):
    rng, x, x32, D32, D64, key, xi = _step_case(hash(solver) % 1000, shape)
    sigma_next, sigma = np.sort(rng.uniform(0.05, 5.0, 2))
    np.testing.assert_allclose(df.edm_step(D32, x32, sigma, sigma_next, solver=solver),
                               _np_edm_step(D64, x, sigma, sigma_next, solver), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(df.edm_step(D32, x32, sigma, 0.0, solver=solver),  # sigma_{i+1} = 0: Euler
                               _np_edm_step(D64, x, sigma, 0.0, "euler"), rtol=1e-4, atol=1e-4)
    gamma = float(df.edm_gamma(sigma, num_steps=10, S_churn=3.0, S_tmax=10.0))
    assert gamma == pytest.approx(0.3) and float(df.edm_gamma(sigma, num_steps=10, S_churn=3.0, S_tmax=0.01)) == 0
    np.testing.assert_allclose(df.edm_step(D32, x32, sigma, sigma_next, solver=solver, gamma=gamma, S_noise=1.007,
                                           key=key),
                               _np_edm_step(D64, x, sigma, sigma_next, solver, gamma, 1.007, xi), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="solver='rk4' is not valid; choose one of"):
        df.edm_step(D32, x32, sigma, sigma_next, solver="rk4")
    with pytest.raises(ValueError, match="key"):
        df.edm_step(D32, x32, sigma, sigma_next, gamma=0.2)


@pytest.mark.parametrize("shape", STEP_SHAPES)
@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_sde_steps_against_float64_equations(kind, shape):
    rng, x, x32, D32, D64, key, xi = _step_case(len(kind) + len(shape), shape)
    sde = df.vp_sde() if kind == "vp" else df.ve_sde()
    t_next, t = np.sort(rng.uniform(0.05, 1.0, 2))

    def score(y, s):  # Tweedie in the SDE's coordinates
        m, sd, _, _ = _np_sde(kind, s)
        return (m * D64(y / m, np.full(y.shape[0], sd / m)) - y) / sd ** 2

    def drift(y, s):  # probability-flow ODE, Song et al. eq. 13
        _, _, f, g2 = _np_sde(kind, s)
        return f * y - 0.5 * g2 * score(y, s)

    np.testing.assert_allclose(df.sde_score(D32, x32, t, sde=sde), score(x, t), rtol=2e-4, atol=1e-4)
    m, sd, f, g2 = _np_sde(kind, t)
    np.testing.assert_allclose(df.sde_denoise(D32, x32, t, sde=sde), D64(x / m, np.full(shape[0], sd / m)),
                               rtol=2e-4, atol=1e-4)
    dt = t - t_next  # Euler-Maruyama on Song et al. eq. 6
    want = x - (f * x - g2 * score(x, t)) * dt + np.sqrt(g2) * np.sqrt(dt) * xi
    np.testing.assert_allclose(df.reverse_sde_step(D32, x32, t, t_next, sde=sde, key=key), want, rtol=2e-4, atol=2e-4)
    euler = x + (t_next - t) * drift(x, t)
    np.testing.assert_allclose(df.probability_flow_step(D32, x32, t, t_next, sde=sde, solver="euler"), euler,
                               rtol=2e-4, atol=2e-4)
    heun = x + (t_next - t) * 0.5 * (drift(x, t) + drift(euler, t_next))
    np.testing.assert_allclose(df.probability_flow_step(D32, x32, t, t_next, sde=sde), heun, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("shape", STEP_SHAPES)
def test_flow_step_against_float64_equations(shape):
    rng, x, x32, D32, D64, _, _ = _step_case(5, shape)
    t_next, t = np.sort(rng.uniform(0.0, 1.0, 2))
    v32 = df.velocity_from_denoiser(D32)

    def v64(y, s):  # eps_hat - x0_hat on x_s = (1 - s) x0 + s eps
        return (y - D64(y / (1 - s), np.full(y.shape[0], s / (1 - s)))) / s

    euler = x + (t_next - t) * v64(x, t)
    np.testing.assert_allclose(df.flow_step(v32, x32, t, t_next), euler, rtol=1e-4, atol=1e-4)
    heun = x + (t_next - t) * 0.5 * (v64(x, t) + v64(euler, t_next))
    np.testing.assert_allclose(df.flow_step(v32, x32, t, t_next, solver="heun"), heun, rtol=1e-4, atol=1e-4)


def test_python_loops_of_steps_equal_library_samplers():
    """The diffusers habit: a hand-written loop of the public steps gives the library loop's samples."""
    D = gaussian_denoiser()
    z = _noise(seed=11, n=32)
    key = jax.random.key(12)
    ab = _ab_steps(6)
    ab_s = list(np.asarray(ab)[1:]) + [1.0]
    close = dict(rtol=1e-5, atol=1e-6)

    x, keys = z, jax.random.split(key, 6)
    for i in range(6):
        x = df.ddpm_step(D, x, ab[i], ab_s[i], key=keys[i])
    np.testing.assert_allclose(x, df.ddpm_sample(D, z, ab, key=key), **close)
    x = z
    for i in range(6):
        x = df.ddim_step(D, x, ab[i], ab_s[i], eta=0.5, key=keys[i])
    np.testing.assert_allclose(x, df.ddim_sample(D, z, ab, eta=0.5, key=key), **close)
    x = z
    for i in range(5, 0, -1):
        x = df.ddim_step(D, x, ab[i], ab[i - 1])
    np.testing.assert_allclose(x, df.ddim_invert(D, z, ab), **close)

    sigmas = df.edm_sigmas(5)
    x, keys = z * sigmas[0], jax.random.split(key, 5)
    for i in range(5):
        gamma = df.edm_gamma(sigmas[i], num_steps=5, S_churn=2.0, S_tmin=0.1)
        x = df.edm_step(D, x, sigmas[i], sigmas[i + 1], gamma=gamma, key=keys[i])
    np.testing.assert_allclose(x, df.edm_sample(D, z, sigmas, S_churn=2.0, S_tmin=0.1, key=key), rtol=1e-5, atol=1e-5)

    sde, ts = df.vp_sde(), np.linspace(1.0, 1e-3, 6, dtype=np.float32)
    x, keys = z * df.sde_marginal(sde, 1.0)[1], jax.random.split(key, 5)
    for i in range(5):
        x = df.reverse_sde_step(D, x, ts[i], ts[i + 1], sde=sde, key=keys[i])
    np.testing.assert_allclose(df.sde_denoise(D, x, ts[-1], sde=sde),
                               df.reverse_sde_sample(D, z, sde, num_steps=5, key=key), **close)
    x = z * df.sde_marginal(sde, 1.0)[1]
    for i in range(5):
        x = df.probability_flow_step(D, x, ts[i], ts[i + 1], sde=sde)
    np.testing.assert_allclose(df.sde_denoise(D, x, ts[-1], sde=sde),
                               df.probability_flow_sample(D, z, sde, num_steps=5), **close)

    ts, x = df.flow_timesteps(5, 3.0), z
    for i in range(5):
        x = df.flow_step(gaussian_velocity, x, ts[i], ts[i + 1], solver="heun")
    np.testing.assert_allclose(x, df.rectified_flow_sample(gaussian_velocity, z, ts, solver="heun"), **close)


# ---------------------------------------------------------------------------------------- guidance


def test_classifier_free_guidance():
    rng = np.random.default_rng(0)
    c, u = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    np.testing.assert_allclose(df.classifier_free_guidance(c, u, 1.0), c, rtol=1e-6)
    np.testing.assert_allclose(df.classifier_free_guidance(c, u, 0.0), u, rtol=1e-6)
    np.testing.assert_allclose(df.classifier_free_guidance(c, u, 3.5), u + 3.5 * (c - u), rtol=1e-6)

    def cond_denoiser(x, sigma, labels):  # label k shifts the mean by k
        return x / (1 + sigma[:, None] ** 2) + labels[:, None].astype(x.dtype)

    x = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
    sigma = jnp.full((4,), 0.7)
    labels = jnp.asarray([1, 2, 3, 4])
    cond = cond_denoiser(x, sigma, labels)
    np.testing.assert_allclose(df.cfg_denoiser(cond_denoiser, labels, 0, 1.0)(x, sigma), cond, rtol=1e-6)
    uncond = cond_denoiser(x, sigma, jnp.zeros(4, jnp.int32))
    np.testing.assert_allclose(df.cfg_denoiser(cond_denoiser, labels, 0, 2.0)(x, sigma), 2 * cond - uncond,
                               rtol=1e-5)


def test_drop_labels():
    labels = jnp.arange(20000) % 7
    dropped = df.drop_labels(jax.random.key(0), labels, 0.1, 7)
    frac = float(jnp.mean(dropped == 7))
    assert abs(frac - 0.1) < 4 * np.sqrt(0.09 / 20000)
    np.testing.assert_array_equal(jnp.where(dropped == 7, labels, dropped), labels)
    np.testing.assert_array_equal(df.drop_labels(jax.random.key(1), labels, 0.0, 7), labels)
    emb = jnp.ones((5, 3))
    assert np.all(np.asarray(df.drop_labels(jax.random.key(1), emb, 1.0, 0.0)) == 0)
    with pytest.raises(ValueError, match="p"):
        df.drop_labels(jax.random.key(0), labels, 1.5, 7)


def test_classifier_guidance_samples_the_posterior():
    """x0 ~ N(mu, Sigma), y = x0 + N(0, r^2 I): with the exact noisy classifier
    p(y | x_sigma) = N(y; E[x0 | x_sigma], Cov[x0 | x_sigma] + r^2 I) and scale 1, guided sampling draws
    from p(x0 | y) (Tweedie: D + sigma^2 grad log p(y | x) = E[x0 | x, y])."""
    y, r2 = np.array([1.5, 0.5]), 0.3
    D = gaussian_denoiser()

    def log_prob(x, sigma):
        s2 = jnp.square(sigma)[:, None, None]
        post_cov = SIGMA - SIGMA @ jnp.linalg.inv(SIGMA + s2 * jnp.eye(2)) @ SIGMA
        c = post_cov + r2 * jnp.eye(2)
        d = y - D(x, sigma)
        return -0.5 * jnp.einsum("bi,bij,bj->b", d, jnp.linalg.inv(c), d)

    post_cov = np.linalg.inv(np.linalg.inv(SIGMA) + np.eye(2) / r2)
    post_mean = post_cov @ (np.linalg.solve(SIGMA, MU) + y / r2)
    guided = df.classifier_guided_denoiser(D, log_prob, 1.0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2)), jnp.float32)
    s = jnp.full((3,), 0.8, jnp.float32)
    grad = jax.grad(lambda v: jnp.sum(log_prob(v, s)))(x)
    np.testing.assert_allclose(df.classifier_guided_denoiser(D, log_prob, 2.5)(x, s), D(x, s) + 2.5 * 0.64 * grad,
                               rtol=1e-5, atol=1e-6)
    samples = df.edm_sample(guided, _noise(seed=10), df.edm_sigmas(40))
    assert_gaussian_moments(samples, post_cov, post_mean)


def _zero_model(x, level):
    del level
    return jnp.zeros_like(x)


@pytest.mark.parametrize("t", [5000, 1000, -1])
def test_ddpm_loss_refuses_timesteps_outside_the_table(t):
    table = df.alphas_cumprod(df.beta_schedule("linear", 1000))
    x0, noise = jnp.ones((2, 3)), jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"t must hold values in \[0, 1000\)"):
        df.ddpm_loss(_zero_model, x0, None, table, t=jnp.array([0, t]), noise=noise)
    loss = jax.jit(lambda t: df.ddpm_loss(_zero_model, x0, None, table, t=t, noise=noise))(jnp.array([0, t]))
    assert np.isfinite(loss[0]) and np.isnan(loss[1])  # under jit: NaN for that example, documented


@pytest.mark.parametrize("loss_fn, level, good, bad, match", [
    (df.edm_loss, "sigma", 1.0, 0.0, r"sigma must hold values in \(0, inf\)"),
    (df.edm_loss, "sigma", 1.0, -1.0, r"sigma must hold values in \(0, inf\)"),
    (df.flow_matching_loss, "t", 0.5, 3.0, r"t must hold values in \[0, 1\]"),
    (df.flow_matching_loss, "t", 0.5, -0.1, r"t must hold values in \[0, 1\]"),
])
def test_losses_refuse_noise_levels_out_of_range(loss_fn, level, good, bad, match):
    x0, levels = jnp.ones((2, 3)), jnp.array([good, bad])
    with pytest.raises(ValueError, match=match):
        loss_fn(_zero_model, x0, None, **{level: levels}, noise=x0)
    loss = jax.jit(lambda v: loss_fn(_zero_model, x0, None, **{level: v}, noise=x0))(levels)
    assert np.isfinite(loss[0]) and np.isnan(loss[1])  # under jit: NaN for that example, documented


@pytest.mark.parametrize("kw, match", [
    (dict(beta_end=1.5), r"beta_end must be a real number in \(0, 1\)"),
    (dict(beta_start=0.0), r"beta_start must be a real number in \(0, 1\)"),
    (dict(max_beta=1.0), r"max_beta must be a real number in \(0, 1\)"),
    (dict(cosine_s=-0.1), r"cosine_s must be a real number in \[0, inf\)"),
])
def test_beta_schedule_refuses_betas_outside_unit_interval(kw, match):
    with pytest.raises(ValueError, match=match):
        df.beta_schedule("linear", 10, **kw)


@pytest.mark.parametrize("rho", [0, -1.0])
def test_edm_sigmas_refuses_non_positive_rho(rho):
    with pytest.raises(ValueError, match=r"rho must be a real number in \(0, inf\)"):
        df.edm_sigmas(4, rho=rho)


def test_samplers_refuse_schedules_in_the_wrong_order():
    noise = jnp.ones((2, 3))
    ab = df.alphas_cumprod(df.beta_schedule("linear", 100))[df.spaced_timesteps(100, 5)]
    with pytest.raises(ValueError, match=r"alphas_cumprod_steps \(noisiest first\) must be non-decreasing"):
        df.ddim_sample(_zero_model, noise, ab[::-1])
    with pytest.raises(ValueError, match=r"alphas_cumprod_steps must hold values in \(0, 1\]"):
        df.ddim_sample(_zero_model, noise, ab.at[0].set(0.0))
    with pytest.raises(ValueError, match="must be non-decreasing"):
        df.ddpm_sample(_zero_model, noise, ab[::-1], key=jax.random.key(0))
    with pytest.raises(ValueError, match="sigmas must be non-increasing"):
        df.edm_sample(_zero_model, noise, df.edm_sigmas(4)[::-1])
    with pytest.raises(ValueError, match=r"sigmas must hold values in \[0, inf\)"):
        df.edm_sample(_zero_model, noise, jnp.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="timesteps must be non-increasing"):
        df.rectified_flow_sample(_zero_model, noise, df.flow_timesteps(4)[::-1])
    with pytest.raises(ValueError, match=r"timesteps must hold values in \[0, 1\]"):
        df.rectified_flow_sample(_zero_model, noise, jnp.array([2.0, 0.0]))
    assert np.isfinite(df.ddim_sample(_zero_model, noise, ab)).all()  # the right order passes
