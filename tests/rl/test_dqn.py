"""DQN: the pure replay buffer against a Python deque, the loss against NumPy, and a short compiled training run."""

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


def test_dqn_trains_compiled_and_improves_on_cartpole():
    env = envs.CartPole()
    config = dqn.DQNConfig(num_iterations=3000)  # 24k environment steps; the defaults otherwise
    result = dqn.dqn_train(env, jax.random.key(0), config)
    m = jax.tree.map(np.asarray, result.metrics)
    assert m.returns.shape == (3000,) and np.all(np.isfinite(m.loss)) and np.all(m.loss[:config.learning_starts] == 0)
    first = m.returns[:600].sum() / m.episodes[:600].sum()
    last = m.returns[-600:].sum() / m.episodes[-600:].sum()
    assert last > 3 * first and last > 100, (first, last)  # random play lasts ~22 steps; 154 here
    q = result.q_function()(jnp.zeros((5, 4)))
    assert q.shape == (5, 2)
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
