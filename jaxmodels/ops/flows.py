r"""Bijectors of normalising flows (NICE, RealNVP, Glow), dequantisation and likelihoods in bits/dim.

A flow maps data x to a latent z = f(x) with a tractable Jacobian; by the change of variables

    log p(x) = log p_Z(f(x)) + log |det df/dx|                     (NICE eq. 1-2; RealNVP eq. 3)

One convention for every bijector here:

    y, log_det = bijector(x, <parameters>, inverse=False)
    x, log_det = bijector(y, <parameters>, inverse=True)

`log_det` is always log |det J| of the map that was applied, summed over all non-batch dimensions:
shape (B,), float32 for float32/bfloat16 inputs (float64 for float64 inputs). So the inverse returns minus
the forward's log-det at the point it returns, and a composite flow's log-det is the sum of its layers'.
Parameters enter as arrays or as callables (`shift_fn`, `shift_and_log_scale_fn`, `noise_flow`), so Flax
modules can own them. Vectors are (B, D), images channels-last (B, H, W, C); "channels" is the last axis,
and what acts per channel (actnorm, the 1x1 convolution) treats every other non-batch position alike.

  piece            functions
  coupling         additive_coupling (NICE), affine_coupling (RealNVP), checkerboard_mask, channel_mask
  elementwise      diagonal_scaling (NICE §3.3), actnorm + actnorm_init (Glow §3.1)
  1x1 convolution  invertible_conv_1x1 + invertible_conv_1x1_init, lu_weight (Glow §3.2, LU form)
  multi-scale      squeeze (space-to-depth; `inverse=True` is unsqueeze), factor_out / factor_in (RealNVP §3.6)
  data             logit_transform (RealNVP §4.1), uniform_dequantize, variational_dequantize (Flow++ §3.1)
  likelihood       standard_normal_log_prob, gaussian_log_prob, bits_per_dim
  continuous flow  exact_divergence, hutchinson_divergence (FFJORD §2.2-2.3): d log p(z(t))/dt = -tr(df/dz)
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy.linalg import lu, solve_triangular

from jaxmodels.ops.checks import positive_int, real_in_range, values_in_range

ShiftFn = Callable[[jax.Array], jax.Array]
ShiftAndLogScaleFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def _batch_sum(t: jax.Array) -> jax.Array:
    """Sum over every axis but the first, accumulated in float32 (or wider): (B, ...) -> (B,)."""
    dtype = jnp.promote_types(t.dtype, jnp.float32)
    return jnp.sum(t.astype(dtype), axis=tuple(range(1, t.ndim)))


def _per_example(x: jax.Array, total: jax.Array) -> jax.Array:
    """A log-det `total` that is the same for every example, as (B,) in `_batch_sum`'s dtype."""
    return jnp.broadcast_to(total.astype(jnp.promote_types(x.dtype, jnp.float32)), x.shape[:1])


def _check_batched(x: jax.Array, name: str = "x", ndim: int | None = None) -> None:
    if x.ndim < 2 or (ndim is not None and x.ndim != ndim):
        expected = "(B, H, W, C)" if ndim == 4 else "(B, D) or (B, H, W, C)"
        raise ValueError(f"{name} must be batched, {expected}, got shape {x.shape}")


def _check_even_channels(x: jax.Array, what: str) -> None:
    if x.shape[-1] % 2:
        raise ValueError(f"x must have an even number of channels (last axis) to {what}, got shape {x.shape}")


def _check_example_operand(name: str, v: jax.Array, x: jax.Array) -> None:
    """`v` must broadcast to one example of x, x.shape[1:], dim by dim (each 1 or full)."""
    example = x.shape[1:]
    if v.ndim > len(example) or any(d not in (1, full) for d, full in zip(v.shape[::-1], example[::-1])):
        raise ValueError(f"{name} must broadcast to one example of x, {example}, got shape {v.shape}")


# ----------------------------------------------------------------------------------------------
# Coupling layers
# ----------------------------------------------------------------------------------------------

def checkerboard_mask(height: int, width: int, *, flip: bool = False) -> jax.Array:
    """RealNVP's spatial checkerboard mask b (Dinh et al. 2017, §3.4, Figure 3 left): b[i, j] = 1 where i + j is
    even (odd with `flip`). Returns (height, width, 1) float32, broadcasting over channels of (B, H, W, C)."""
    positive_int("height", height)
    positive_int("width", width)
    parity = (jnp.arange(height)[:, None] + jnp.arange(width)[None, :]) % 2
    return (parity == int(flip)).astype(jnp.float32)[..., None]


def channel_mask(channels: int, *, flip: bool = False) -> jax.Array:
    """RealNVP's channel-wise mask b (Dinh et al. 2017, §3.4, Figure 3 right): 1 on the first half of the
    channels (the second half with `flip`); also NICE's split of a vector into halves I1, I2 (§3.2).
    `channels` must be even. Returns (channels,) float32, broadcasting over (B, D) or (B, H, W, C)."""
    positive_int("channels", channels)
    if channels % 2:
        raise ValueError(f"channels must be even to mask half of them, got {channels}")
    first = jnp.arange(channels) < channels // 2
    return (first != flip).astype(jnp.float32)


def additive_coupling(x: jax.Array, mask: jax.Array, shift_fn: ShiftFn, *,
                      inverse: bool = False) -> tuple[jax.Array, jax.Array]:
    """NICE's additive coupling layer (Dinh et al. 2014, eq. 4-7), with the partition given by a binary mask b:

        y = x + (1 - b) ⊙ m(b ⊙ x),        x = y - (1 - b) ⊙ m(b ⊙ y),        log|det J| = 0.

    Args:
      x: (B, ...) float (y when `inverse`).
      mask: binary b, broadcastable to x.shape[1:] (`channel_mask`, `checkerboard_mask`).
      shift_fn: m, any function of the masked input (B, ...) -> (B, ...); it needs no inverse.
      inverse: apply the inverse map.

    Returns:
      (output, log_det): output of x's shape and dtype; log_det (B,) zeros (float32, float64 for float64 x).
    """
    _check_batched(x)
    _check_example_operand("mask", mask, x)
    shift = (1 - mask) * shift_fn(mask * x)
    return (x - shift if inverse else x + shift), _per_example(x, jnp.zeros(()))


def diagonal_scaling(x: jax.Array, log_scale: jax.Array, *, inverse: bool = False) -> tuple[jax.Array, jax.Array]:
    """NICE's diagonal scaling layer (Dinh et al. 2014, §3.3): y = exp(log_scale) ⊙ x, with the diagonal S of the
    paper written as exp(log_scale) so that it stays positive; log|det J| = sum(log_scale) (NICE eq. 8).

    x: (B, ...) float (y when `inverse`); log_scale: broadcastable to x.shape[1:].
    Returns (output of x's shape, log_det (B,) float32); the inverse divides and negates the log-det.
    """
    _check_batched(x)
    _check_example_operand("log_scale", log_scale, x)
    sign = -1 if inverse else 1
    return x * jnp.exp(sign * log_scale).astype(x.dtype), sign * _batch_sum(jnp.broadcast_to(log_scale, x.shape))


def affine_coupling(x: jax.Array, mask: jax.Array, shift_and_log_scale_fn: ShiftAndLogScaleFn, *,
                    inverse: bool = False) -> tuple[jax.Array, jax.Array]:
    """RealNVP's affine coupling layer with a binary mask b (Dinh et al. 2017, eq. 6-9):

        y = b ⊙ x + (1 - b) ⊙ (x ⊙ exp(s(b ⊙ x)) + t(b ⊙ x))                       (eq. 9)
        x = b ⊙ y + (1 - b) ⊙ (y - t(b ⊙ y)) ⊙ exp(-s(b ⊙ y))                     (eq. 8)
        log|det J| = sum((1 - b) ⊙ s(b ⊙ x))                                       (eq. 6)

    Args:
      x: (B, ...) float (y when `inverse`).
      mask: binary b, broadcastable to x.shape[1:] (`checkerboard_mask`, `channel_mask`).
      shift_and_log_scale_fn: the masked input (B, ...) -> (t, s), each of x's shape; its outputs where b = 1
        are ignored. Bound s (e.g. tanh) in the network if training needs it.
      inverse: apply the inverse map.

    Returns:
      (output, log_det): output of x's shape and dtype; log_det (B,) float32 (float64 for float64 x).
    """
    _check_batched(x)
    _check_example_operand("mask", mask, x)
    shift, log_scale = shift_and_log_scale_fn(mask * x)
    shift, log_scale = (1 - mask) * shift, (1 - mask) * log_scale
    if inverse:
        return mask * x + (1 - mask) * (x - shift) * jnp.exp(-log_scale), -_batch_sum(log_scale)
    return mask * x + (1 - mask) * x * jnp.exp(log_scale) + shift, _batch_sum(log_scale)


# ----------------------------------------------------------------------------------------------
# Actnorm and the invertible 1x1 convolution (Glow)
# ----------------------------------------------------------------------------------------------

def _positions(x: jax.Array) -> int:
    """Number of positions sharing one per-channel map: H·W for images, 1 for vectors."""
    return math.prod(x.shape[1:-1])


def _check_channel_vector(name: str, v: jax.Array, x: jax.Array) -> None:
    if v.shape != x.shape[-1:]:
        raise ValueError(f"{name} must have shape (channels,) = {x.shape[-1:]}, got {v.shape}")


def actnorm(x: jax.Array, bias: jax.Array, log_scale: jax.Array, *,
            inverse: bool = False) -> tuple[jax.Array, jax.Array]:
    """Glow's activation normalisation (Kingma & Dhariwal 2018, §3.1, Table 1): a per-channel affine map

        y = exp(log_scale) ⊙ x + bias,     log|det J| = H·W·sum(log_scale),

    with the scale s of the paper written as exp(log_scale). `actnorm_init` gives the data-dependent start.

    x: (B, ..., C) float (y when `inverse`); bias, log_scale: (C,).
    Returns (output of x's shape, log_det (B,) float32); H·W is the product of x's middle axes (1 for vectors).
    """
    _check_batched(x)
    _check_channel_vector("bias", bias, x)
    _check_channel_vector("log_scale", log_scale, x)
    log_det = _per_example(x, _positions(x) * jnp.sum(log_scale))
    bias = bias.astype(x.dtype)
    if inverse:
        return (x - bias) * jnp.exp(-log_scale).astype(x.dtype), -log_det
    return x * jnp.exp(log_scale).astype(x.dtype) + bias, log_det


def actnorm_init(x: jax.Array, *, eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """Glow's data-dependent actnorm initialisation (Kingma & Dhariwal 2018, §3.1): (bias, log_scale) such that
    `actnorm(x, bias, log_scale)` has zero mean and unit variance per channel on this batch:
    log_scale = -log(sqrt(var + eps)), bias = -mean · exp(log_scale).

    x: (B, ..., C) float, an initial batch. Returns (bias, log_scale), each (C,) float32.
    """
    _check_batched(x)
    real_in_range("eps", eps, 0.0, include_low=False)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    mean, var = jnp.mean(x, axis=axes), jnp.var(x, axis=axes)
    log_scale = -0.5 * jnp.log(var + eps)
    return -mean * jnp.exp(log_scale), log_scale


def invertible_conv_1x1_init(key: jax.Array, channels: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Glow's LU-parametrised 1x1 convolution started at a random rotation (Kingma & Dhariwal 2018, §3.2):
    W = P L (U + diag(s)) from the LU decomposition of a random orthogonal matrix (QR of a Gaussian one).

    Returns (P, L, U, s): P (C, C) permutation (kept fixed), L (C, C) lower triangular with unit diagonal,
    U (C, C) strictly upper triangular, s (C,) the diagonal of the upper factor; float32. A module that trains
    them may store s as sign(s) · exp(log|s|) as Glow does.
    """
    positive_int("channels", channels)
    q, r = jnp.linalg.qr(jax.random.normal(key, (channels, channels), jnp.float32))
    p, l, u = lu(q * jnp.sign(jnp.diag(r)))
    return p, l, jnp.triu(u, 1), jnp.diag(u)


def lu_weight(P: jax.Array, L: jax.Array, U: jax.Array, s: jax.Array) -> jax.Array:
    """The 1x1 convolution's weight W = P (L̃) (Ũ + diag(s)) (Glow §3.2), where only the strictly lower part of L
    (with a unit diagonal) and the strictly upper part of U count, so unconstrained updates keep the LU form.
    P, L, U: (C, C); s: (C,). Returns W (C, C), applied per position as y = W x."""
    _check_lu(P, L, U, s)
    return P @ _unit_lower(L) @ _upper(U, s)


def _check_lu(P, L, U, s):
    if s.ndim != 1:
        raise ValueError(f"s must be 1-D (C,), got shape {s.shape}")
    for name, m in (("P", P), ("L", L), ("U", U)):
        if m.shape != (s.shape[0],) * 2:
            raise ValueError(f"{name} must have shape (C, C) = {(s.shape[0],) * 2} for s {s.shape}, got {m.shape}")


def _unit_lower(L):
    return jnp.tril(L, -1) + jnp.eye(L.shape[0], dtype=L.dtype)


def _upper(U, s):
    return jnp.triu(U, 1) + jnp.diag(s)


def invertible_conv_1x1(x: jax.Array, P: jax.Array, L: jax.Array, U: jax.Array, s: jax.Array, *,
                        inverse: bool = False) -> tuple[jax.Array, jax.Array]:
    """Glow's invertible 1x1 convolution in LU form (Kingma & Dhariwal 2018, §3.2, eq. 9-10):

        y_ij = W x_ij,   W = P L (U + diag(s)),   log|det J| = H·W·sum(log|s|),

    inverted by two triangular solves, x_ij = (U + diag(s))^-1 L^-1 P^T y_ij.

    x: (B, ..., C) float (y when `inverse`); P, L, U (C, C) and s (C,) as from `invertible_conv_1x1_init`.
    Returns (output of x's shape, log_det (B,) float32); H·W is the product of x's middle axes (1 for vectors).
    """
    _check_batched(x)
    _check_lu(P, L, U, s)
    _check_channel_vector("s", s, x)
    log_det = _per_example(x, _positions(x) * jnp.sum(jnp.log(jnp.abs(s))))
    if inverse:
        lower_inv_pt = solve_triangular(_unit_lower(L), P.T, lower=True, unit_diagonal=True)
        weight, log_det = solve_triangular(_upper(U, s), lower_inv_pt, lower=False), -log_det
    else:
        weight = lu_weight(P, L, U, s)
    return jnp.einsum("...c,dc->...d", x, weight.astype(x.dtype)), log_det


# ----------------------------------------------------------------------------------------------
# Multi-scale architecture (RealNVP §3.6)
# ----------------------------------------------------------------------------------------------

def squeeze(x: jax.Array, *, factor: int = 2, inverse: bool = False) -> tuple[jax.Array, jax.Array]:
    """RealNVP's squeezing operation (Dinh et al. 2017, §3.6, Figure 3): each factor×factor×C block of an image
    becomes a 1×1×(factor²·C) one (space to depth; channel order (row in block, column in block, C)). With
    `inverse` it is unsqueeze (depth to space). A permutation: log|det J| = 0.

    x: (B, H, W, C) float with H and W divisible by `factor` (with `inverse`: C divisible by factor²).
    Returns ((B, H/f, W/f, f²·C) (or (B, H·f, W·f, C/f²)), log_det (B,) zeros).
    """
    _check_batched(x, ndim=4)
    positive_int("factor", factor)
    b, h, w, c = x.shape
    if inverse:
        if c % factor**2:
            raise ValueError(f"x must have channels divisible by factor**2 = {factor**2} to unsqueeze, "
                             f"got shape {x.shape}")
        y = x.reshape(b, h, w, factor, factor, c // factor**2).transpose(0, 1, 3, 2, 4, 5)
        y = y.reshape(b, h * factor, w * factor, c // factor**2)
    else:
        if h % factor or w % factor:
            raise ValueError(f"x must have height and width divisible by factor={factor} to squeeze, "
                             f"got shape {x.shape}")
        y = x.reshape(b, h // factor, factor, w // factor, factor, c).transpose(0, 1, 3, 2, 4, 5)
        y = y.reshape(b, h // factor, w // factor, factor**2 * c)
    return y, _per_example(x, jnp.zeros(()))


def factor_out(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """RealNVP's multi-scale factoring out (Dinh et al. 2017, §3.6, eq. 13-15): split the channels in half,
    h = x[..., :C/2] goes on through the flow, z = x[..., C/2:] is modelled directly (its log-density, e.g.
    `standard_normal_log_prob(z)` or Glow's learned `gaussian_log_prob(z, mean, log_scale)` from h, is added
    to the log-likelihood). x: (B, ..., C) with C even. Returns (h, z), each (B, ..., C/2)."""
    _check_batched(x)
    _check_even_channels(x, "factor out half")
    h, z = jnp.split(x, 2, axis=-1)
    return h, z


def factor_in(h: jax.Array, z: jax.Array) -> jax.Array:
    """The inverse of `factor_out`: concatenate (B, ..., C/2) halves h and z along channels to (B, ..., C)."""
    if h.shape != z.shape:
        raise ValueError(f"h and z must have one shape, got {h.shape} and {z.shape}")
    return jnp.concatenate([h, z], axis=-1)


# ----------------------------------------------------------------------------------------------
# Data: logit transform and dequantisation (RealNVP §4.1; Flow++ §3.1)
# ----------------------------------------------------------------------------------------------

def logit_transform(x: jax.Array, *, alpha: float = 0.05, inverse: bool = False) -> tuple[jax.Array, jax.Array]:
    """RealNVP's logit transform of data in [0, 1] (Dinh et al. 2017, §4.1; alpha = 0.05 there):

        p = alpha + (1 - 2 alpha) x,   y = logit(p) = log p - log(1 - p),
        log|det J| = sum(log(1 - 2 alpha) - log p - log(1 - p)),

    and its inverse x = (sigmoid(y) - alpha) / (1 - 2 alpha). Include its log-det in log p(x).

    x: (B, ...) float in [0, 1] (with `inverse`: any finite y). A concrete x outside [0, 1] (NaN and inf
    included; with `inverse`: a non-finite one) is a ValueError; traced values are not checked.
    alpha: in [0, 0.5). Returns (output of x's shape, log_det (B,) float32).
    """
    _check_batched(x)
    alpha = real_in_range("alpha", alpha, 0.0, 0.5, include_high=False)
    log_range = math.log1p(-2 * alpha)
    if inverse:
        values_in_range("x", x)
        log_det = _batch_sum(log_range - jax.nn.log_sigmoid(x) - jax.nn.log_sigmoid(-x))
        return (jax.nn.sigmoid(x) - alpha) / (1 - 2 * alpha), -log_det
    values_in_range("x", x, 0.0, 1.0, include_high=True)
    p = alpha + (1 - 2 * alpha) * x
    log_p, log_1mp = jnp.log(p), jnp.log1p(-p)
    return log_p - log_1mp, _batch_sum(log_range - log_p - log_1mp)


def uniform_dequantize(key: jax.Array, x: jax.Array, *, num_bins: int = 256) -> jax.Array:
    """Uniform dequantisation (Theis et al. 2016, §3.1; RealNVP §4.1): y = (x + u) / num_bins, u ~ U[0, 1)^D.

    x: (B, ...) integer-valued (int or float) in [0, num_bins); a concrete x outside is a ValueError.
    Returns y of x's shape, float32 in [0, 1). Score with `bits_per_dim(log p(y), D, num_bins=num_bins)`.
    """
    positive_int("num_bins", num_bins)
    values_in_range("x", x, 0.0, num_bins)
    u = jax.random.uniform(key, x.shape, jnp.float32)
    return (x.astype(jnp.float32) + u) / num_bins


def variational_dequantize(key: jax.Array, x: jax.Array, noise_flow: Callable, *,
                           num_bins: int = 256) -> tuple[jax.Array, jax.Array]:
    """Variational dequantisation (Ho et al. 2019, Flow++, §3.1, eq. 12-13): u ~ q(u | x) on (0, 1)^D by a
    conditional flow, u = sigmoid(h), (h, log_det) = noise_flow(eps, x), eps ~ N(0, I); y = (x + u) / num_bins.

        log q(u | x) = log N(eps) - log_det - sum(log sigmoid(h) + log sigmoid(-h)).

    The bound is log P(x) >= E_q[log p(y) - log q(u | x)] - D log(num_bins): score
    `bits_per_dim(log p(y) - log_q, D, num_bins=num_bins)`. With noise_flow = identity, q is logistic-normal.

    x: (B, ...) integer-valued in [0, num_bins) (checked when concrete); noise_flow: (eps, x) -> (h, log_det),
    h of x's shape, log_det (B,). Returns (y float32 of x's shape, log_q (B,) float32).
    """
    positive_int("num_bins", num_bins)
    values_in_range("x", x, 0.0, num_bins)
    eps = jax.random.normal(key, x.shape, jnp.float32)
    h, log_det = noise_flow(eps, x)
    log_q = standard_normal_log_prob(eps) - log_det - _batch_sum(jax.nn.log_sigmoid(h) + jax.nn.log_sigmoid(-h))
    return (x.astype(jnp.float32) + jax.nn.sigmoid(h)) / num_bins, log_q


# ----------------------------------------------------------------------------------------------
# Likelihood
# ----------------------------------------------------------------------------------------------

def gaussian_log_prob(z: jax.Array, mean: jax.Array | float = 0.0, log_scale: jax.Array | float = 0.0) -> jax.Array:
    """log N(z; mean, exp(log_scale)^2) summed over non-batch dims: the prior of a flow's latent, or Glow's learned
    prior of a factored-out half (Kingma & Dhariwal 2018, §3.3 / code: mean, log_scale from the kept half).

    z: (B, ...) float; mean, log_scale: broadcastable to z. Returns (B,) float32 nats."""
    _check_batched(z, "z")
    zs = (z - mean) * jnp.exp(-log_scale)
    return _batch_sum(jnp.broadcast_to(-0.5 * zs**2 - log_scale - 0.5 * math.log(2 * math.pi), z.shape))


def standard_normal_log_prob(z: jax.Array) -> jax.Array:
    """log N(z; 0, I) = -0.5 (|z|² + D log 2π), the prior of NICE/RealNVP/Glow. z: (B, ...) float.
    Returns (B,) float32 nats."""
    return gaussian_log_prob(z)


def bits_per_dim(log_likelihood: jax.Array, num_dims: int, *, num_bins: int | None = None) -> jax.Array:
    """Negative log-likelihood in bits per dimension, -log_likelihood / (D log 2).

    With `num_bins` K, `log_likelihood` is the log-density log p(y) of dequantised data y = (x + u) / K in
    [0, 1)^D (include the logit transform's log-det in it), and the discrete data's bits/dim is

        bits/dim = (-log p(y) + D log K) / (D log 2),

    since a bin of width 1/K has volume K^-D (Theis et al. 2016, §3.1; Dinh et al. 2017, §4.1; Ho et al.
    2019, eq. 11-12: an upper bound on -log2 P(x) / D in expectation over u). Leave `num_bins` None for data
    dequantised on [0, K) (bins of width 1) or for a likelihood already of the discrete data.

    log_likelihood: (...) float nats; num_dims: D, e.g. H·W·C. Returns (...) float32.
    """
    positive_int("num_dims", num_dims)
    positive_int("num_bins", num_bins, allow_none=True)
    nll = -log_likelihood.astype(jnp.promote_types(log_likelihood.dtype, jnp.float32))
    if num_bins is not None:
        nll = nll + num_dims * math.log(num_bins)
    return nll / (num_dims * math.log(2))


# ----------------------------------------------------------------------------------------------
# Continuous normalising flows: the divergence of the dynamics (FFJORD)
# ----------------------------------------------------------------------------------------------

def _check_dynamics_output(out: jax.Array, z: jax.Array) -> None:
    if out.shape != z.shape:
        raise ValueError(f"the dynamics must map z {z.shape} to its own shape, got {out.shape}")


def exact_divergence(fn: Callable[[jax.Array], jax.Array], z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(f(z), tr(df/dz)) per example, the trace of each example's D x D Jacobian by `jax.jacfwd`: the exact
    instantaneous change of variables of a continuous normalising flow (Chen et al. 2018, Theorem 1;
    FFJORD, Grathwohl et al. 2019, eq. 4), d log p(z(t)) / dt = -tr(df/dz(t)). D forward-mode passes per
    example: meant for small D (2-D densities).

    fn: (B, ...) -> (B, ...), example i of the output depending on example i of the input only (it is called
    on single examples, shape (1, ...)); z: (B, ...) float. Returns (f(z) of z's shape, divergence (B,) float32).
    """
    _check_batched(z, "z")

    def one(zi):  # (...) -> ((...), (...)): the Jacobian of one example, and its value as auxiliary output
        out = fn(zi[None])[0]
        return out, out

    jac, out = jax.vmap(jax.jacfwd(one, has_aux=True))(z)  # (B, *event, *event)
    _check_dynamics_output(out, z)
    d = math.prod(z.shape[1:])
    return out, _batch_sum(jnp.trace(jac.reshape(z.shape[0], d, d), axis1=1, axis2=2)[:, None])


def hutchinson_divergence(fn: Callable[[jax.Array], jax.Array], z: jax.Array,
                          noise: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(f(z), eps^T (df/dz) eps) per example: Hutchinson's unbiased estimator of the trace (Hutchinson 1989;
    FFJORD, Grathwohl et al. 2019, eq. 7), E_eps[eps^T A eps] = tr(A) for any eps with E[eps eps^T] = I
    (Rademacher or standard normal). One Jacobian-vector product (`jax.jvp`), whatever D; FFJORD keeps one eps
    over a whole ODE solve.

    fn: (B, ...) -> (B, ...) per example; z, noise: (B, ...) float. Returns (f(z), estimate (B,) float32).
    """
    _check_batched(z, "z")
    if noise.shape != z.shape:
        raise ValueError(f"noise must have z's shape {z.shape}, got {noise.shape}")
    out, jvp = jax.jvp(fn, (z,), (noise.astype(z.dtype),))
    _check_dynamics_output(out, z)
    return out, _batch_sum(jvp * noise)
