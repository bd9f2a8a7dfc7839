"""2-D toy distributions for diffusion and flows, and distances between samples.

Samplers (`sample(name, key_or_seed, n) -> float32 (n, 2)`), each scaled so that its coordinates
have variance about 1 and mean 0:

  checkerboard    uniform on the 8 "black" cells of a 4x4 board of square cells of side
                  CHECKERBOARD_CELL = sqrt(3)/2 covering [-sqrt(3), sqrt(3)]^2; a cell (i, j) =
                  (floor(x / cell), floor(y / cell)) is black when i + j is even. Each coordinate
                  is uniform on [-sqrt(3), sqrt(3)]: variance exactly 1.
  two_moons       the two interleaved half circles of scikit-learn's `make_moons`: with t ~ U[0, pi],
                  (cos t, sin t) or (1 - cos t, 1/2 - sin t), each with probability 1/2, plus
                  N(0, MOONS_NOISE^2 I) with MOONS_NOISE = 0.1; then centred (minus (1/2, 1/4)) and
                  multiplied by MOONS_SCALE = sqrt(2 / (21/16 - 1/pi + 2 MOONS_NOISE^2)), so that the
                  two coordinates' variances (0.75 + noise^2 and 9/16 - 1/pi + noise^2 before
                  scaling) average exactly 1.
  eight_gaussians N(c_k, GAUSSIANS_STD^2 I), k uniform in 0..7, centres c_k = GAUSSIANS_RADIUS
                  (cos(k pi/4), sin(k pi/4)) on a circle of radius sqrt(2), std 0.1: coordinate
                  variance 1 + 0.01.

Distances between two samples x (n, d) and y (m, d), both jit/grad-safe JAX functions:
`wasserstein2_1d` (exact W2 between 1-D empirical measures), `sliced_wasserstein2` (random
projections, Bonneel et al. 2015) and `mmd_squared` (unbiased MMD^2 with a sum of Gaussian
kernels, Gretton et al. 2012).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.ops.checks import one_of, positive_int

CHECKERBOARD_CELL = math.sqrt(3) / 2
MOONS_NOISE = 0.1
MOONS_SCALE = math.sqrt(2 / (21 / 16 - 1 / math.pi + 2 * MOONS_NOISE**2))
GAUSSIANS_RADIUS = math.sqrt(2)
GAUSSIANS_STD = 0.1


def checkerboard(key: jax.Array, n: int) -> jax.Array:
    """n points uniform on the black cells of the checkerboard (see the module docstring): float32 (n, 2)."""
    kx, kcell, ky = jax.random.split(key, 3)
    x = jax.random.uniform(kx, (n,), minval=-2.0, maxval=2.0)  # in cell units; column floor(x) in -2..1
    row = 2 * jax.random.randint(kcell, (n,), 0, 2) - 2 + jnp.floor(x).astype(jnp.int32) % 2  # same parity
    y = row + jax.random.uniform(ky, (n,))
    return jnp.stack([x, y], axis=-1) * CHECKERBOARD_CELL


def two_moons(key: jax.Array, n: int) -> jax.Array:
    """n points of the two moons (see the module docstring): float32 (n, 2)."""
    kt, kmoon, knoise = jax.random.split(key, 3)
    t = jax.random.uniform(kt, (n,), maxval=jnp.pi)
    upper = jnp.stack([jnp.cos(t), jnp.sin(t)], axis=-1)
    lower = jnp.stack([1 - jnp.cos(t), 0.5 - jnp.sin(t)], axis=-1)
    points = jnp.where(jax.random.bernoulli(kmoon, 0.5, (n, 1)), upper, lower)
    points = points + MOONS_NOISE * jax.random.normal(knoise, (n, 2))
    return (points - jnp.array([0.5, 0.25])) * MOONS_SCALE


def eight_gaussians_centres() -> np.ndarray:
    """The 8 modes of `eight_gaussians`: float32 (8, 2), GAUSSIANS_RADIUS (cos(k pi/4), sin(k pi/4))."""
    angles = np.arange(8) * np.pi / 4
    return (GAUSSIANS_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=-1)).astype(np.float32)


def eight_gaussians(key: jax.Array, n: int) -> jax.Array:
    """n points of the mixture of 8 Gaussians (see the module docstring): float32 (n, 2)."""
    kmode, knoise = jax.random.split(key)
    centres = jnp.asarray(eight_gaussians_centres())[jax.random.randint(kmode, (n,), 0, 8)]
    return centres + GAUSSIANS_STD * jax.random.normal(knoise, (n, 2))


SAMPLERS: dict[str, Callable[[jax.Array, int], jax.Array]] = {
    "checkerboard": checkerboard,
    "two_moons": two_moons,
    "eight_gaussians": eight_gaussians,
}


def sample(name: str, key_or_seed: jax.Array | int, n: int) -> jax.Array:
    """n points of the toy distribution `name` (a key of SAMPLERS): float32 (n, 2).

    `key_or_seed` is a JAX PRNG key or an int seed (then `jax.random.key(seed)` is used). A pure
    function of (name, key, n); jit-safe with `name` and `n` static.
    """
    one_of("name", name, sorted(SAMPLERS))
    positive_int("n", n)
    if isinstance(key_or_seed, (int, np.integer)) and not isinstance(key_or_seed, bool):
        key_or_seed = jax.random.key(int(key_or_seed))
    return _sample(name, key_or_seed, int(n))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _sample(name: str, key: jax.Array, n: int) -> jax.Array:
    return SAMPLERS[name](key, n).astype(jnp.float32)


def _check_samples(x, y) -> tuple[jax.Array, jax.Array]:
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not (len(x) and len(y)):
        raise ValueError(f"need samples x (n, d) and y (m, d) with the same d and n, m >= 1; "
                         f"got {x.shape} and {y.shape}")
    dtype = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
    return x.astype(dtype), y.astype(dtype)


def _w2_squared_sorted(a: jax.Array, b: jax.Array) -> jax.Array:
    """W2^2 between the empirical measures of sorted a (..., n) and sorted b (..., m): the integral over
    u in (0, 1) of (F_a^-1(u) - F_b^-1(u))^2, summed exactly over the pieces cut by the steps i/n and j/m."""
    n, m = a.shape[-1], b.shape[-1]
    edges = jnp.sort(jnp.concatenate([jnp.arange(1, n + 1) / n, jnp.arange(1, m + 1) / m]))
    starts = jnp.concatenate([jnp.zeros(1), edges[:-1]])
    middle = (starts + edges) / 2  # inside the piece: picks the step's value (zero-width pieces add 0)
    ia = jnp.minimum(jnp.floor(middle * n).astype(jnp.int32), n - 1)
    ib = jnp.minimum(jnp.floor(middle * m).astype(jnp.int32), m - 1)
    return jnp.sum((edges - starts) * (a[..., ia] - b[..., ib]) ** 2, axis=-1)


def wasserstein2_1d(a, b) -> jax.Array:
    """Exact 2-Wasserstein distance between the empirical measures of 1-D samples a (n,) and b (m,).

    W2 = (integral_0^1 (F_a^-1(u) - F_b^-1(u))^2 du)^(1/2) with the empirical quantile functions;
    for n == m it is (mean((sort(a) - sort(b))^2))^(1/2). Returns a float32 (float64 for float64 input) scalar.
    """
    a, b = _check_samples(jnp.reshape(a, (-1, 1)), jnp.reshape(b, (-1, 1)))
    return _wasserstein2_1d(a[:, 0], b[:, 0])


@jax.jit
def _wasserstein2_1d(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sqrt(_w2_squared_sorted(jnp.sort(a), jnp.sort(b)))


def sliced_wasserstein2(x, y, key: jax.Array, num_projections: int = 256) -> jax.Array:
    """Monte-Carlo sliced 2-Wasserstein distance between samples x (n, d) and y (m, d).

    SW2 = (E_theta W2^2(theta . x, theta . y))^(1/2) with theta uniform on the unit sphere
    (Bonneel et al. 2015, "Sliced and Radon Wasserstein Barycenters of Measures"; Kolouri et al.
    2019): `num_projections` directions from `key`, each 1-D W2 exact on the sorted projections
    (`wasserstein2_1d`). For d = 1 it equals `wasserstein2_1d`. Returns a float32 (float64 for
    float64 input) scalar.
    """
    x, y = _check_samples(x, y)
    positive_int("num_projections", num_projections)
    return _sliced_wasserstein2(x, y, key, int(num_projections))


@functools.partial(jax.jit, static_argnames="num_projections")
def _sliced_wasserstein2(x: jax.Array, y: jax.Array, key: jax.Array, num_projections: int) -> jax.Array:
    theta = jax.random.normal(key, (num_projections, x.shape[1]), x.dtype)
    theta = theta / jnp.linalg.norm(theta, axis=-1, keepdims=True)
    px, py = jnp.sort(theta @ x.T, axis=-1), jnp.sort(theta @ y.T, axis=-1)  # (num_projections, n), (.., m)
    return jnp.sqrt(jnp.mean(_w2_squared_sorted(px, py)))


def mmd_squared(x, y, bandwidths: Sequence[float] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)) -> jax.Array:
    """Unbiased estimate of the squared maximum mean discrepancy between samples x (n, d) and y (m, d).

    MMD_u^2 = 1/(n(n-1)) sum_{i != j} k(x_i, x_j) + 1/(m(m-1)) sum_{i != j} k(y_i, y_j)
              - 2/(nm) sum_{i, j} k(x_i, y_j)
    (Gretton et al. 2012, "A Kernel Two-Sample Test", eq. 3), with the sum of Gaussian kernels
    k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2)) over `bandwidths` (for unit-scale data). About 0 (it
    can be slightly negative) when x and y come from one distribution. Needs n, m >= 2; memory
    O((n + m)^2 d). Returns a float32 (float64 for float64 input) scalar.
    """
    x, y = _check_samples(x, y)
    n, m = len(x), len(y)
    if n < 2 or m < 2 or not len(bandwidths) or min(bandwidths) <= 0:
        raise ValueError(f"need n, m >= 2 and positive bandwidths, got n={n}, m={m}, bandwidths={bandwidths}")
    return _mmd_squared(x, y, tuple(float(h) for h in bandwidths))


@functools.partial(jax.jit, static_argnames="bandwidths")
def _mmd_squared(x: jax.Array, y: jax.Array, bandwidths: tuple[float, ...]) -> jax.Array:
    n, m = len(x), len(y)

    def kernel(a, b):  # (len(a), len(b))
        sq = jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)
        return sum(jnp.exp(-sq / (2 * h * h)) for h in bandwidths)

    kxx = kernel(x, x).sum() - n * len(bandwidths)  # the diagonal terms are k(a, a) = len(bandwidths)
    kyy = kernel(y, y).sum() - m * len(bandwidths)
    return kxx / (n * (n - 1)) + kyy / (m * (m - 1)) - 2 * kernel(x, y).mean()
