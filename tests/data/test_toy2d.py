"""2-D toy distributions (moments, support, modes) and sample distances (against naive references)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.data import toy2d

N = 20_000
MOONS_VAR = (0.75 + toy2d.MOONS_NOISE**2, 9 / 16 - 1 / math.pi + toy2d.MOONS_NOISE**2)


@pytest.fixture(scope="module")
def samples():
    return {name: np.asarray(toy2d.sample(name, i, N)) for i, name in enumerate(toy2d.SAMPLERS)}


@pytest.mark.parametrize("name,variance", [
    ("checkerboard", (1.0, 1.0)),
    ("two_moons", tuple(toy2d.MOONS_SCALE**2 * v for v in MOONS_VAR)),
    ("eight_gaussians", (1.01, 1.01)),
])
def test_moments(samples, name, variance):
    x = samples[name]
    assert x.shape == (N, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.03)
    np.testing.assert_allclose(x.var(0), variance, rtol=0.04)
    assert 0.95 < x.var(0).mean() < 1.05  # unit scale


def test_sampling_is_pure_and_jittable():
    a = toy2d.sample("checkerboard", 3, N)  # N: the fixture's compiled sampler
    np.testing.assert_array_equal(a, toy2d.sample("checkerboard", jax.random.key(3), N))
    np.testing.assert_array_equal(a, jax.jit(toy2d.sample, static_argnums=(0, 2))("checkerboard", jax.random.key(3), N))
    assert not np.array_equal(a, toy2d.sample("checkerboard", 4, N))


def test_checkerboard_lies_in_the_black_cells(samples):
    cells = np.floor(samples["checkerboard"] / toy2d.CHECKERBOARD_CELL).astype(int)
    assert cells.min() >= -2 and cells.max() <= 1  # the 4x4 board
    assert ((cells.sum(1) % 2) == 0).all()
    counts = np.unique(cells, axis=0, return_counts=True)[1]
    assert len(counts) == 8 and (np.abs(counts / N - 1 / 8) < 0.01).all()


def arc_distance(p, centre, side):
    """Distance of points p (n, 2) from the half circle of radius 1 about `centre` on the side
    side * (y - centre_y) >= 0: to the circle where p is on that side, else to the nearer end point."""
    q = p - centre
    ends = np.minimum(np.linalg.norm(q - [1, 0], axis=1), np.linalg.norm(q + [1, 0], axis=1))
    return np.where(side * q[:, 1] >= 0, np.abs(np.linalg.norm(q, axis=1) - 1), ends)


def test_two_moons_lie_on_the_two_half_circles(samples):
    p = samples["two_moons"] / toy2d.MOONS_SCALE + np.array([0.5, 0.25])
    upper, lower = arc_distance(p, np.array([0.0, 0.0]), 1), arc_distance(p, np.array([1.0, 0.5]), -1)
    assert (np.minimum(upper, lower) < 5 * toy2d.MOONS_NOISE).all()
    assert abs(np.mean(upper < lower) - 0.5) < 0.02
    assert np.mean(np.minimum(upper, lower) > 3 * toy2d.MOONS_NOISE) < 0.01  # the noise is no larger


def test_eight_gaussians_have_eight_modes(samples):
    x, centres = samples["eight_gaussians"], toy2d.eight_gaussians_centres()
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), math.sqrt(2), rtol=1e-6)
    distance = np.linalg.norm(x[:, None] - centres[None], axis=-1)
    mode = distance.argmin(1)
    assert (distance.min(1) < 6 * toy2d.GAUSSIANS_STD).all()
    assert (np.abs(np.bincount(mode, minlength=8) / N - 1 / 8) < 0.01).all()
    np.testing.assert_allclose((x - centres[mode]).std(0), toy2d.GAUSSIANS_STD, rtol=0.05)


def w2_1d_reference(a, b):
    """Naive float64 W2 between 1-D empirical measures: repeat both to lcm(n, m) atoms, match sorted."""
    k = math.lcm(len(a), len(b))
    a, b = np.sort(np.repeat(np.float64(a), k // len(a))), np.sort(np.repeat(np.float64(b), k // len(b)))
    return np.sqrt(np.mean((a - b) ** 2))


@pytest.mark.parametrize("n,m", [(7, 7), (6, 4), (5, 3), (1, 9), (30, 12)])
def test_wasserstein2_1d_against_the_naive_reference(n, m):
    rng = np.random.default_rng(n * 100 + m)
    a, b = rng.normal(size=n), rng.normal(1.0, 2.0, size=m)
    np.testing.assert_allclose(toy2d.wasserstein2_1d(a, b), w2_1d_reference(a, b), rtol=1e-5)
    # in 1-D every direction is +-1, so the sliced distance is the exact one
    np.testing.assert_allclose(toy2d.sliced_wasserstein2(a[:, None], b[:, None], jax.random.key(0), 8),
                               w2_1d_reference(a, b), rtol=1e-5)


def test_sliced_w2_of_1d_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    for (m1, s1), (m2, s2) in [((0.0, 1.0), (0.5, 2.0)), ((-1.0, 0.5), (1.0, 0.5)), ((0.0, 1.0), (0.0, 3.0))]:
        x, y = rng.normal(m1, s1, (N, 1)), rng.normal(m2, s2, (N // 2, 1))
        sw = toy2d.sliced_wasserstein2(x, y, jax.random.key(1), num_projections=4)
        np.testing.assert_allclose(sw**2, (m1 - m2) ** 2 + (s1 - s2) ** 2, rtol=0.05)


def test_sliced_w2_of_a_translation_in_2d():
    x = np.random.default_rng(1).normal(size=(200, 2))
    v = np.array([0.6, -0.8])  # W2 of the projections is |theta . v|, whose mean square is |v|^2 / d
    sw = toy2d.sliced_wasserstein2(x, x + v, jax.random.key(2), num_projections=2048)
    np.testing.assert_allclose(sw, np.linalg.norm(v) / math.sqrt(2), rtol=0.03)


def mmd_reference(x, y, bandwidths):
    """Naive float64 double loops over Gretton et al.'s eq. 3."""
    x, y = np.float64(x), np.float64(y)
    k = lambda a, b: sum(math.exp(-np.sum((a - b) ** 2) / (2 * h * h)) for h in bandwidths)
    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


@pytest.mark.parametrize("n,m,d,bandwidths", [(7, 5, 2, (0.5, 1.0)), (4, 9, 3, (0.2,)), (6, 6, 1, (0.1, 1.0, 3.0))])
def test_mmd_against_the_naive_reference(n, m, d, bandwidths):
    rng = np.random.default_rng(n + m + d)
    x, y = rng.normal(size=(n, d)), rng.normal(0.5, 1.0, size=(m, d))
    np.testing.assert_allclose(toy2d.mmd_squared(x, y, bandwidths), mmd_reference(x, y, bandwidths), atol=1e-5)


def test_distances_separate_distributions(samples):
    # The three are all centred with unit variance, so only their shapes tell them apart. Sliced W2
    # between two samples of one multimodal distribution shrinks slowly (like n^(-1/4): a mass
    # imbalance delta between modes at distance D costs sqrt(delta) D), so its margin is smaller.
    # Each fixture sample holds N independent points: its first and second n are two samples of one distribution.
    n, key = 2000, jax.random.key(0)
    for x in samples.values():
        assert toy2d.sliced_wasserstein2(x[:n], x[n:2 * n], key) < 0.13
        assert abs(toy2d.mmd_squared(x[:n // 2], x[n:n + n // 2])) < 0.01
    for x, y in itertools.combinations(samples.values(), 2):
        assert toy2d.sliced_wasserstein2(x[:n], y[:n], key) > 0.2 and toy2d.mmd_squared(x[:n // 2], y[:n // 2]) > 0.1


def test_sliced_w2_as_a_loss_moves_samples_towards_the_target(samples):
    target = samples["eight_gaussians"][:256]
    x = jax.random.normal(jax.random.key(1), (256, 2))
    loss = lambda x, key: toy2d.sliced_wasserstein2(x, target, key) ** 2
    before, grad = loss(x, jax.random.key(9)), jax.jit(jax.grad(loss))
    for step in range(10):
        g = grad(x, jax.random.key(step))
        assert jnp.isfinite(g).all()
        x = x - 0.5 * len(x) * g
    assert loss(x, jax.random.key(9)) < 0.2 * before


@pytest.mark.parametrize("call,match", [
    (lambda: toy2d.sample("spirals", 0, 10), "name='spirals' is not valid; choose one of"),
    (lambda: toy2d.sample("two_moons", 0, 0), "n must be a positive int, got 0"),
    (lambda: toy2d.sliced_wasserstein2(np.zeros((3, 2)), np.zeros((3, 3)), jax.random.key(0)), "same d"),
    (lambda: toy2d.sliced_wasserstein2(np.zeros((3, 2)), np.zeros((3, 2)), jax.random.key(0), 0),
     "num_projections must be a positive int, got 0"),
    (lambda: toy2d.mmd_squared(np.zeros((1, 2)), np.zeros((3, 2))), "n, m >= 2"),
    (lambda: toy2d.mmd_squared(np.zeros((3, 2)), np.zeros((3, 2)), (0.0,)), "positive bandwidths"),
    (lambda: toy2d.wasserstein2_1d(np.zeros(0), np.zeros(3)), "n, m >= 1"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
