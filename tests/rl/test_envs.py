"""Environments: pure and vmap-consistent steps, dynamics against float64 NumPy transcriptions of the textbook
equations (and gymnax's CartPole-v1 / MountainCar-v0 where gymnax is installed), tabular models against sampled
transitions, and clear errors for bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.rl import envs
from jaxmodels.rl.rollout import rollout, rollouts

ALL = [envs.GridWorld(), envs.Blackjack(), envs.RandomWalk(), envs.RandomWalk(num_states=20, max_jump=4),
       envs.CartPole(), envs.MountainCar()]


def _random_states(env, n, seed):
    """n states reached by random play from resets (each leaf (n,))."""
    policy = lambda k, s: jax.random.randint(k, (), 0, env.num_actions)
    episodes = rollouts(env, policy, jax.random.key(seed), n, 8)
    pick = jax.random.randint(jax.random.key(seed + 1), (n,), 0, 8)
    pick = jnp.minimum(pick, jnp.maximum(episodes.length - 1, 0))
    return jax.tree.map(lambda x: x[jnp.arange(n), pick], episodes.state)


@pytest.mark.parametrize("env", ALL, ids=lambda e: repr(e)[:40])
def test_step_is_pure_and_vmapped_equals_looped(env):
    n = 8
    states = _random_states(env, n, 0)
    actions = jax.random.randint(jax.random.key(2), (n,), 0, env.num_actions)
    keys = jax.random.split(jax.random.key(3), n)
    batched = jax.jit(jax.vmap(env.step))(states, actions, keys)
    again = jax.jit(jax.vmap(env.step))(states, actions, keys)
    single = jax.jit(env.step)
    for i in range(n):
        one = single(jax.tree.map(lambda x: x[i], states), actions[i], keys[i])
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(jax.tree.map(lambda x: x[i], batched))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(again)):  # same inputs, same outputs
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    s0, _ = env.reset(jax.random.key(7))
    s1, _ = env.reset(jax.random.key(7))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)))


def _cartpole_reference(state, action):
    """Barto, Sutton & Anderson (1983) cart-pole, frictionless, one explicit Euler step, float64, with gym's
    constants: g 9.8, cart 1.0 kg, pole 0.1 kg, half-length 0.5 m, force 10 N, tau 0.02 s."""
    g, m_cart, m_pole, half_length, tau = 9.8, 1.0, 0.1, 0.5, 0.02
    x, x_dot, theta, theta_dot = (np.float64(v) for v in state[:4])
    force = 10.0 if action == 1 else -10.0
    mt, ml = m_cart + m_pole, m_pole * half_length
    temp = (force + ml * theta_dot ** 2 * math.sin(theta)) / mt
    theta_acc = (g * math.sin(theta) - math.cos(theta) * temp) / (
        half_length * (4 / 3 - m_pole * math.cos(theta) ** 2 / mt))
    x_acc = temp - ml * theta_acc * math.cos(theta) / mt
    nxt = np.array([x + tau * x_dot, x_dot + tau * x_acc, theta + tau * theta_dot, theta_dot + tau * theta_acc])
    return nxt, abs(nxt[0]) > 2.4 or abs(nxt[2]) > 12 * 2 * math.pi / 360


def _mountain_car_reference(state, action):
    """Sutton & Barto section 10.1: velocity then position, each bounded; velocity 0 at the left bound."""
    position, velocity = float(state[0]), float(state[1])
    velocity = min(max(velocity + 0.001 * (action - 1) - 0.0025 * math.cos(3 * position), -0.07), 0.07)
    position = min(max(position + velocity, -1.2), 0.6)
    if position == -1.2 and velocity < 0:
        velocity = 0.0
    return np.array([position, velocity]), position >= 0.5


@pytest.mark.parametrize("env, reference, scale", [
    (envs.CartPole(), _cartpole_reference, np.array([2.4, 2.0, 0.2, 2.0])),
    (envs.MountainCar(), _mountain_car_reference, None)])
def test_continuous_dynamics_match_the_textbook_equations(env, reference, scale):
    rng = np.random.default_rng(0)
    for i in range(200):
        if scale is not None:
            obs = rng.uniform(-1, 1, 4) * scale
            state = envs.CartPoleState(*(jnp.float32(v) for v in obs), jnp.int32(0))
        else:
            obs = np.array([rng.uniform(-1.2, 0.55), rng.uniform(-0.07, 0.07)])
            state = envs.MountainCarState(jnp.float32(obs[0]), jnp.float32(obs[1]), jnp.int32(0))
        obs = np.asarray(env.observe(state), np.float64)  # the float32 state both start from
        action = int(rng.integers(env.num_actions))
        out = env.step(state, action, jax.random.key(i))
        expected, terminal = reference(obs, action)
        np.testing.assert_allclose(np.asarray(out.observation, np.float64), expected, rtol=2e-5, atol=2e-6)
        if np.all(np.abs(np.asarray(out.observation) - expected) > 1e-5):  # not on a threshold
            assert bool(out.terminated) == terminal


@pytest.mark.parametrize("name", ["CartPole-v1", "MountainCar-v0"])
def test_agrees_with_gymnax_on_shared_seeds(name):
    gymnax = pytest.importorskip("gymnax")
    theirs, params = gymnax.make(name)
    # a short episode limit for mountain car, so that random play ends (truncated) episodes too
    ours = envs.CartPole() if name == "CartPole-v1" else envs.MountainCar(max_steps=50)
    params = params.replace(max_steps_in_episode=ours.max_steps)
    key = jax.random.key(0)
    state, obs = ours.reset(key)
    g_obs, g_state = theirs.reset(key, params)
    np.testing.assert_array_equal(np.asarray(obs), np.asarray(g_obs))  # same draw from the same key
    step_ours = jax.jit(lambda s, a, k: envs.step_and_reset(ours, s, a, k))
    step_theirs = jax.jit(lambda s, a, k: theirs.step(k, s, a, params))
    actions = jax.random.randint(jax.random.key(1), (300,), 0, ours.num_actions)
    keys = jax.random.split(jax.random.key(2), 300)
    episodes = 0
    for t in range(300):  # a trajectory with automatic resets: the same observations, rewards and ends
        state, out = step_ours(state, actions[t], keys[t])
        g_obs, g_state, g_reward, g_terminated, g_truncated, info = step_theirs(g_state, actions[t], keys[t])
        np.testing.assert_allclose(np.asarray(ours.observe(state)), np.asarray(g_obs), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(out.observation), np.asarray(info["final_observation"]), rtol=1e-6,
                                   atol=1e-7)
        assert float(out.reward) == float(g_reward) and bool(out.terminated) == bool(g_terminated), t
        assert bool(out.done) == bool(g_terminated | g_truncated), t
        episodes += bool(out.done)
    assert episodes >= 2  # resets were exercised


def test_blackjack_reset_and_hits_match_the_tabular_model():
    env = envs.Blackjack(naturals=False)
    P, R, terminal = env.tabular_model()
    np.testing.assert_allclose(P.sum(-1), 1.0)
    # hits from one state: empirical next-state frequencies vs P within 5 standard errors
    index = 100 + 3 * 10 + 6  # usable ace, sum 15, dealer 7
    start = env.state_from_index(index)
    n = 20_000
    out = jax.vmap(lambda k: env.step(start, 1, k))(jax.random.split(jax.random.key(0), n))
    nxt = np.asarray(jax.vmap(env.state_index)(out.state))
    nxt = np.where(np.asarray(out.terminated), 200, nxt)
    freq = np.bincount(nxt, minlength=201) / n
    se = np.sqrt(P[index, 1] * (1 - P[index, 1]) / n) + 1e-12
    assert np.all(np.abs(freq - P[index, 1]) <= 5 * se + 1e-9)
    # sticking: the mean reward is the model's expected outcome
    out = jax.vmap(lambda k: env.step(start, 0, k))(jax.random.split(jax.random.key(1), n))
    rewards = np.asarray(out.reward)
    assert abs(rewards.mean() - R[index, 0]) < 5 * rewards.std() / math.sqrt(n)
    assert np.all(np.asarray(out.terminated))
    # resets: player sums 12..21, dealer card 1..10, tens 4/13 of the dealer cards
    states, obs = jax.vmap(env.reset)(jax.random.split(jax.random.key(2), n))
    assert np.all((np.asarray(states.player_sum) >= 12) & (np.asarray(states.player_sum) <= 21))
    assert abs(np.mean(np.asarray(states.dealer_card) == 10) - 4 / 13) < 5 * math.sqrt(4 / 13 * 9 / 13 / n)


def test_rollout_masks_after_the_end_and_random_walk_ends_at_the_edges():
    env = envs.RandomWalk()
    episode = jax.jit(lambda k: rollout(env, lambda k, s: jnp.int32(0), k, 200))(jax.random.key(0))
    length = int(episode.length)
    assert bool(episode.terminated) and 1 <= length < 200
    assert np.all(np.asarray(episode.valid[:length])) and not np.any(np.asarray(episode.valid[length:]))
    assert np.all(np.asarray(episode.reward[length:]) == 0)
    positions = np.asarray(episode.state.position[:length])
    assert np.all(np.abs(np.diff(positions)) == 1) and positions[0] == 3
    assert float(episode.reward.sum()) in (0.0, 1.0)


def test_episode_limit_truncates():
    env = envs.CartPole(max_steps=5)
    state, _ = env.reset(jax.random.key(0))
    for _ in range(5):
        out = env.step(state, 0 if _ % 2 else 1, jax.random.key(0))
        state = out.state
    assert bool(out.truncated) and not bool(out.terminated)


def test_bad_input_fails_clearly():
    cart = envs.CartPole()
    state, _ = cart.reset(jax.random.key(0))
    with pytest.raises(ValueError, match=r"CartPole action must hold values in \[0, 2\), got values from 2 to 2"):
        cart.step(state, 2, jax.random.key(0))
    with pytest.raises(ValueError, match="got values from -1"):
        envs.GridWorld().step(envs.GridWorld().reset(jax.random.key(0))[0], -1, jax.random.key(0))
    with pytest.raises(TypeError, match="action must be an integer"):
        cart.step(state, 0.5, jax.random.key(0))
    with pytest.raises(ValueError, match=r"scalar int \(vmap over a batch\), got shape \(3,\)"):
        cart.step(state, jnp.zeros(3, jnp.int32), jax.random.key(0))
    batched, _ = jax.vmap(cart.reset)(jax.random.split(jax.random.key(0), 4))
    with pytest.raises(ValueError, match=r"CartPoleState.x must be a scalar \(vmap over a batch\), got shape \(4,\)"):
        cart.step(batched, 0, jax.random.key(0))
    with pytest.raises(TypeError, match="expects a CartPoleState"):
        cart.step(envs.MountainCar().reset(jax.random.key(0))[0], 0, jax.random.key(0))
    for make in (envs.CartPole, envs.MountainCar, envs.GridWorld, envs.Blackjack, envs.RandomWalk):
        with pytest.raises(ValueError, match=r"max_steps \(the episode limit\) must be a positive int, got 0"):
            make(max_steps=0)
    with pytest.raises(ValueError, match="num_steps"):
        rollout(cart, lambda k, s: 0, jax.random.key(0), 0)
    with pytest.raises(ValueError, match="terminals must be cells"):
        envs.GridWorld(terminals=((4, 0),))
    with pytest.raises(ValueError, match="start must be a position in"):
        envs.RandomWalk(start=6)
    # traced out-of-range actions are clipped, not wrapped
    out = jax.jit(cart.step)(state, jnp.int32(7), jax.random.key(0))
    right = cart.step(state, 1, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(out.observation), np.asarray(right.observation))
