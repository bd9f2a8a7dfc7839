r"""Diffusion and flow-matching mathematics in the unified view of EDM (Karras et al. 2022, Table 1).

Every Gaussian diffusion / flow path used here is  x_t = alpha_t x0 + sigma_t eps,  eps ~ N(0, I):

  path                        alpha_t               sigma_t              EDM noise level sigma
  DDPM / VP (Ho et al. 2020)  sqrt(abar_t)          sqrt(1 - abar_t)     sqrt((1 - abar_t) / abar_t)
  VE / EDM (Song; Karras)     1                     sigma                sigma
  rectified flow (Liu; SD3)   1 - t                 t                    t / (1 - t)

Dividing by alpha_t maps any of them to EDM's x = x0 + sigma eps, sigma = sigma_t / alpha_t, so one
*denoiser* convention drives every sampler here:

    denoiser(x, sigma) -> x0 estimate D(x; sigma) = E[x0 | x0 + sigma eps = x]   (EDM eq. 2-3),
    x: (B, ...) in EDM coordinates,  sigma: (B,) float,  output: x's shape.

Networks that predict eps, x0, v (Salimans & Ho 2022), a score, or a rectified-flow velocity are turned
into a denoiser by `denoiser_from_model`; EDM-preconditioned networks by `edm_denoiser`. The one
exception is `rectified_flow_sample`, which takes a velocity function v(x_t, t) because its start t = 1
is sigma = inf (use `velocity_from_denoiser` to drive it with a denoiser on t < 1).

  piece         functions
  schedules     beta_schedule, alphas_cumprod, spaced_timesteps, vp_marginal, ve_marginal, vp_sde,
                ve_sde, sde_marginal, sde_coefficients, edm_sigmas, flow_timesteps, snr, log_snr,
                alpha_bar_to_sigma, sigma_to_alpha_bar, sigma_to_timestep
  noising       ddpm_noise (q(x_t | x0)), edm_noise (x0 + sigma eps), flow_noise ((1 - t) x0 + t eps)
  conversions   convert_prediction (eps / x0 / v / score / velocity), denoiser_from_model,
                velocity_from_denoiser, edm_preconditioning, edm_denoiser
  losses        ddpm_loss (+ min_snr_weight), edm_loss (+ edm_loss_weight, edm_sigma_sample),
                flow_matching_loss (+ logit_normal_timesteps, shift_timesteps), score_matching_loss
  sampler steps ddpm_step, ddim_step (eta; backwards with eta = 0: inversion), edm_step (Euler / Heun, churn
                gamma from edm_gamma), reverse_sde_step (Euler-Maruyama), probability_flow_step (Euler /
                Heun), sde_score, sde_denoise, flow_step (Euler / Heun)
  samplers      ddpm_sample, ddim_sample, ddim_invert, edm_sample, reverse_sde_sample, probability_flow_sample,
                rectified_flow_sample: `lax.scan` loops of the steps; reflow_pairs
  guidance      classifier_free_guidance, cfg_denoiser, drop_labels, classifier_guided_denoiser

Losses return a per-example (B,) float32 loss (the mean over non-batch dimensions of the weighted
squared error); reduce it as you like. Each sampler is a `lax.scan` over its public step function (one
step x_t -> x_{t_next}, for writing your own loop) with a static step count, so it jits (close over the
denoiser). All randomness comes from `key` arguments; a loop splits its key into one key per step.
"""

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmodels.ops.checks import monotone, one_of, positive_int, real_in_range, values_in_range

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]

# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


def beta_schedule(schedule: str, num_timesteps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02,
                  cosine_s: float = 0.008, max_beta: float = 0.999) -> jax.Array:
    """DDPM noise schedule beta_1..beta_T.

    - "linear": linspace(beta_start, beta_end, T) (Ho et al. 2020, §4: 1e-4 to 0.02, T = 1000).
    - "scaled_linear": linspace(sqrt(beta_start), sqrt(beta_end), T)^2 (Stable Diffusion, with
      beta_start = 0.00085, beta_end = 0.012).
    - "cosine": beta_t = min(1 - abar(t) / abar(t - 1), max_beta), abar(t) = f(t) / f(0),
      f(t) = cos^2(pi/2 (t/T + s) / (1 + s)), s = `cosine_s` (Nichol & Dhariwal 2021, eq. 17).

    Args:
      schedule: one of "linear", "scaled_linear", "cosine".
      num_timesteps: T, a positive int.
      beta_start, beta_end: in (0, 1) ("linear", "scaled_linear").
      cosine_s: >= 0; max_beta: in (0, 1) ("cosine").

    Returns:
      (T,) float32 betas in (0, 1); computed in float64 NumPy (they are constants).
    """
    T = positive_int("num_timesteps", num_timesteps)
    one_of("schedule", schedule, BETA_SCHEDULES)
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end), ("max_beta", max_beta)):
        real_in_range(name, value, 0, 1, include_low=False, include_high=False)
    real_in_range("cosine_s", cosine_s, 0)
    if schedule == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    else:  # cosine
        f = np.cos((np.arange(T + 1, dtype=np.float64) / T + cosine_s) / (1 + cosine_s) * np.pi / 2) ** 2
        betas = np.minimum(1.0 - f[1:] / f[:-1], max_beta)
    return jnp.asarray(betas, jnp.float32)


def alphas_cumprod(betas: jax.Array) -> jax.Array:
    """abar_t = prod_{s <= t} (1 - beta_s) (Ho et al. 2020, eq. 4). betas: (T,) -> (T,) float32, decreasing."""
    betas = jnp.asarray(betas)
    if betas.ndim != 1:
        raise ValueError(f"betas must be 1-D (T,), got shape {betas.shape}")
    return jnp.cumprod(1.0 - betas.astype(jnp.float32))


def spaced_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """`num_steps` evenly spaced integer timesteps of a T-step DDPM schedule, noisiest first.

    round(linspace(T - 1, 0, num_steps)) ("trailing" spacing, which includes t = T - 1; Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2). Use as
    `alphas_cumprod(betas)[spaced_timesteps(T, n)]` for `ddpm_sample` / `ddim_sample`.

    Returns:
      (num_steps,) int32 NumPy array, strictly decreasing (num_steps <= T).
    """
    T = positive_int("num_timesteps", num_timesteps)
    n = positive_int("num_steps", num_steps)
    if n > T:
        raise ValueError(f"num_steps must be <= num_timesteps = {T}, got {n}")
    return np.round(np.linspace(T - 1, 0, n)).astype(np.int32)


def snr(alpha_bar: jax.Array) -> jax.Array:
    """Signal-to-noise ratio abar / (1 - abar) of a VP marginal (Kingma et al. 2021, VDM eq. 2) = 1 / sigma^2."""
    alpha_bar = jnp.asarray(alpha_bar)
    return alpha_bar / (1.0 - alpha_bar)


def log_snr(alpha_bar: jax.Array) -> jax.Array:
    """log SNR = log abar - log(1 - abar) (VDM's lambda_t = -gamma(t)), computed without forming the ratio."""
    alpha_bar = jnp.asarray(alpha_bar)
    return jnp.log(alpha_bar) - jnp.log1p(-alpha_bar)


def alpha_bar_to_sigma(alpha_bar: jax.Array) -> jax.Array:
    """EDM noise level of a VP marginal: sigma = sqrt((1 - abar) / abar) (EDM Table 1, "VP" column)."""
    alpha_bar = jnp.asarray(alpha_bar)
    return jnp.sqrt((1.0 - alpha_bar) / alpha_bar)


def sigma_to_alpha_bar(sigma: jax.Array) -> jax.Array:
    """Inverse of `alpha_bar_to_sigma`: abar = 1 / (1 + sigma^2)."""
    sigma = jnp.asarray(sigma)
    return 1.0 / (1.0 + jnp.square(sigma))


def sigma_to_timestep(sigma: jax.Array, alphas_cumprod_table: jax.Array) -> jax.Array:
    """Continuous DDPM timestep of an EDM noise level: t with sigma(t) = sigma, linear in log sigma between
    the table's integer timesteps (as k-diffusion's `DiscreteSchedule.sigma_to_t`), clipped to [0, T - 1].

    Lets a network conditioned on DDPM timesteps run inside the sigma-based samplers:
    `denoiser_from_model(net, ..., noise_conditioning=lambda s: sigma_to_timestep(s, abar))`.

    Args:
      sigma: any shape, float.
      alphas_cumprod_table: (T,) decreasing abar_t.

    Returns:
      float32 timesteps with sigma's shape.
    """
    table = jnp.asarray(alphas_cumprod_table, jnp.float32)
    if table.ndim != 1:
        raise ValueError(f"alphas_cumprod_table must be 1-D (T,), got shape {table.shape}")
    log_sigmas = jnp.log(alpha_bar_to_sigma(table))
    steps = jnp.arange(table.shape[0], dtype=jnp.float32)
    return jnp.interp(jnp.log(jnp.asarray(sigma, jnp.float32)), log_sigmas, steps)


def vp_marginal(t: jax.Array, beta_min: float = 0.1, beta_max: float = 20.0) -> tuple[jax.Array, jax.Array]:
    """Marginal of the VP SDE dx = -beta(t)/2 x dt + sqrt(beta(t)) dw, beta(t) = beta_min + t (beta_max - beta_min)
    (Song et al. 2021, "Score-Based Generative Modeling through SDEs", eq. 11 and 29):

        x_t | x0 ~ N(m(t) x0, s(t)^2 I),  m(t) = exp(-t^2 (beta_max - beta_min) / 4 - t beta_min / 2),  s^2 = 1 - m^2.

    Args:
      t: time in [0, 1], any shape.

    Returns:
      (mean_coefficient m(t), std s(t)), float arrays with t's shape.
    """
    t = jnp.asarray(t, jnp.result_type(t, jnp.float32))
    log_m = -0.25 * jnp.square(t) * (beta_max - beta_min) - 0.5 * t * beta_min
    return jnp.exp(log_m), jnp.sqrt(-jnp.expm1(2.0 * log_m))


def ve_marginal(t: jax.Array, sigma_min: float = 0.01, sigma_max: float = 50.0) -> tuple[jax.Array, jax.Array]:
    """Marginal of the VE SDE dx = sqrt(d sigma^2(t)/dt) dw, sigma(t) = sigma_min (sigma_max / sigma_min)^t
    (Song et al. 2021, eq. 9 and 30): x_t | x0 ~ N(x0, sigma(t)^2 I) (the sigma_min^2 at t = 0 is dropped,
    as in their code).

    Args:
      t: time in [0, 1], any shape.

    Returns:
      (mean_coefficient = 1, std sigma(t)), float arrays with t's shape.
    """
    t = jnp.asarray(t, jnp.result_type(t, jnp.float32))
    return jnp.ones_like(t), sigma_min * (sigma_max / sigma_min) ** t


class SDE(NamedTuple):
    """A linear SDE dx = f(t) x dt + g(t) dw on t in [0, 1] (Song et al. 2021): "vp" or "ve" with its constants.

    Build with `vp_sde` / `ve_sde`; evaluate with `sde_marginal` and `sde_coefficients`.
    """
    kind: str
    beta_min: float = 0.1
    beta_max: float = 20.0
    sigma_min: float = 0.01
    sigma_max: float = 50.0


def vp_sde(beta_min: float = 0.1, beta_max: float = 20.0) -> SDE:
    """The VP SDE of Song et al. 2021 (eq. 11; DDPM's continuous limit), defaults from their Table 5."""
    if not 0 <= beta_min < beta_max:
        raise ValueError(f"vp_sde needs 0 <= beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}")
    return SDE("vp", beta_min=float(beta_min), beta_max=float(beta_max))


def ve_sde(sigma_min: float = 0.01, sigma_max: float = 50.0) -> SDE:
    """The VE SDE of Song et al. 2021 (eq. 9; SMLD's continuous limit)."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"ve_sde needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return SDE("ve", sigma_min=float(sigma_min), sigma_max=float(sigma_max))


def _check_sde(sde):
    if not isinstance(sde, SDE) or sde.kind not in ("vp", "ve"):
        raise TypeError(f"sde must be an SDE from vp_sde() or ve_sde(), got {sde!r}")


def sde_marginal(sde: SDE, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean coefficient m(t), std s(t)) of x_t | x0 ~ N(m x0, s^2 I) for `sde` (`vp_marginal` / `ve_marginal`)."""
    _check_sde(sde)
    if sde.kind == "vp":
        return vp_marginal(t, sde.beta_min, sde.beta_max)
    return ve_marginal(t, sde.sigma_min, sde.sigma_max)


def sde_coefficients(sde: SDE, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(f(t), g(t)) of dx = f(t) x dt + g(t) dw (Song et al. 2021, eq. 9 and 11).

    VP: f = -beta(t)/2, g = sqrt(beta(t)).  VE: f = 0, g = sigma(t) sqrt(2 log(sigma_max / sigma_min)).
    t: any shape; returns float arrays with t's shape.
    """
    _check_sde(sde)
    t = jnp.asarray(t, jnp.result_type(t, jnp.float32))
    if sde.kind == "vp":
        beta = sde.beta_min + t * (sde.beta_max - sde.beta_min)
        return -0.5 * beta, jnp.sqrt(beta)
    _, sigma = ve_marginal(t, sde.sigma_min, sde.sigma_max)
    return jnp.zeros_like(t), sigma * math.sqrt(2.0 * math.log(sde.sigma_max / sde.sigma_min))


def edm_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> jax.Array:
    """EDM's time steps (Karras et al. 2022, eq. 5), with the final sigma_N = 0 appended:

        sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i < N.

    Returns:
      (num_steps + 1,) float32, decreasing from sigma_max to sigma_min, then 0. num_steps = 1 gives
      [sigma_max, 0]. rho must be > 0 (the paper uses 7).
    """
    n = positive_int("num_steps", num_steps)
    real_in_range("rho", rho, 0, include_low=False)
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"edm_sigmas needs 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    # The same sum divided by sigma_max^(1/rho), which overflows a float for small rho (16^256 = 2^1024); the
    # ratio's power lies in [0, 1]. The last sigma is set exactly (its power may underflow).
    frac = np.arange(n, dtype=np.float64) / max(n - 1, 1)
    sig = sigma_max * (1 - frac * (1 - (sigma_min / sigma_max) ** (1 / rho))) ** rho
    if n > 1:
        sig[-1] = sigma_min
    return jnp.asarray(np.append(sig, 0.0), jnp.float32)


def shift_timesteps(t: jax.Array, shift: float) -> jax.Array:
    """SD3's resolution-dependent timestep shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024, "Scaling
    Rectified Flow Transformers", §5.3.2, eq. 23; s = sqrt(m / n) for m pixels vs. the base n). s = 1 is the
    identity; s > 1 moves t toward 1 (more noise). t: any shape in [0, 1]."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    t = jnp.asarray(t)
    return shift * t / (1.0 + (shift - 1.0) * t)


def flow_timesteps(num_steps: int, shift: float = 1.0) -> jax.Array:
    """Rectified-flow sampling grid: shift_timesteps(linspace(1, 0, num_steps + 1), shift), (num_steps + 1,)
    float32 from 1 (noise) to 0 (data)."""
    n = positive_int("num_steps", num_steps)
    return shift_timesteps(jnp.linspace(1.0, 0.0, n + 1, dtype=jnp.float32), shift)


# ----------------------------------------------------------------------------------------------
# Forward noising and conversions between predictions
# ----------------------------------------------------------------------------------------------


def _per_example(v, x):
    """(B,) or scalar coefficient -> broadcastable against x (B, ...)."""
    v = jnp.asarray(v)
    if v.ndim == 0:
        return v
    if v.ndim != 1 or v.shape[0] != x.shape[0]:
        raise ValueError(f"per-example coefficient must be a scalar or ({x.shape[0]},) for x of shape {x.shape}, "
                         f"got shape {v.shape}")
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


def _check_batched(x, name):
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"{name} must be (batch, ...), got a scalar")
    return x


def _check_same_shape(a, b, name_a, name_b):
    if a.shape != b.shape:
        raise ValueError(f"{name_b} must have {name_a}'s shape {a.shape}, got {b.shape}")


def ddpm_noise(x0: jax.Array, noise: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """q(x_t | x0) sample x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4).

    x0, noise: (B, ...); alpha_bar: scalar or (B,). Returns x0's shape in the result dtype.
    """
    x0 = _check_batched(x0, "x0")
    _check_same_shape(x0, noise, "x0", "noise")
    ab = _per_example(alpha_bar, x0)
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def edm_noise(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    """x = x0 + sigma eps (EDM eq. 2 with s(t) = 1). x0, noise: (B, ...); sigma: scalar or (B,)."""
    x0 = _check_batched(x0, "x0")
    _check_same_shape(x0, noise, "x0", "noise")
    return x0 + _per_example(sigma, x0) * noise


def flow_noise(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Rectified-flow interpolation x_t = (1 - t) x0 + t eps (Liu et al. 2022, eq. 1; SD3 eq. 2 "RF").
    x0, noise: (B, ...); t: scalar or (B,) in [0, 1]."""
    x0 = _check_batched(x0, "x0")
    _check_same_shape(x0, noise, "x0", "noise")
    t = _per_example(t, x0)
    return (1.0 - t) * x0 + t * noise


PREDICTIONS = ("eps", "x0", "v", "score", "velocity")


def convert_prediction(pred: jax.Array, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array, *,
                       source: str, target: str) -> jax.Array:
    r"""Converts a network prediction between parameterisations on the path x_t = alpha x0 + sigma eps.

    - "eps": eps;  "x0": x0;  "score": grad log p(x_t) = -eps / sigma (Tweedie / Vincent 2011);
    - "v": alpha eps - sigma x0 (Salimans & Ho 2022, §4, defined for alpha^2 + sigma^2 = 1; the same
      formula is used for any (alpha, sigma));
    - "velocity": eps - x0, the rectified-flow / flow-matching target (Liu et al. 2022; for the path
      alpha = 1 - t, sigma = t it is d x_t / dt).

    The source is turned into (x0, eps) exactly, using x_t, then into the target.

    Args:
      pred: (B, ...) prediction of kind `source`.
      x_t: (B, ...) the noisy input the prediction was made for.
      alpha, sigma: scalars or (B,) path coefficients at x_t's noise level (sigma > 0 unless source is x0
        and the target needs no eps).
      source, target: one of "eps", "x0", "v", "score", "velocity".

    Returns:
      (B, ...) prediction of kind `target`.
    """
    one_of("source", source, PREDICTIONS)
    one_of("target", target, PREDICTIONS)
    x_t = _check_batched(x_t, "x_t")
    _check_same_shape(x_t, jnp.asarray(pred), "x_t", "pred")
    a, s = _per_example(alpha, x_t), _per_example(sigma, x_t)
    if source == target:
        return pred
    if source == "x0":
        x0, eps = pred, (x_t - a * pred) / s
    elif source == "eps":
        x0, eps = (x_t - s * pred) / a, pred
    elif source == "score":
        eps = -s * pred
        x0 = (x_t - s * eps) / a
    elif source == "v":
        norm = a * a + s * s
        x0, eps = (a * x_t - s * pred) / norm, (s * x_t + a * pred) / norm
    else:  # velocity u = eps - x0
        x0 = (x_t - s * pred) / (a + s)
        eps = pred + x0
    return {"x0": x0, "eps": eps, "score": -eps / s, "v": a * eps - s * x0, "velocity": eps - x0}[target]


PATHS = ("vp", "ve", "rf")


def _path_from_sigma(path, sigma):
    """(alpha, sigma_t, natural time) of `path` at EDM noise level sigma (table in the module docstring)."""
    if path == "vp":
        alpha = lax.rsqrt(1.0 + jnp.square(sigma))
        return alpha, alpha * sigma, sigma
    if path == "ve":
        return jnp.ones_like(sigma), sigma, sigma
    t = sigma / (1.0 + sigma)
    return 1.0 - t, t, t


def denoiser_from_model(model: Callable, *, prediction: str, path: str,
                        noise_conditioning: Callable | None = None) -> Denoiser:
    """Wraps a network predicting eps / x0 / v / score / velocity on a VP, VE or rectified-flow path into a
    denoiser D(x, sigma) in EDM coordinates (EDM Table 1: x_path = alpha x, sigma_path = alpha sigma).

    The network is called as model(alpha * x, c) with c = noise_conditioning(sigma) (default: sigma for
    "vp" and "ve", t = sigma / (1 + sigma) for "rf"); for a network trained on integer DDPM timesteps
    pass noise_conditioning=lambda s: sigma_to_timestep(s, alphas_cumprod_table).

    Args:
      model: (x_path (B, ...), c (B,)) -> (B, ...) prediction.
      prediction: one of "eps", "x0", "v", "score", "velocity" (see `convert_prediction`).
      path: "vp" (alpha = 1/sqrt(1 + sigma^2)), "ve" (alpha = 1), "rf" (alpha = 1 / (1 + sigma)).

    Returns:
      denoiser(x (B, ...), sigma (B,)) -> x0 estimate (B, ...).
    """
    one_of("prediction", prediction, PREDICTIONS)
    one_of("path", path, PATHS)

    def denoiser(x, sigma):
        alpha, sigma_t, time = _path_from_sigma(path, sigma)
        x_t = _per_example(alpha, x) * x
        cond = time if noise_conditioning is None else noise_conditioning(sigma)
        return convert_prediction(model(x_t, cond), x_t, alpha, sigma_t, source=prediction, target="x0")

    return denoiser


def velocity_from_denoiser(denoiser: Denoiser) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Rectified-flow velocity v(x_t, t) = eps_hat - x0_hat from a denoiser, for t in [0, 1):
    x_t = (1 - t)(x0 + sigma eps) with sigma = t / (1 - t) (EDM Table 1 applied to the RF path).

    Returns:
      velocity(x_t (B, ...), t (B,)) -> (B, ...). At t = 1 (sigma = inf) it is undefined: start the grid below 1.
    """

    def velocity(x_t, t):
        t = jnp.asarray(t)
        x0 = denoiser(x_t / _per_example(1.0 - t, x_t), t / (1.0 - t))
        return (x_t - x0) / _per_example(t, x_t)  # eps_hat - x0_hat with x_t = (1 - t) x0_hat + t eps_hat

    return velocity


def edm_preconditioning(sigma: jax.Array, sigma_data: float = 0.5):
    """EDM preconditioning (Karras et al. 2022, Table 1, "Ours"):

        c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),   c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
        c_in = 1 / sqrt(sigma^2 + sigma_data^2),             c_noise = ln(sigma) / 4.

    With D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), F's input and its effective training target
    (x0 - c_skip x) / c_out both have unit variance when Var[x0] = sigma_data^2 (EDM Appendix B.6).

    Args:
      sigma: noise levels, any shape, > 0.

    Returns:
      (c_skip, c_out, c_in, c_noise), each with sigma's shape and float dtype.
    """
    sigma = jnp.asarray(sigma, jnp.result_type(sigma, jnp.float32))
    total = jnp.square(sigma) + sigma_data ** 2
    c_in = lax.rsqrt(total)
    return sigma_data ** 2 / total, sigma * sigma_data * c_in, c_in, jnp.log(sigma) / 4.0


def edm_denoiser(model: Callable, sigma_data: float = 0.5) -> Denoiser:
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM eq. 7) from a raw network F(x, c_noise).

    model: (x (B, ...), c_noise (B,)) -> (B, ...). Returns denoiser(x (B, ...), sigma (B,)) -> (B, ...).
    """

    def denoiser(x, sigma):
        c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, sigma_data)
        return _per_example(c_skip, x) * x + _per_example(c_out, x) * model(_per_example(c_in, x) * x, c_noise)

    return denoiser


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def _mse(pred, target):
    """Per-example mean over non-batch dims of (pred - target)^2, float32."""
    d = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.mean(d, axis=tuple(range(1, d.ndim)))


def _noise_and_level(key, x0, noise, level, draw_level, level_name):
    """Uses the given noise / level or draws the missing ones from `key`."""
    if noise is None or level is None:
        if key is None:
            raise ValueError(f"key is required unless both noise and {level_name} are given")
        k_level, k_noise = jax.random.split(key)
        if level is None:
            level = draw_level(k_level)
        if noise is None:
            noise = jax.random.normal(k_noise, x0.shape, jnp.float32).astype(x0.dtype)
    _check_same_shape(x0, jnp.asarray(noise), "x0", "noise")
    level = jnp.asarray(level)
    if level.shape != (x0.shape[0],):
        raise ValueError(f"{level_name} must have shape ({x0.shape[0]},), got {level.shape}")
    return noise, level


DDPM_TARGETS = ("eps", "x0", "v")


def min_snr_weight(snr_t: jax.Array, gamma: float, target: str) -> jax.Array:
    """Min-SNR-gamma loss weight (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy", §3.4): min(SNR, gamma) on the x0 loss, i.e. min(SNR, gamma) / SNR for an eps target and
    min(SNR, gamma) / (SNR + 1) for a v target. snr_t: any shape; returns float32 of the same shape."""
    one_of("target", target, DDPM_TARGETS)
    if not gamma > 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma!r}")
    snr_t = jnp.asarray(snr_t, jnp.float32)
    clipped = jnp.minimum(snr_t, gamma)
    return {"x0": clipped, "eps": clipped / snr_t, "v": clipped / (snr_t + 1.0)}[target]


def ddpm_loss(model: Callable, x0: jax.Array, key: jax.Array | None, alphas_cumprod_table: jax.Array, *,
              target: str = "eps", min_snr_gamma: float | None = None, t: jax.Array | None = None,
              noise: jax.Array | None = None) -> jax.Array:
    """DDPM training loss (Ho et al. 2020, Algorithm 1 / eq. 14 "L_simple") with an eps, x0 or v target
    (Salimans & Ho 2022) and optional min-SNR-gamma weighting (Hang et al. 2023):

        t ~ U{0..T-1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,  loss = w_t mean((model(x_t, t) - target)^2).

    Args:
      model: (x_t (B, ...), t (B,) int32) -> (B, ...) prediction of `target`.
      x0: (B, ...) data.
      key: PRNG key for t and eps (may be None when both `t` and `noise` are given).
      alphas_cumprod_table: (T,) abar_t.
      target: "eps", "x0" or "v".
      min_snr_gamma: None (w = 1) or gamma > 0 (w = `min_snr_weight`).
      t, noise: optional (B,) int timesteps in [0, T) and (B, ...) eps instead of drawing them. A t outside
        [0, T) is refused (ValueError) when concrete; under a trace its example's loss is NaN.

    Returns:
      (B,) float32 per-example loss.
    """
    one_of("target", target, DDPM_TARGETS)
    x0 = _check_batched(x0, "x0")
    table = jnp.asarray(alphas_cumprod_table, jnp.float32)
    if table.ndim != 1:
        raise ValueError(f"alphas_cumprod_table must be 1-D (T,), got shape {table.shape}")
    num_timesteps = table.shape[0]
    noise, t = _noise_and_level(key, x0, noise, t,
                                lambda k: jax.random.randint(k, (x0.shape[0],), 0, num_timesteps), "t")
    values_in_range("t", t, 0, num_timesteps)
    valid = (t >= 0) & (t < num_timesteps)
    ab = table[jnp.clip(t, 0, num_timesteps - 1)]
    x_t = ddpm_noise(x0, noise, ab)
    a, s = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
    tgt = {"eps": noise, "x0": x0, "v": _per_example(a, x0) * noise - _per_example(s, x0) * x0}[target]
    loss = _mse(model(x_t, t), tgt)
    if min_snr_gamma is not None:
        loss = loss * min_snr_weight(snr(ab), min_snr_gamma, target)
    return _nan_where_invalid(loss, valid)


def _nan_where_invalid(loss, valid):
    """The per-example loss, NaN where the example's noise level was out of range (only possible under a
    trace, where it cannot be refused): a defined result that NaN checks catch, not a silent wrong loss."""
    return jnp.where(valid, loss, jnp.nan)


def edm_sigma_sample(key: jax.Array, shape, P_mean: float = -1.2, P_std: float = 1.2) -> jax.Array:
    """EDM training noise levels ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1 "Ours"). float32."""
    return jnp.exp(P_mean + P_std * jax.random.normal(key, shape, jnp.float32))


def edm_loss_weight(sigma: jax.Array, sigma_data: float = 0.5) -> jax.Array:
    """EDM loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2 (Table 1)."""
    sigma = jnp.asarray(sigma, jnp.result_type(sigma, jnp.float32))
    return (jnp.square(sigma) + sigma_data ** 2) / jnp.square(sigma * sigma_data)


def edm_loss(denoiser: Denoiser, x0: jax.Array, key: jax.Array | None, *, sigma_data: float = 0.5,
             P_mean: float = -1.2, P_std: float = 1.2, sigma: jax.Array | None = None,
             noise: jax.Array | None = None) -> jax.Array:
    """EDM training loss (Karras et al. 2022, eq. 8 with Table 1 "Ours"):

        ln sigma ~ N(P_mean, P_std^2),  loss = lambda(sigma) mean((D(x0 + sigma eps, sigma) - x0)^2).

    With D = edm_denoiser(F, sigma_data) this equals mean((F(c_in x, c_noise) - (x0 - c_skip x) / c_out)^2).

    Args:
      denoiser: (x (B, ...), sigma (B,)) -> x0 estimate, usually `edm_denoiser(net, sigma_data)`.
      x0: (B, ...) data.
      key: PRNG key for sigma and eps (may be None when both `sigma` and `noise` are given).
      sigma, noise: optional (B,) noise levels > 0 and (B, ...) eps instead of drawing them. A sigma <= 0 is
        refused (ValueError) when concrete; under a trace its example's loss is NaN.

    Returns:
      (B,) float32 per-example loss.
    """
    x0 = _check_batched(x0, "x0")
    noise, sigma = _noise_and_level(key, x0, noise, sigma,
                                    lambda k: edm_sigma_sample(k, (x0.shape[0],), P_mean, P_std), "sigma")
    values_in_range("sigma", sigma, 0, include_low=False)
    x = edm_noise(x0, noise, sigma)
    loss = edm_loss_weight(sigma, sigma_data).astype(jnp.float32) * _mse(denoiser(x, sigma), x0)
    return _nan_where_invalid(loss, sigma > 0)


T_SAMPLINGS = ("uniform", "logit_normal")


def logit_normal_timesteps(key: jax.Array, shape, mean: float = 0.0, std: float = 1.0) -> jax.Array:
    """t = sigmoid(u), u ~ N(mean, std^2): SD3's logit-normal timestep density (Esser et al. 2024, eq. 19). float32."""
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, shape, jnp.float32))


def flow_matching_loss(velocity_fn: Callable, x0: jax.Array, key: jax.Array | None, *,
                       t_sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                       shift: float = 1.0, t: jax.Array | None = None, noise: jax.Array | None = None) -> jax.Array:
    """Conditional flow matching / rectified flow loss (Lipman et al. 2023; Liu et al. 2022, eq. 1; SD3 §2-3):

        x_t = (1 - t) x0 + t eps,  loss = mean((v(x_t, t) - (eps - x0))^2),

    t ~ U(0, 1) ("uniform") or logit-normal ("logit_normal", SD3 eq. 19), then shifted by
    `shift_timesteps(t, shift)` (SD3 eq. 23). For reflow (Liu et al. 2022, §2.3) pass the coupled
    (noise, x0) pairs from `reflow_pairs` as `noise` and `x0`.

    Args:
      velocity_fn: (x_t (B, ...), t (B,) float32) -> (B, ...) velocity.
      x0: (B, ...) data.
      key: PRNG key for t and eps (may be None when both `t` and `noise` are given).
      t, noise: optional (B,) times in [0, 1] (used as given, unshifted) and (B, ...) eps. A t outside [0, 1]
        is refused (ValueError) when concrete; under a trace its example's loss is NaN.

    Returns:
      (B,) float32 per-example loss.
    """
    one_of("t_sampling", t_sampling, T_SAMPLINGS)
    x0 = _check_batched(x0, "x0")

    def draw_t(k):
        if t_sampling == "uniform":
            u = jax.random.uniform(k, (x0.shape[0],), jnp.float32)
        else:
            u = logit_normal_timesteps(k, (x0.shape[0],), logit_mean, logit_std)
        return shift_timesteps(u, shift)

    noise, t = _noise_and_level(key, x0, noise, t, draw_t, "t")
    values_in_range("t", t, 0, 1, include_high=True)
    x_t = flow_noise(x0, noise, t)
    return _nan_where_invalid(_mse(velocity_fn(x_t, t), noise - x0), (t >= 0) & (t <= 1))


def score_matching_loss(score_fn: Callable, x0: jax.Array, key: jax.Array | None, sde: SDE, *,
                        t_eps: float = 1e-5, t: jax.Array | None = None, noise: jax.Array | None = None) -> jax.Array:
    """Denoising score matching for a VP / VE SDE (Song et al. 2021, eq. 7, lambda(t) = s(t)^2; Vincent 2011):

        t ~ U(t_eps, 1), x_t = m(t) x0 + s(t) eps,  loss = mean((s(t) score(x_t, t) + eps)^2).

    Args:
      score_fn: (x_t (B, ...), t (B,) float32) -> (B, ...) estimate of grad log p_t(x_t).
      x0: (B, ...) data.
      key: PRNG key for t and eps (may be None when both `t` and `noise` are given).
      sde: `vp_sde(...)` or `ve_sde(...)`.
      t, noise: optional (B,) times and (B, ...) eps.

    Returns:
      (B,) float32 per-example loss.
    """
    _check_sde(sde)
    x0 = _check_batched(x0, "x0")
    noise, t = _noise_and_level(
        key, x0, noise, t, lambda k: jax.random.uniform(k, (x0.shape[0],), jnp.float32, t_eps, 1.0), "t")
    m, s = sde_marginal(sde, t)
    x_t = _per_example(m, x0) * x0 + _per_example(s, x0) * noise
    return _mse(_per_example(s, x0) * score_fn(x_t, t), -noise)


# ----------------------------------------------------------------------------------------------
# Samplers: one public pure function per step, and the loops (`lax.scan` over the steps)
# ----------------------------------------------------------------------------------------------

SOLVERS = ("euler", "heun")


def _full(v, x):
    """Scalar noise level -> (B,) for calling a denoiser on x."""
    return jnp.full((x.shape[0],), v, x.dtype)


def _check_schedule(ab, name):
    ab = jnp.asarray(ab, jnp.float32)
    if ab.ndim != 1 or ab.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty 1-D array (num_steps,), got shape {ab.shape}")
    return ab


def _check_alphas_cumprod_steps(ab, name="alphas_cumprod_steps"):
    """abar at the sampling steps, noisiest first: values in (0, 1], non-decreasing (checked when concrete)."""
    ab = _check_schedule(ab, name)
    values_in_range(name, ab, 0, 1, include_low=False, include_high=True)
    monotone(f"{name} (noisiest first)", ab, decreasing=False)
    return ab


def _keys(key, n, needed, who):
    if key is None:
        if needed:
            raise ValueError(f"{who} draws noise: pass key=")
        return jnp.zeros((n, 2), jnp.uint32)  # unused placeholder scanned alongside the steps
    return jax.random.split(key, n)


def _normal(key, x):
    return jax.random.normal(key, x.shape, jnp.float32).astype(x.dtype)


def _vp_x0(denoiser, z, ab_t):
    """x0_hat = D(z_t / sqrt(abar_t), sigma_t) of z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (EDM Table 1, VP)."""
    return denoiser(z * lax.rsqrt(ab_t).astype(z.dtype), _full(jnp.sqrt((1 - ab_t) / ab_t), z))


def ddpm_step(denoiser: Denoiser, z: jax.Array, alpha_bar_t: jax.Array, alpha_bar_s: jax.Array, *,
              key: jax.Array) -> jax.Array:
    """One DDPM ancestral step z_t -> z_s (s < t, less noisy) (Ho et al. 2020, Algorithm 2; eq. 6-7): a draw
    from the Gaussian posterior q(z_s | z_t, x0_hat),

        z_s = sqrt(abar_s) beta_ts / (1 - abar_t) x0_hat + sqrt(alpha_ts) (1 - abar_s) / (1 - abar_t) z_t
              + sqrt((1 - abar_s) / (1 - abar_t) beta_ts) xi,   alpha_ts = abar_t / abar_s, beta_ts = 1 - alpha_ts,

    with x0_hat = D(z_t / sqrt(abar_t), sigma_t), sigma_t = sqrt((1 - abar_t) / abar_t), xi ~ N(0, I).
    alpha_bar_s = 1 (the last step) returns x0_hat.

    Args:
      denoiser: D(x, sigma) in EDM coordinates (module docstring).
      z: (B, ...) z_t.
      alpha_bar_t, alpha_bar_s: float scalars abar at t and s (abar_t < abar_s <= 1).
      key: PRNG key for xi.

    Returns:
      (B, ...) z_s in z's dtype.
    """
    z = _check_batched(z, "z")
    ab_t, ab_s = jnp.asarray(alpha_bar_t, jnp.float32), jnp.asarray(alpha_bar_s, jnp.float32)
    x0 = _vp_x0(denoiser, z, ab_t)
    alpha_t = ab_t / ab_s
    beta_t = 1.0 - alpha_t
    mean = (jnp.sqrt(ab_s) * beta_t / (1 - ab_t)) * x0 + (jnp.sqrt(alpha_t) * (1 - ab_s) / (1 - ab_t)) * z
    var = (1 - ab_s) / (1 - ab_t) * beta_t
    return (mean + jnp.sqrt(var) * _normal(key, z)).astype(z.dtype)


def ddim_step(denoiser: Denoiser, z: jax.Array, alpha_bar_t: jax.Array, alpha_bar_s: jax.Array, *,
              eta: float = 0.0, key: jax.Array | None = None) -> jax.Array:
    """One DDIM step z_t -> z_s (Song, Meng & Ermon 2021, eq. 12 and 16):

        z_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma_ts^2) eps_hat + sigma_ts xi,
        sigma_ts = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s),

    with x0_hat = D(z_t / sqrt(abar_t), sigma_t), eps_hat = (z_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t),
    xi ~ N(0, I). eta = 0 is deterministic (an Euler step of the probability-flow ODE in EDM coordinates,
    EDM §3) and then also runs backwards: abar_s < abar_t is a step of DDIM inversion (§4.3), z_s at a
    noisier level with eps_hat taken at the current point. eta = 1 is `ddpm_step` in distribution.

    Args:
      denoiser: D(x, sigma) in EDM coordinates.
      z: (B, ...) z_t.
      alpha_bar_t, alpha_bar_s: float scalars abar at t and s (abar_s = 1 returns x0_hat).
      eta: static Python float >= 0, the stochasticity.
      key: PRNG key for xi, required when eta > 0.

    Returns:
      (B, ...) z_s in z's dtype.
    """
    z = _check_batched(z, "z")
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    if eta > 0 and key is None:
        raise ValueError("ddim_step with eta > 0 draws noise: pass key=")
    ab_t, ab_s = jnp.asarray(alpha_bar_t, jnp.float32), jnp.asarray(alpha_bar_s, jnp.float32)
    x0 = _vp_x0(denoiser, z, ab_t)
    eps = (z - jnp.sqrt(ab_t) * x0) / jnp.sqrt(1 - ab_t)
    sig = eta * jnp.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)) if eta > 0 else 0.0
    z_s = jnp.sqrt(ab_s) * x0 + jnp.sqrt(jnp.maximum(1 - ab_s - sig ** 2, 0.0)) * eps
    if eta > 0:
        z_s = z_s + sig * _normal(key, z_s)
    return z_s.astype(z.dtype)


def edm_gamma(sigma: jax.Array, *, num_steps: int, S_churn: float, S_tmin: float = 0.0,
              S_tmax: float = float("inf")) -> jax.Array:
    """EDM's churn gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax, else 0 (Karras et al.
    2022, Algorithm 2, line 4). sigma: any shape; returns float32 with sigma's shape."""
    gamma_max = min(S_churn / positive_int("num_steps", num_steps), math.sqrt(2.0) - 1.0)
    return jnp.where((sigma >= S_tmin) & (sigma <= S_tmax), gamma_max, 0.0)


def edm_step(denoiser: Denoiser, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array, *, solver: str = "heun",
             gamma: jax.Array | float = 0.0, S_noise: float = 1.0, key: jax.Array | None = None) -> jax.Array:
    """One step of EDM's sampler sigma_i -> sigma_{i+1} (Karras et al. 2022, Algorithm 2, lines 4-11;
    Algorithm 1 without churn):

        churn (only with `key`): sigma_hat = (1 + gamma) sigma_i,
                x_hat = x + sqrt(sigma_hat^2 - sigma_i^2) S_noise eps,   eps ~ N(0, I),
        Euler:  d = (x_hat - D(x_hat, sigma_hat)) / sigma_hat,  x_next = x_hat + (sigma_{i+1} - sigma_hat) d,
        Heun (2nd order, unless sigma_{i+1} = 0):  d' = (x_next - D(x_next, sigma_{i+1})) / sigma_{i+1},
                x_next = x_hat + (sigma_{i+1} - sigma_hat) (d + d') / 2.

    Args:
      denoiser: D(x, sigma) in EDM coordinates.
      x: (B, ...) x at sigma_i.
      sigma, sigma_next: float scalars sigma_i > sigma_{i+1} >= 0.
      solver: "heun" or "euler".
      gamma: scalar churn gamma_i >= 0 (`edm_gamma`); a nonzero gamma needs `key`.
      S_noise: scale of the churn noise.
      key: PRNG key for the churn noise eps ~ N(0, I); None: no churn (Algorithm 1).

    Returns:
      (B, ...) x at sigma_{i+1} in x's dtype.
    """
    one_of("solver", solver, SOLVERS)
    if key is None and not (isinstance(gamma, (int, float)) and gamma == 0):
        raise ValueError("edm_step with churn (gamma) draws noise: pass key=")
    x = _check_batched(x, "x")
    sigma, sigma_next = jnp.asarray(sigma, jnp.float32), jnp.asarray(sigma_next, jnp.float32)
    x_hat, sigma_hat = x, sigma
    if key is not None:
        sigma_hat = sigma * (1.0 + gamma)
        # sqrt(sigma_hat^2 - sigma^2), written so that gamma = 0 gives exactly 0 (no fused-rounding NaN)
        x_hat = x + sigma * jnp.sqrt(gamma * (2.0 + gamma)) * S_noise * _normal(key, x)

    def derivative(y, s):
        return (y - denoiser(y, _full(s, y))) / s

    d = derivative(x_hat, sigma_hat)
    x_next = x_hat + (sigma_next - sigma_hat) * d
    if solver == "heun":
        safe = jnp.where(sigma_next > 0, sigma_next, 1.0)
        d_next = derivative(x_next, safe)
        x_next = jnp.where(sigma_next > 0, x_hat + (sigma_next - sigma_hat) * 0.5 * (d + d_next), x_next)
    return x_next.astype(x.dtype)


def sde_score(denoiser: Denoiser, x: jax.Array, t: jax.Array, *, sde: SDE) -> jax.Array:
    """Score grad log p_t(x) = (m D(x / m, s / m) - x) / s^2 of x_t ~ m(t) x0 + s(t) eps from a denoiser (Tweedie's
    formula in the SDE's coordinates; EDM Table 1). x: (B, ...); t: float scalar; returns x's shape."""
    m, s = sde_marginal(sde, t)
    x0 = denoiser(x / m, _full(s / m, x))
    return (m * x0 - x) / s ** 2


def sde_denoise(denoiser: Denoiser, x: jax.Array, t: jax.Array, *, sde: SDE) -> jax.Array:
    """x0 estimate D(x / m(t), s(t) / m(t)) of x_t, the final noise removal after an SDE / ODE sampler (Song et al.
    2021, Appendix G). x: (B, ...); t: float scalar; returns x's shape and dtype."""
    m, s = sde_marginal(sde, t)
    return denoiser(x / m, _full(s / m, x)).astype(x.dtype)


def reverse_sde_step(denoiser: Denoiser, x: jax.Array, t: jax.Array, t_next: jax.Array, *, sde: SDE,
                     key: jax.Array) -> jax.Array:
    """One Euler-Maruyama step t -> t_next < t of the reverse-time SDE dx = [f x - g^2 grad log p_t(x)] dt + g dw_bar
    (Anderson 1982; Song et al. 2021, eq. 6), with dt = t - t_next > 0 and the score of `sde_score`:

        x_next = x - (f(t) x - g(t)^2 score(x, t)) dt + g(t) sqrt(dt) xi,   xi ~ N(0, I).

    Args:
      denoiser: D(x, sigma) in EDM coordinates.
      x: (B, ...) x_t.
      t, t_next: float scalar times in (0, 1].
      sde: `vp_sde(...)` or `ve_sde(...)`.
      key: PRNG key for the Brownian increment xi.

    Returns:
      (B, ...) x at t_next in x's dtype.
    """
    _check_sde(sde)
    x = _check_batched(x, "x")
    dt = t - t_next
    f, g = sde_coefficients(sde, t)
    x_next = x - (f * x - g ** 2 * sde_score(denoiser, x, t, sde=sde)) * dt + g * jnp.sqrt(dt) * _normal(key, x)
    return x_next.astype(x.dtype)


def probability_flow_step(denoiser: Denoiser, x: jax.Array, t: jax.Array, t_next: jax.Array, *, sde: SDE,
                          solver: str = "heun") -> jax.Array:
    """One Euler or Heun step t -> t_next of the probability-flow ODE dx/dt = F(x, t) = f x - g^2 / 2 grad log p_t(x)
    (Song et al. 2021, eq. 13), with the score of `sde_score`:

        Euler: x_next = x + (t_next - t) F(x, t);  Heun: x_next = x + (t_next - t) (F(x, t) + F(x_euler, t_next)) / 2.

    Args:
      denoiser: D(x, sigma) in EDM coordinates.
      x: (B, ...) x_t.
      t, t_next: float scalar times in (0, 1].
      sde: `vp_sde(...)` or `ve_sde(...)`.
      solver: "heun" or "euler".

    Returns:
      (B, ...) x at t_next in x's dtype.
    """
    _check_sde(sde)
    one_of("solver", solver, SOLVERS)
    x = _check_batched(x, "x")

    def drift(y, s):
        f, g = sde_coefficients(sde, s)
        return f * y - 0.5 * g ** 2 * sde_score(denoiser, y, s, sde=sde)

    d = drift(x, t)
    x_next = x + (t_next - t) * d
    if solver == "heun":
        x_next = x + (t_next - t) * 0.5 * (d + drift(x_next, t_next))
    return x_next.astype(x.dtype)


def flow_step(velocity_fn: Callable, x: jax.Array, t: jax.Array, t_next: jax.Array, *,
              solver: str = "euler") -> jax.Array:
    """One Euler or Heun step t -> t_next of the rectified-flow ODE dx_t/dt = v(x_t, t) (Liu et al. 2022, "Flow
    Straight and Fast", Algorithm 1 sampling; SD3 §2):

        Euler: x_next = x + (t_next - t) v(x, t);  Heun: x_next = x + (t_next - t) (v(x, t) + v(x_euler, t_next)) / 2.

    Args:
      velocity_fn: (x_t (B, ...), t (B,)) -> (B, ...) velocity ~ eps - x0 on x_t = (1 - t) x0 + t eps.
      x: (B, ...) x_t.
      t, t_next: float scalar times in [0, 1] (sampling goes down, t_next < t).
      solver: "euler" or "heun".

    Returns:
      (B, ...) x at t_next in x's dtype.
    """
    one_of("solver", solver, SOLVERS)
    x = _check_batched(x, "x")
    v = velocity_fn(x, _full(t, x))
    x_next = x + (t_next - t) * v
    if solver == "heun":
        x_next = x + (t_next - t) * 0.5 * (v + velocity_fn(x_next, _full(t_next, x)))
    return x_next.astype(x.dtype)


def ddpm_sample(denoiser: Denoiser, noise: jax.Array, alphas_cumprod_steps: jax.Array, *, key: jax.Array) -> jax.Array:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) on a (sub)sequence of timesteps: z_T = noise, then
    `ddpm_step` from each abar to the next, the last one to abar = 1 (which returns x0_hat).

    Args:
      denoiser: D(x, sigma) in EDM coordinates (module docstring); use `denoiser_from_model(eps_net,
        prediction="eps", path="vp", ...)` for a DDPM network.
      noise: (B, ...) z_T ~ N(0, I) (the VP prior).
      alphas_cumprod_steps: (N,) abar at the steps, noisiest first (strictly increasing), e.g.
        `alphas_cumprod(betas)[spaced_timesteps(T, N)]`; checked as in `ddim_sample`.
      key: PRNG key, split into one key per step.

    Returns:
      (B, ...) samples in noise's dtype.
    """
    noise = _check_batched(noise, "noise")
    ab = _check_alphas_cumprod_steps(alphas_cumprod_steps)
    keys = _keys(key, ab.shape[0], True, "ddpm_sample")

    def step(z, inputs):
        ab_t, ab_s, k = inputs
        return ddpm_step(denoiser, z, ab_t, ab_s, key=k), None

    z, _ = lax.scan(step, noise, (ab, jnp.append(ab[1:], 1.0), keys))
    return z


def ddim_sample(denoiser: Denoiser, noise: jax.Array, alphas_cumprod_steps: jax.Array, *, eta: float = 0.0,
                key: jax.Array | None = None) -> jax.Array:
    """DDIM sampling (Song, Meng & Ermon 2021, eq. 12 and 16): z_T = noise, then `ddim_step` from each abar to
    the next, the last one to abar = 1 (which returns x0_hat). eta = 0 is deterministic; eta = 1 equals
    `ddpm_sample` (the same draws for the same key).

    Args:
      denoiser: D(x, sigma) in EDM coordinates.
      noise: (B, ...) z_T ~ N(0, I).
      alphas_cumprod_steps: (N,) abar at the steps in (0, 1], noisiest first (non-decreasing); checked when
        concrete (ValueError), not under a trace, where a wrong order gives meaningless samples.
      eta: >= 0, the stochasticity.
      key: PRNG key, required when eta > 0 (split into one key per step).

    Returns:
      (B, ...) samples in noise's dtype.
    """
    noise = _check_batched(noise, "noise")
    ab = _check_alphas_cumprod_steps(alphas_cumprod_steps)
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    keys = _keys(key, ab.shape[0], eta > 0, "ddim_sample with eta > 0")

    def step(z, inputs):
        ab_t, ab_s, k = inputs
        return ddim_step(denoiser, z, ab_t, ab_s, eta=eta, key=k if eta > 0 else None), None

    z, _ = lax.scan(step, noise, (ab, jnp.append(ab[1:], 1.0), keys))
    return z


def ddim_invert(denoiser: Denoiser, x: jax.Array, alphas_cumprod_steps: jax.Array) -> jax.Array:
    """DDIM inversion: the deterministic DDIM (eta = 0) update run from clean to noisy (Song et al. 2021,
    §4.3 and eq. 13; Dhariwal & Nichol 2021, Appendix F), with eps_hat taken at the current, less noisy, point:

        z_{t_{i+1}} = sqrt(abar_{i+1}) x0_hat(z_{t_i}) + sqrt(1 - abar_{i+1}) eps_hat(z_{t_i})   (`ddim_step`).

    x is taken as z at the cleanest step alphas_cumprod_steps[-1]; the result is z at the noisiest,
    alphas_cumprod_steps[0], so `ddim_sample(D, ddim_invert(D, x, ab), ab)` ~ x (exact as steps -> 0).

    Args:
      denoiser: D(x, sigma) in EDM coordinates.
      x: (B, ...) data.
      alphas_cumprod_steps: (N,) abar at the steps, noisiest first (the same array as for sampling, checked
        as there).

    Returns:
      (B, ...) latent z_T in x's dtype.
    """
    x = _check_batched(x, "x")
    ab = _check_alphas_cumprod_steps(alphas_cumprod_steps)[::-1]

    def step(z, inputs):
        ab_t, ab_s = inputs  # ab_s < ab_t: s is noisier
        return ddim_step(denoiser, z, ab_t, ab_s), None

    z, _ = lax.scan(step, x, (ab[:-1], ab[1:]))
    return z


def edm_sample(denoiser: Denoiser, noise: jax.Array, sigmas: jax.Array, *, solver: str = "heun",
               S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = float("inf"), S_noise: float = 1.0,
               key: jax.Array | None = None) -> jax.Array:
    """EDM sampler (Karras et al. 2022, Algorithm 2; Algorithm 1 when S_churn = 0), Euler or Heun: x_0 = sigmas[0]
    noise, then `edm_step` from each sigma to the next with churn `edm_gamma(sigma_i, ...)` when S_churn > 0.

    Args:
      denoiser: D(x, sigma) in EDM coordinates.
      noise: (B, ...) standard normal.
      sigmas: (N + 1,) non-increasing noise levels >= 0, usually `edm_sigmas(N)` (last 0); checked when
        concrete (ValueError), not under a trace, where a wrong order gives meaningless samples.
      solver: "heun" (2nd order) or "euler".
      S_churn, S_tmin, S_tmax, S_noise: stochasticity (Algorithm 2). key is required when S_churn > 0
        (split into one key per step).

    Returns:
      (B, ...) samples in noise's dtype.
    """
    one_of("solver", solver, SOLVERS)
    noise = _check_batched(noise, "noise")
    sigmas = _check_schedule(sigmas, "sigmas")
    if sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must hold at least 2 levels (one step), got shape {sigmas.shape}")
    values_in_range("sigmas", sigmas, 0)
    monotone("sigmas", sigmas, decreasing=True)
    n = sigmas.shape[0] - 1
    keys = _keys(key, n, S_churn > 0, "edm_sample with S_churn > 0")

    def step(x, inputs):
        sigma, sigma_next, k = inputs
        if S_churn > 0:
            gamma = edm_gamma(sigma, num_steps=n, S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax)
            return edm_step(denoiser, x, sigma, sigma_next, solver=solver, gamma=gamma, S_noise=S_noise, key=k), None
        return edm_step(denoiser, x, sigma, sigma_next, solver=solver), None

    x, _ = lax.scan(step, (noise * sigmas[0]).astype(noise.dtype), (sigmas[:-1], sigmas[1:], keys))
    return x


def _time_grid(num_steps, t_eps):
    n = positive_int("num_steps", num_steps)
    if not 0 < t_eps < 1:
        raise ValueError(f"t_eps must be in (0, 1), got {t_eps!r}")
    return jnp.linspace(1.0, t_eps, n + 1, dtype=jnp.float32)


def reverse_sde_sample(denoiser: Denoiser, noise: jax.Array, sde: SDE, *, num_steps: int, key: jax.Array,
                       t_eps: float = 1e-3) -> jax.Array:
    """Reverse-time SDE (Anderson 1982; Song et al. 2021, eq. 6) integrated by Euler-Maruyama (`reverse_sde_step`)
    from t = 1 to t_eps on a uniform grid, with the score from the denoiser (`sde_score`). x_1 = s(1) noise; the
    result is the denoised estimate at t_eps (`sde_denoise`, Song et al.'s final noise removal).

    Args:
      denoiser: D(x, sigma) in EDM coordinates.
      noise: (B, ...) standard normal.
      sde: `vp_sde(...)` or `ve_sde(...)`.
      num_steps: positive int.
      key: PRNG key for the Brownian increments, split into one key per step.

    Returns:
      (B, ...) samples in noise's dtype.
    """
    _check_sde(sde)
    noise = _check_batched(noise, "noise")
    ts = _time_grid(num_steps, t_eps)
    keys = _keys(key, num_steps, True, "reverse_sde_sample")

    def step(x, inputs):
        t, t_next, k = inputs
        return reverse_sde_step(denoiser, x, t, t_next, sde=sde, key=k), None

    x, _ = lax.scan(step, (noise * sde_marginal(sde, 1.0)[1]).astype(noise.dtype), (ts[:-1], ts[1:], keys))
    return sde_denoise(denoiser, x, ts[-1], sde=sde)


def probability_flow_sample(denoiser: Denoiser, noise: jax.Array, sde: SDE, *, num_steps: int,
                            solver: str = "heun", t_eps: float = 1e-3) -> jax.Array:
    """Probability-flow ODE (Song et al. 2021, eq. 13) integrated with Euler or Heun (`probability_flow_step`)
    from t = 1 to t_eps on a uniform grid; x_1 = s(1) noise; returns the denoised estimate at t_eps
    (`sde_denoise`).

    Args:
      denoiser: D(x, sigma) in EDM coordinates.
      noise: (B, ...) standard normal.
      sde: `vp_sde(...)` or `ve_sde(...)`.
      num_steps: positive int.
      solver: "heun" or "euler".

    Returns:
      (B, ...) samples in noise's dtype.
    """
    _check_sde(sde)
    one_of("solver", solver, SOLVERS)
    noise = _check_batched(noise, "noise")
    ts = _time_grid(num_steps, t_eps)

    def step(x, inputs):
        t, t_next = inputs
        return probability_flow_step(denoiser, x, t, t_next, sde=sde, solver=solver), None

    x, _ = lax.scan(step, (noise * sde_marginal(sde, 1.0)[1]).astype(noise.dtype), (ts[:-1], ts[1:]))
    return sde_denoise(denoiser, x, ts[-1], sde=sde)


def rectified_flow_sample(velocity_fn: Callable, noise: jax.Array, timesteps: jax.Array, *,
                          solver: str = "euler") -> jax.Array:
    """Integrates dx_t/dt = v(x_t, t) from t = timesteps[0] (x = noise) down to timesteps[-1] (Liu et al. 2022,
    "Flow Straight and Fast", Algorithm 1 sampling; SD3 §2) by Euler or Heun (`flow_step`).

    Args:
      velocity_fn: (x_t (B, ...), t (B,)) -> (B, ...) velocity ~ eps - x0 on x_t = (1 - t) x0 + t eps
        (a flow-matching network, or `velocity_from_denoiser(D)` with timesteps[0] < 1).
      noise: (B, ...) standard normal, x at timesteps[0].
      timesteps: (N + 1,) non-increasing times in [0, 1], usually `flow_timesteps(N, shift)` (1 -> 0); checked
        when concrete (ValueError), not under a trace, where a wrong order gives meaningless samples.
      solver: "euler" or "heun".

    Returns:
      (B, ...) samples in noise's dtype.
    """
    one_of("solver", solver, SOLVERS)
    noise = _check_batched(noise, "noise")
    ts = _check_schedule(timesteps, "timesteps")
    if ts.shape[0] < 2:
        raise ValueError(f"timesteps must hold at least 2 times (one step), got shape {ts.shape}")
    values_in_range("timesteps", ts, 0, 1, include_high=True)
    monotone("timesteps", ts, decreasing=True)

    def step(x, inputs):
        t, t_next = inputs
        return flow_step(velocity_fn, x, t, t_next, solver=solver), None

    x, _ = lax.scan(step, noise, (ts[:-1], ts[1:]))
    return x


def reflow_pairs(key: jax.Array, sample_fn: Callable[[jax.Array], jax.Array], shape,
                 dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Coupled (noise, sample) pairs for reflow (Liu et al. 2022, §2.3, "Reflow"): z_1 ~ N(0, I) and
    z_0 = sample_fn(z_1) from a deterministic sampler (e.g. `rectified_flow_sample` of the current flow).
    Train the next flow with `flow_matching_loss(v, x0=z_0, key, noise=z_1)`.

    Args:
      key: PRNG key for z_1.
      sample_fn: (B, ...) noise -> (B, ...) sample.
      shape: (B, ...).

    Returns:
      (noise, samples), both of `shape`.
    """
    noise = jax.random.normal(key, shape, dtype)
    samples = sample_fn(noise)
    if samples.shape != noise.shape:
        raise ValueError(f"sample_fn must map noise of shape {noise.shape} to the same shape, got {samples.shape}")
    return noise, samples


# ----------------------------------------------------------------------------------------------
# Guidance
# ----------------------------------------------------------------------------------------------


def classifier_free_guidance(cond: jax.Array, uncond: jax.Array, scale: float | jax.Array) -> jax.Array:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6 in the uncond + w (cond - uncond) form):
    uncond + scale (cond - uncond). scale = 1 is the conditional prediction, 0 the unconditional.
    Works on any prediction (eps, x0, v, velocity); cond and uncond have equal shapes."""
    _check_same_shape(jnp.asarray(cond), jnp.asarray(uncond), "cond", "uncond")
    return uncond + scale * (cond - uncond)


def cfg_denoiser(denoiser: Callable, cond: jax.Array, null_cond: jax.Array, scale: float) -> Denoiser:
    """Classifier-free-guided denoiser from a conditional one, evaluating both branches in one batch:

        D_w(x, sigma) = D(x, sigma, null) + scale (D(x, sigma, cond) - D(x, sigma, null)).

    Args:
      denoiser: (x (2B, ...), sigma (2B,), cond (2B, ...)) -> (2B, ...) x0 estimate.
      cond: (B, ...) conditioning (e.g. int labels (B,)).
      null_cond: the "no condition" value (e.g. the null class), broadcastable to cond's shape.
      scale: guidance weight w.

    Returns:
      denoiser(x (B, ...), sigma (B,)) -> (B, ...).
    """
    cond = jnp.asarray(cond)
    null = jnp.broadcast_to(jnp.asarray(null_cond, cond.dtype), cond.shape)
    both = jnp.concatenate([cond, null])

    def guided(x, sigma):
        if x.shape[0] != cond.shape[0]:
            raise ValueError(f"x has batch {x.shape[0]} but cond has batch {cond.shape[0]}")
        out = denoiser(jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]), both)
        c, u = jnp.split(out, 2)
        return classifier_free_guidance(c, u, scale)

    return guided


def drop_labels(key: jax.Array, labels: jax.Array, p: float, null_label) -> jax.Array:
    """Condition dropout for classifier-free guidance training (Ho & Salimans 2022, Algorithm 1): each example's
    condition is replaced by `null_label` with probability p.

    Args:
      key: PRNG key.
      labels: (B, ...) conditions (int class ids (B,) or embeddings (B, ...)).
      p: drop probability in [0, 1].
      null_label: scalar or array broadcastable to labels' shape.

    Returns:
      labels' shape and dtype.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability p must be in [0, 1], got {p!r}")
    labels = _check_batched(labels, "labels")
    drop = jax.random.bernoulli(key, p, (labels.shape[0],))
    return jnp.where(_per_example(drop, labels), jnp.asarray(null_label, labels.dtype), labels)


def classifier_guided_denoiser(denoiser: Denoiser, log_prob_fn: Callable, scale: float) -> Denoiser:
    """Classifier guidance (Dhariwal & Nichol 2021, §4; in EDM coordinates by Tweedie's formula):

        D_s(x, sigma) = D(x, sigma) + scale sigma^2 grad_x log p(y | x, sigma).

    With scale = 1 and the exact noisy classifier this is E[x0 | x, y], the posterior denoiser.

    Args:
      denoiser: D(x, sigma) in EDM coordinates.
      log_prob_fn: (x (B, ...), sigma (B,)) -> (B,) log p(y | x, sigma) of the target labels (close over y).
      scale: guidance scale s.

    Returns:
      denoiser(x (B, ...), sigma (B,)) -> (B, ...).
    """

    def guided(x, sigma):
        grad = jax.grad(lambda v: jnp.sum(log_prob_fn(v, sigma)))(x)
        return denoiser(x, sigma) + scale * _per_example(jnp.square(sigma), x) * grad

    return guided
