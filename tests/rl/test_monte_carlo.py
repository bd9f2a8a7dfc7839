"""Monte Carlo prediction and control against dynamic programming's exact values (float64 NumPy), and importance
sampling's (un)biasedness where theory says so. Statistical tolerances are stated with each test; seeds are fixed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.rl import dp, envs
from jaxmodels.rl import monte_carlo as mc

RANDOM_GRID = np.full((16, 4), 0.25)


def test_dp_reproduces_the_books_numbers():
    P, R, T = envs.GridWorld().tabular_model()
    v = dp.policy_evaluation(P, R, T, RANDOM_GRID)
    np.testing.assert_allclose(v.reshape(4, 4)[0], [0, -14, -20, -22], atol=1e-9)  # Figure 4.1, k = infinity
    np.testing.assert_allclose(v.reshape(4, 4)[1], [-14, -18, -20, -20], atol=1e-9)
    P, R, T = envs.RandomWalk().tabular_model()
    np.testing.assert_allclose(dp.policy_evaluation(P, R, T, np.ones((7, 1)))[1:6], np.arange(1, 6) / 6)
    env = envs.Blackjack(naturals=False)
    P, R, T = env.tabular_model()
    v = dp.policy_evaluation(P, R, T, env.threshold_policy(20))
    assert abs(v[100 + 1 * 10 + 1] - (-0.27726)) < 3e-4  # Example 5.4: (13, dealer 2, usable ace), 1e8 episodes
    _, q = dp.value_iteration(P, R, T)
    policy = q.argmax(-1)[:200].reshape(2, 10, 10)  # Figure 5.2: (usable, sum 12..21, dealer A..10), 1 = hit
    np.testing.assert_array_equal(policy[1, 18 - 12], [1, 0, 0, 0, 0, 0, 0, 0, 1, 1])  # usable 18: hit vs A, 9, 10
    assert np.all(policy[1, :18 - 12] == 1) and np.all(policy[1, 19 - 12:] == 0)
    np.testing.assert_array_equal(policy[0, 0], [1, 1, 1, 0, 0, 0, 1, 1, 1, 1])  # 12 without ace: stick vs 4..6
    assert np.all(policy[0, 17 - 12:] == 0)


def _z_scores(result, exact, states):
    se = np.asarray(result.standard_error)[states]
    assert np.all(se > 0)
    return (np.asarray(result.value)[states] - exact[states]) / se


@pytest.mark.parametrize("first_visit", [True, False])
def test_mc_prediction_converges_to_dp_on_the_grid_world(first_visit):
    env = envs.GridWorld()
    P, R, T = env.tabular_model()
    exact = dp.policy_evaluation(P, R, T, RANDOM_GRID)
    result = mc.mc_prediction(env, RANDOM_GRID, jax.random.key(0), 4000, first_visit=first_visit, num_steps=400,
                              batch_size=1000)
    assert int(result.episodes_cut) == 0
    states = env.nonterminal_indices
    if first_visit:  # i.i.d. returns per state: every estimate within 4 standard errors
        assert np.all(np.abs(_z_scores(result, exact, states)) < 4)
    else:  # every-visit returns are correlated (the SE understates): a looser, absolute check
        assert np.max(np.abs(np.asarray(result.value)[states] - exact[states])) < 2.0
    # and it is not passing by being vague: the mean error is under a step of reward (values are -14 .. -22)
    assert np.mean(np.abs(np.asarray(result.value)[states] - exact[states])) < (0.6 if first_visit else 1.0)


@pytest.mark.parametrize("naturals", [False, True])
def test_mc_prediction_converges_to_dp_on_blackjack_stick_on_20(naturals):
    env = envs.Blackjack(naturals=naturals)
    P, R, T = env.tabular_model()
    exact = dp.policy_evaluation(P, R, T, env.threshold_policy(20))
    result = mc.mc_prediction(env, env.threshold_policy(20), jax.random.key(1), 30_000, batch_size=10_000)
    states = np.arange(200)[np.asarray(result.count)[:200] >= 20]  # the SE of fewer returns is itself too noisy
    assert states.size > 180
    if naturals:  # the natural's extra win is outside the 200-state model: skip the usable-ace 21 states
        states = states[~((states >= 100) & ((states % 100) // 10 == 9))]
    z = _z_scores(result, exact, states)
    # 190-200 estimates: none beyond 4.5 SE, and the mean squared z near 1 (it would be >> 1 for a biased env)
    assert np.max(np.abs(z)) < 4.5 and 0.7 < np.mean(z ** 2) < 1.4, (np.max(np.abs(z)), np.mean(z ** 2))


def test_mc_control_on_the_grid_world():
    env = envs.GridWorld()
    P, R, T = env.tabular_model()
    v_star, _ = dp.value_iteration(P, R, T)
    # Monte Carlo ES: 4000 episodes, the greedy policy improved every 10. Over seeds 0-4 it was optimal in 14-16 of
    # the 16 states (a mean loss of at most 0.25); the initial policy (all "up") never ends an episode.
    es = mc.mc_control_exploring_starts(env, jax.random.key(0), 4000, batch_size=10, num_steps=50)
    gap = v_star - dp.policy_evaluation(P, R, T, np.asarray(es.policy))
    assert np.sum(gap < 1e-9) >= 14 and np.mean(gap) <= 0.3, gap
    # epsilon-soft control converges to the best epsilon-soft policy: the optimal policy of the MDP in which the
    # environment replaces the action by a random one with probability epsilon (Sutton & Barto section 5.4).
    epsilon = 0.2
    P_eps = (1 - epsilon) * P + epsilon * P.mean(1, keepdims=True)
    R_eps = (1 - epsilon) * R + epsilon * R.mean(1, keepdims=True)
    v_eps, _ = dp.value_iteration(P_eps, R_eps, T)
    soft = mc.mc_control_epsilon_soft(env, jax.random.key(0), 4000, epsilon=epsilon, batch_size=10, num_steps=200)
    gap = v_eps - dp.policy_evaluation(P_eps, R_eps, T, np.asarray(soft.policy))
    initial_gap = v_eps - dp.policy_evaluation(P_eps, R_eps, T, np.zeros(16, int))
    assert np.mean(gap) < 1.0 and np.mean(initial_gap) > 50, (np.mean(gap), np.mean(initial_gap))  # seeds 0-4: <= 0.53


def test_mc_exploring_starts_on_blackjack_approaches_figure_5_2():
    env = envs.Blackjack(naturals=False)
    P, R, T = env.tabular_model()
    v_star, _ = dp.value_iteration(P, R, T)
    result = mc.mc_control_exploring_starts(env, jax.random.key(4), 30_000, batch_size=300,
                                            initial_policy=jnp.asarray(env.threshold_policy(20)[:, 1], jnp.int32))
    v = dp.policy_evaluation(P, R, T, np.asarray(result.policy))
    # the learned policy loses little against the optimum on average (only near-ties differ; 0.004 at 50k episodes),
    # and max_a Q approaches v*
    assert np.mean(v_star[:200] - v[:200]) < 0.02
    assert np.mean(np.abs(np.asarray(result.q)[:200].max(-1) - v_star[:200])) < 0.08


def test_returns_first_visits_and_ratios_match_loops():
    rng = np.random.default_rng(0)
    rewards = rng.standard_normal(9).astype(np.float32)
    valid = np.arange(9) < 6
    g = np.asarray(mc.discounted_returns(jnp.asarray(rewards), jnp.asarray(valid), 0.9))
    expected = np.zeros(9)
    for t in range(6):
        expected[t] = sum(0.9 ** k * rewards[t + k] for k in range(6 - t))
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)
    states = np.array([3, 1, 3, 2, 1, 0, 0, 0, 0])
    first = np.asarray(mc.first_visits(jnp.asarray(states), jnp.asarray(valid), 4))
    np.testing.assert_array_equal(first, [1, 1, 0, 1, 0, 1, 0, 0, 0])
    pi, b = rng.uniform(0.1, 1, 9), rng.uniform(0.1, 1, 9)
    rho = np.asarray(mc.importance_ratios(jnp.asarray(pi), jnp.asarray(b), jnp.asarray(valid)))
    np.testing.assert_allclose(rho[:6], [np.prod(pi[t:6] / b[t:6]) for t in range(6)], rtol=1e-5)


def test_ordinary_importance_sampling_is_unbiased_and_weighted_is_not_after_one_episode():
    # A one-step example: actions 0 / 1 give rewards N(1, 1) / N(-1, 1); target pi = always 0 (v_pi = 1),
    # behaviour b = uniform, so rho = 2 for action 0 and 0 for action 1. After one episode the ordinary estimate
    # rho G has mean v_pi = 1 exactly, the weighted one G 1[rho > 0] has mean 1/2 (Sutton & Barto section 5.5).
    n = 200_000
    k_action, k_reward = jax.random.split(jax.random.key(5))
    action = jax.random.bernoulli(k_action, 0.5, (n, 1)).astype(jnp.int32)
    g = jnp.where(action == 0, 1.0, -1.0) + jax.random.normal(k_reward, (n, 1))
    rho = jnp.where(action == 0, 2.0, 0.0)
    ordinary = np.asarray(mc.importance_sampling_curve(rho, g, weighted=False))[:, 0]
    weighted = np.asarray(mc.importance_sampling_curve(rho, g, weighted=True))[:, 0]
    se_o, se_w = ordinary.std() / np.sqrt(n), weighted.std() / np.sqrt(n)
    assert abs(ordinary.mean() - 1.0) < 4 * se_o
    assert abs(weighted.mean() - 0.5) < 4 * se_w and abs(weighted.mean() - 1.0) > 40 * se_w


def test_off_policy_prediction_on_blackjack_example_5_4():
    env = envs.Blackjack(naturals=False)
    P, R, T = env.tabular_model()
    target, behaviour = env.threshold_policy(20), np.full((201, 2), 0.5)
    exact = dp.policy_evaluation(P, R, T, target)[111]
    rho, g = mc.off_policy_start_returns(env, jnp.asarray(target), jnp.asarray(behaviour), jax.random.key(6),
                                         30_000, start_index=111)
    estimates = rho * g  # ordinary importance sampling, one episode each: unbiased
    assert abs(float(estimates.mean()) - exact) < 4 * float(estimates.std()) / np.sqrt(30_000)
    result = mc.off_policy_mc_prediction(env, target, behaviour, jax.random.key(7), 10_000, weighted=True,
                                         start_index=111, batch_size=5000)
    # weighted: consistent, low variance; Figure 5.3's mean squared error at 10^4 episodes is about 1e-3 (RMSE 0.03)
    assert abs(float(result.value[111]) - exact) < 0.1


def test_bad_input_fails_clearly():
    env = envs.GridWorld()
    with pytest.raises(ValueError, match=r"policy probabilities must have shape \(16, 4\), got \(4, 4\)"):
        mc.mc_prediction(env, np.full((4, 4), 0.25), jax.random.key(0), 10)
    with pytest.raises(ValueError, match="num_episodes must be a positive int, got 0"):
        mc.mc_prediction(env, RANDOM_GRID, jax.random.key(0), 0)
    with pytest.raises(ValueError, match=r"num_steps \(the rollout length\) must be a positive int, got 0"):
        mc.mc_control_exploring_starts(env, jax.random.key(0), 10, num_steps=0)
    with pytest.raises(ValueError, match="initial_policy must hold actions in"):
        mc.mc_control_exploring_starts(env, jax.random.key(0), 10, initial_policy=jnp.full(16, 4, jnp.int32))
    with pytest.raises(TypeError, match="not a tabular environment"):
        mc.mc_prediction(envs.CartPole(), RANDOM_GRID, jax.random.key(0), 10)
    with pytest.raises(ValueError, match="epsilon must be a real number in"):
        mc.mc_control_epsilon_soft(env, jax.random.key(0), 10, epsilon=1.5)
