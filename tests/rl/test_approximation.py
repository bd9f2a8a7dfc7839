"""Linear value-function approximation: the n-step TD update against a literal NumPy transcription of Sutton & Barto's
pseudo-code, convergence to the closed-form fixed points on random walks (eq. 9.12 for TD, the minimum of VE for
gradient MC), features, and linear Q-learning reaching the optimal grid-world policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.rl import approximation as ap
from jaxmodels.rl import dp, envs
from jaxmodels.rl.rollout import rollouts


def _n_step_td_reference(w, x, rewards, length, alpha, gamma, n):
    """Sutton & Barto p. 209 (n-step TD for estimating v), literally: for t = 0, 1, ...; tau = t - n + 1."""
    w = np.array(w, np.float64)
    T = length
    for t in range(T + n - 1):
        tau = t - n + 1
        if tau >= 0:
            G = sum(gamma ** (i - tau - 1) * rewards[i - 1] for i in range(tau + 1, min(tau + n, T) + 1))
            if tau + n < T:
                G += gamma ** n * x[tau + n] @ w
            w += alpha * (G - x[tau] @ w) * x[tau]
        if tau == T - 1:
            break
    return w


@pytest.mark.parametrize("n", [1, 3, 50])
def test_n_step_td_matches_the_books_pseudo_code(n):
    env = envs.RandomWalk(num_states=7)
    features = lambda p: ap.state_aggregation(p, 7, 7) * jnp.arange(1.0, 8.0)  # not one-hot: updates interact
    key = jax.random.key(n)
    result = ap.semi_gradient_td(env, features, key, 5, alpha=0.05, n=n, gamma=0.9, num_steps=200, batch_size=5)
    episodes = rollouts(env, lambda k, s: jnp.int32(0), jax.random.split(key, 1)[0], 5, 200)
    w = np.zeros(7)
    for e in range(5):
        x = np.asarray(jax.vmap(features)(episodes.state.position[e]), np.float64)
        w = _n_step_td_reference(w, x, np.asarray(episodes.reward[e], np.float64), int(episodes.length[e]), 0.05,
                                 0.9, n)
        np.testing.assert_allclose(np.asarray(result.history[e]), w, rtol=1e-4, atol=1e-6)
    # the batch size changes only how episodes are generated, not the result
    again = ap.semi_gradient_td(env, features, key, 5, alpha=0.05, n=n, gamma=0.9, num_steps=200, batch_size=5)
    np.testing.assert_array_equal(np.asarray(again.w), np.asarray(result.w))


def test_td_with_a_long_horizon_is_gradient_mc():
    env = envs.RandomWalk()
    features = lambda p: ap.state_aggregation(p, 5, 5)
    mc = ap.gradient_mc(env, features, jax.random.key(0), 20, alpha=0.1, num_steps=100)
    td = ap.semi_gradient_td(env, features, jax.random.key(0), 20, alpha=0.1, n=100, num_steps=100)
    np.testing.assert_allclose(np.asarray(td.w), np.asarray(mc.w), rtol=1e-5, atol=1e-6)


def test_tabular_td0_reaches_the_random_walk_values():
    env = envs.RandomWalk()  # Example 6.2: v = 1/6 .. 5/6
    result = ap.semi_gradient_td(env, lambda p: ap.state_aggregation(p, 5, 5), jax.random.key(1), 3000, alpha=0.02,
                                 num_steps=200)
    assert int(result.episodes_cut) == 0
    averaged = np.asarray(result.history[1000:]).mean(0)  # Polyak average of the constant-step iterates
    np.testing.assert_allclose(averaged, np.arange(1, 6) / 6, atol=0.02)


def test_linear_td_and_gradient_mc_reach_their_closed_form_fixed_points():
    # a 20-state walk with jumps of up to 4, aggregated into 5 groups: the TD fixed point (eq. 9.12) and the VE
    # minimiser differ (bootstrapping with a coarse representation), and each method goes to its own.
    env = envs.RandomWalk(num_states=20, max_jump=4, left_reward=-1.0)
    P, R, T = env.tabular_model()
    X = np.asarray(jax.vmap(lambda p: ap.state_aggregation(p, 20, 5))(jnp.arange(22)))
    start = np.eye(22)[env.start_position]
    fixed = dp.linear_fixed_points(P, R, T, np.ones((22, 1)), start, X)
    assert np.max(np.abs(fixed["td"] - fixed["mc"])) > 0.05
    features = lambda p: ap.state_aggregation(p, 20, 5)
    for name, method, alpha in (("td", ap.semi_gradient_td, 0.01), ("mc", ap.gradient_mc, 0.005)):
        result = method(env, features, jax.random.key(2), 12_000, alpha=alpha, num_steps=300, batch_size=2000)
        averaged = np.asarray(result.history[2000:]).mean(0)  # Polyak average of constant-step iterates
        np.testing.assert_allclose(averaged, fixed[name], atol=0.035, err_msg=name)
        other = fixed["mc" if name == "td" else "td"]
        assert np.linalg.norm(averaged - fixed[name]) < 0.5 * np.linalg.norm(averaged - other), name


def test_fourier_basis_and_tile_coder():
    basis = ap.FourierBasis(order=2, low=(-1.0, 0.0), high=(1.0, 2.0))
    s = np.array([0.3, 1.7])
    unit = (s - [-1, 0]) / [2, 2]
    expected = [np.cos(np.pi * (c1 * unit[0] + c2 * unit[1])) for c1 in range(3) for c2 in range(3)]
    np.testing.assert_allclose(np.asarray(basis(jnp.asarray(s))), expected, rtol=1e-5, atol=1e-6)
    assert basis.num_features == 9 and basis.learning_rate_scales[0] == 1.0
    coder = ap.TileCoder(num_tilings=8, tiles=8, low=(-1.2, -0.07), high=(0.6, 0.07))
    points = jax.random.uniform(jax.random.key(0), (500, 2), minval=jnp.array([-1.2, -0.07]),
                                maxval=jnp.array([0.6, 0.07]))
    x = np.asarray(jax.vmap(coder)(points))
    assert x.shape == (500, coder.num_features) and np.all(x.sum(1) == 8)
    indices = np.asarray(jax.vmap(coder.indices)(points))
    assert np.all(indices // coder.tiles_per_tiling == np.arange(8))  # one tile per tiling
    # generalisation: a point and a neighbour closer than a tile width share tiles, far points share none
    near = np.asarray(coder(points[0] + jnp.array([0.01, 0.0])))
    far = np.asarray(coder(points[0] + jnp.array([0.9, 0.0]) * jnp.sign(-points[0, 0])))
    assert 4 <= near @ x[0] <= 8 and far @ x[0] == 0


def test_linear_q_learning_finds_the_optimal_grid_policy():
    env = envs.GridWorld(max_steps=100)
    features = lambda p: jax.nn.one_hot(p, 16)  # tabular: linear Q-learning is Q-learning
    config = ap.LinearQConfig(num_envs=16, num_iterations=1500, alpha=0.5, gamma=1.0, epsilon_start=0.5,
                              epsilon_end=0.1, epsilon_steps=1000)
    W, metrics = ap.linear_q_learning(env, features, jax.random.key(0), config)
    P, R, T = env.tabular_model()
    v_star, _ = dp.value_iteration(P, R, T)
    policy = np.asarray(jnp.argmax(W.T, -1))
    np.testing.assert_allclose(dp.policy_evaluation(P, R, T, policy), v_star, atol=1e-9)
    assert metrics.returns.shape == (1500,) and int(metrics.episodes.sum()) > 1000
    for algorithm in ("sarsa",):
        W, _ = ap.linear_q_learning(env, features, jax.random.key(0),
                                    ap.LinearQConfig(**{**config.__dict__, "algorithm": algorithm}))
        assert np.mean(dp.policy_evaluation(P, R, T, np.asarray(jnp.argmax(W.T, -1))) - v_star) > -1.0


def test_bad_input_fails_clearly():
    env = envs.RandomWalk()
    features = lambda p: ap.state_aggregation(p, 5, 5)
    with pytest.raises(ValueError, match="num_groups must divide num_states, got 3 and 5"):
        ap.state_aggregation(jnp.int32(1), 5, 3)
    with pytest.raises(ValueError, match=r"alpha must be a real number in \(0.0, inf\), got 0"):
        ap.gradient_mc(env, features, jax.random.key(0), 10, alpha=0)
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        ap.semi_gradient_td(env, features, jax.random.key(0), 10, alpha=0.1, n=0)
    with pytest.raises(ValueError, match=r"w0 must be \(d,\)"):
        ap.gradient_mc(env, features, jax.random.key(0), 10, alpha=0.1, w0=jnp.zeros((5, 1)))
    with pytest.raises(ValueError, match=r"FourierBasis expects a state of shape \(2,\), got \(3,\)"):
        ap.FourierBasis(order=1, low=(0.0, 0.0), high=(1.0, 1.0))(jnp.zeros(3))
    with pytest.raises(ValueError, match="algorithm='dqn' is not valid"):
        ap.LinearQConfig(algorithm="dqn")
    with pytest.raises(ValueError, match="num_iterations must be a positive int, got 0"):
        ap.LinearQConfig(num_iterations=0)
