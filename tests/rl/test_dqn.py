"""DQN: the pure replay buffer against a Python deque, the loss against NumPy, the compiled loop against a
step-by-step NumPy reimplementation, and a short compiled training run."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.rl import dqn, envs


def test_replay_buffer_is_a_ring_like_a_deque():
    example = {"x": jnp.zeros(2), "a": jnp.int32(0)}
    buffer = dqn.replay_buffer_init(5, example)
    reference = collections.deque(maxlen=5)
    for step, size in enumerate((3, 1, 4, 5)):
        items = np.arange(size) + 10 * step
        buffer = jax.jit(dqn.replay_buffer_add)(buffer, {"x": jnp.stack([jnp.asarray(items, jnp.float32)] * 2, 1),
                                                         "a": jnp.asarray(items, jnp.int32)})
        reference.extend(items.tolist())
        assert int(buffer.size) == len(reference)
        assert sorted(np.asarray(buffer.data["a"])[:int(buffer.size)].tolist()) == sorted(reference)
    sample = dqn.replay_buffer_sample(buffer, jax.random.key(0), 1000)
    assert set(np.asarray(sample["a"]).tolist()) == set(reference)  # only filled slots, all of them
    np.testing.assert_array_equal(np.asarray(sample["x"])[:, 0], np.asarray(sample["a"]))
    with pytest.raises(ValueError, match="cannot add 6 items to a buffer of capacity 5"):
        dqn.replay_buffer_add(buffer, {"x": jnp.zeros((6, 2)), "a": jnp.zeros(6, jnp.int32)})
    with pytest.raises(ValueError, match=r"expected \(B, 2\) float32, got \(3, 4\) float32"):
        dqn.replay_buffer_add(buffer, {"x": jnp.zeros((3, 4)), "a": jnp.zeros(3, jnp.int32)})


@pytest.mark.parametrize("double", [False, True])
def test_td_loss_matches_numpy(double):
    rng = np.random.default_rng(0)
    W, W_target = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    batch = dqn.Transition(rng.standard_normal((6, 3)).astype(np.float32), rng.integers(0, 2, 6).astype(np.int32),
                           rng.standard_normal(6).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32),
                           np.array([0, 1, 0, 0, 1, 0], bool))
    q_apply = lambda p, obs: obs @ p
    loss = dqn.td_loss(q_apply, jnp.asarray(W, jnp.float32), jnp.asarray(W_target, jnp.float32),
                       jax.tree.map(jnp.asarray, batch), 0.9, double=double, loss="mse")
    q, q_next_target = batch.observation @ W, batch.next_observation @ W_target
    a_star = (batch.next_observation @ W if double else q_next_target).argmax(1)
    y = batch.reward + 0.9 * (1 - batch.terminated) * q_next_target[np.arange(6), a_star]
    expected = np.mean(0.5 * (y - q[np.arange(6), batch.action]) ** 2)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def _numpy_dqn(env, config: dqn.DQNConfig, params, key):
    """The loop of `dqn_train_from` written out in NumPy (float64) with plain Python control flow: a list as the
    ring buffer, explicit train_every / target-update / epsilon arithmetic, a hand-written MLP backward pass, global
    norm clipping and Adam. Random draws use the same keys as the compiled loop. Returns (params, losses)."""
    p = [[np.asarray(layer[n][...], np.float64) for n in ("kernel", "bias")] for layer in params["layers"].values()]
    target = [[a.copy() for a in pair] for pair in p]
    m, v = [[0 * a for a in pair] for pair in p], [[0 * a for a in pair] for pair in p]
    N, B = config.num_envs, config.batch_size

    def forward(weights, x):
        hs = [x]
        for i, (W, b) in enumerate(weights):
            z = hs[-1] @ W + b
            hs.append(np.maximum(z, 0) if i < len(weights) - 1 else z)
        return hs

    @jax.jit
    def draws(k, filled):  # the keys the compiled iteration splits, and what it draws from them
        k_act, k_env, k_learn = jax.random.split(k, 3)
        k_explore, k_action = jax.vmap(jax.random.split, out_axes=1)(jax.random.split(k_act, N))
        k_step, k_reset = jax.vmap(jax.random.split, out_axes=1)(jax.random.split(k_env, N))
        return (jax.vmap(jax.random.uniform)(k_explore), jax.vmap(lambda k: jax.random.randint(
            k, (), 0, env.num_actions))(k_action), k_step, k_reset, jax.random.randint(k_learn, (B,), 0, filled))

    step_fn, reset_fn = jax.jit(env.step), jax.jit(env.reset)
    k_reset, k_loop = jax.random.split(key)
    states, observations = [], []
    for k in jax.random.split(k_reset, N):
        state, observation = reset_fn(k)
        states.append(state), observations.append(np.asarray(observation, np.float64))
    buffer, position, updates, losses = [], 0, 0, []
    decay = max(int(config.epsilon_fraction * config.num_iterations), 1)
    for step, k in enumerate(jax.random.split(k_loop, config.num_iterations)):
        epsilon = config.epsilon_start + (config.epsilon_end - config.epsilon_start) * min(step / decay, 1.0)
        uniform, random_action, k_step, k_new, index = draws(k, min((step + 1) * N, config.buffer_size))
        q = forward(p, np.stack(observations))[-1]
        for i in range(N):
            action = int(random_action[i]) if float(uniform[i]) < epsilon else int(q[i].argmax())
            out = step_fn(states[i], np.int32(action), k_step[i])
            item = (observations[i], action, float(out.reward), np.asarray(out.observation, np.float64),
                    bool(out.terminated))
            if len(buffer) < config.buffer_size:
                buffer.append(item)
            else:
                buffer[position] = item
            position = (position + 1) % config.buffer_size
            states[i], observations[i] = reset_fn(k_new[i]) if bool(out.terminated | out.truncated) else (
                out.state, out.observation)
            observations[i] = np.asarray(observations[i], np.float64)
        loss = 0.0
        if step >= config.learning_starts and step % config.train_every == 0:
            obs, act, rew, nxt, term = (np.array([buffer[j][f] for j in np.asarray(index)]) for f in range(5))
            rows = np.arange(B)
            hs, q_next_target = forward(p, obs), forward(target, nxt)[-1]
            a_star = (forward(p, nxt)[-1] if config.double else q_next_target).argmax(1)
            error = rew + config.gamma * np.where(term, 0.0, q_next_target[rows, a_star]) - hs[-1][rows, act]
            huber = config.loss == "huber"
            loss = np.mean(np.where(np.abs(error) <= 1, 0.5 * error ** 2, np.abs(error) - 0.5) if huber
                           else 0.5 * error ** 2)
            dz = np.zeros_like(hs[-1])
            dz[rows, act] = -(np.clip(error, -1, 1) if huber else error) / B
            grads = [None] * len(p)
            for i in reversed(range(len(p))):
                grads[i] = [hs[i].T @ dz, dz.sum(0)]
                dz = (dz @ p[i][0].T) * (hs[i] > 0)
            scale = min(1.0, config.max_grad_norm / np.sqrt(sum((g ** 2).sum() for pair in grads for g in pair)))
            updates += 1
            for i in range(len(p)):
                for j in range(2):
                    g = grads[i][j] * scale
                    m[i][j] = 0.9 * m[i][j] + 0.1 * g
                    v[i][j] = 0.999 * v[i][j] + 0.001 * g ** 2
                    p[i][j] = p[i][j] - config.learning_rate * (m[i][j] / (1 - 0.9 ** updates)) / (
                        np.sqrt(v[i][j] / (1 - 0.999 ** updates)) + 1e-8)
        if (step + 1) % config.target_update_every == 0:
            target = [[a.copy() for a in pair] for pair in p]
        losses.append(loss)
    return p, np.array(losses)


def test_compiled_loop_matches_a_numpy_reimplementation():
    # the ring buffer wraps (2 envs x 14 iterations > 8 slots); train_every, target copies, epsilon decay, double-DQN
    # targets, the Huber loss, Adam's state and gradient clipping all act: a miscount or a reset anywhere (or state
    # shared between vmapped seeds) moves the parameters
    env = envs.CartPole()
    config = dqn.DQNConfig(num_envs=2, num_iterations=14, buffer_size=8, batch_size=4, learning_rate=0.05,
                           target_update_every=3, learning_starts=2, train_every=2, epsilon_fraction=0.5,
                           max_grad_norm=0.5, hidden=(8,), double=True, loss="huber")
    graphdef, params = dqn.init_q_network(env, jax.random.key(1), config.hidden)
    other = dqn.init_q_network(env, jax.random.key(3), config.hidden)[1]
    trained, metrics = jax.vmap(lambda p, k: dqn.dqn_train_from(env, config, graphdef, p, k))(
        jax.tree.map(lambda a, b: jnp.stack([a, b]), params, other), jnp.stack([jax.random.key(2), jax.random.key(4)]))
    expected, losses = _numpy_dqn(env, config, params, jax.random.key(2))
    np.testing.assert_allclose(np.asarray(metrics.loss[0]), losses, rtol=1e-4, atol=1e-5)
    assert np.count_nonzero(losses) == 6  # iterations 2, 4, ..., 12
    for layer, (W, b) in zip(trained["layers"].values(), expected):
        np.testing.assert_allclose(np.asarray(layer["kernel"][...][0]), W, atol=1e-5)
        np.testing.assert_allclose(np.asarray(layer["bias"][...][0]), b, atol=1e-5)
    assert max(np.abs(W - np.asarray(layer["kernel"][...])).max() for layer, (W, _) in
               zip(params["layers"].values(), expected)) > 0.05  # the parameters did move


def test_dqn_trains_compiled_and_improves_on_cartpole():
    # the default config, shortened to 3000 iterations (24k environment steps). With loss="huber" (the old default)
    # this fails: the Q-values pass 1 / (1 - gamma) = 100 (253 here) and the policy collapses to one action (9.6)
    env = envs.CartPole()
    config = dqn.DQNConfig(num_iterations=3000)
    result = dqn.dqn_train(env, jax.random.key(0), config)
    m = jax.tree.map(np.asarray, result.metrics)
    assert m.returns.shape == (3000,) and np.all(np.isfinite(m.loss)) and np.all(m.loss[:config.learning_starts] == 0)
    first = m.returns[:600].sum() / m.episodes[:600].sum()
    last = m.returns[-600:].sum() / m.episodes[-600:].sum()
    assert last > 3 * first and last > 150, (first, last)  # random play lasts ~22 steps; 245 here
    starts = jax.vmap(lambda k: env.reset(k)[1])(jax.random.split(jax.random.key(1), 64))
    q = np.asarray(result.q_function()(starts))
    assert q.shape == (64, 2) and 0 < q.max() < 1.2 / (1 - config.gamma), q.max()  # values within the return bound
    assert isinstance(nnx.merge(result.graphdef, result.params), dqn.QNetwork)


def test_bad_input_fails_clearly():
    with pytest.raises(ValueError, match="DQNConfig.buffer_size must hold one iteration's 8 transitions"):
        dqn.DQNConfig(num_envs=8, buffer_size=4)
    with pytest.raises(ValueError, match="DQNConfig.num_iterations must be a positive int, got 0"):
        dqn.DQNConfig(num_iterations=0)
    with pytest.raises(ValueError, match=r"QNetwork expects observations \(..., 4\), got shape \(2, 3\)"):
        dqn.QNetwork(4, 2, rngs=nnx.Rngs(0))(jnp.zeros((2, 3)))
    with pytest.raises(TypeError, match="config must be a DQNConfig"):
        dqn.dqn_train(envs.CartPole(), jax.random.key(0), {"num_envs": 2})
