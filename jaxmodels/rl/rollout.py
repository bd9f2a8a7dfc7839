"""Episodes as fixed-shape arrays: `rollout` runs one episode with `lax.scan` (vmap it for many), masking the steps
after the episode ended, so that a batch of episodes of different lengths is one (batch, num_steps) array.

A policy is a function `policy(key, state) -> action` (a scalar int); `tabular_policy` makes one from a table of
probabilities (S, A) over a tabular environment's state indices, `greedy_policy` from a table of actions (S,).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxmodels.ops.checks import positive_int


class Episode(NamedTuple):
    """One episode of at most T = num_steps steps. state: the states S_0 .. S_{T-1} (a pytree of leaves (T, ...);
    after the end, the last state repeated); action (T,) int32: A_t; reward (T,) float32: R_{t+1} (0 after the end);
    valid (T,) bool: step t belongs to the episode; terminated () bool: it reached a terminal state (False if it
    was truncated by the environment's limit or cut at T steps: its returns are then partial)."""
    state: Any
    action: jax.Array
    reward: jax.Array
    valid: jax.Array
    terminated: jax.Array

    @property
    def length(self) -> jax.Array:
        """() int32 (or (batch,) for a batch of episodes): the number of steps taken."""
        return jnp.sum(self.valid, axis=-1, dtype=jnp.int32)


def check_table(name: str, table, shape: tuple[int, ...]) -> jax.Array:
    """`table` as an array of `shape`; ValueError naming `name` otherwise."""
    table = jnp.asarray(table)
    if table.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {table.shape}")
    return table


def tabular_policy(env, probabilities):
    """policy(key, state): an action drawn from probabilities[env.state_index(state)]; probabilities (S, A)."""
    probabilities = check_table("policy probabilities", probabilities, (env.num_indices, env.num_actions))
    logits = jnp.log(probabilities.astype(jnp.float32))
    return lambda key, state: jax.random.categorical(key, logits[env.state_index(state)]).astype(jnp.int32)


def greedy_policy(env, actions):
    """policy(key, state) = actions[env.state_index(state)]; actions (S,) int."""
    actions = check_table("policy actions", actions, (env.num_indices,))
    return lambda key, state: actions[env.state_index(state)].astype(jnp.int32)


def rollout(env, policy, key, num_steps: int, *, initial_state=None, first_action=None) -> Episode:
    """One episode of `env` under `policy`, at most `num_steps` steps, as an `Episode` of fixed shapes.

    env: an environment of `jaxmodels.rl.envs`; policy(key, state) -> action; key: a PRNG key; initial_state: the
    state S_0 (default `env.reset`); first_action: A_0 () int (exploring starts, Sutton & Barto section 5.3),
    default the policy's. One `lax.scan` of `num_steps` steps; the steps after the episode ended are masked
    (`valid`) and do not change the state. vmap over keys (and initial states) for a batch of episodes.
    """
    positive_int("num_steps (the rollout length)", num_steps)
    k_reset, k_steps = jax.random.split(key)
    state = env.reset(k_reset)[0] if initial_state is None else initial_state

    def body(carry, xs):
        state, alive = carry
        t, k = xs
        k_policy, k_env = jax.random.split(k)
        action = jnp.asarray(policy(k_policy, state), jnp.int32)
        if first_action is not None:
            action = jnp.where(t == 0, jnp.asarray(first_action, jnp.int32), action)
        out = env.step(state, action, k_env)
        new_state = jax.tree.map(lambda n, o: jnp.where(alive, n, o), out.state, state)
        record = (state, action, jnp.where(alive, out.reward, 0.0), alive, alive & out.terminated)
        return (new_state, alive & ~out.done), record

    steps = (jnp.arange(num_steps), jax.random.split(k_steps, num_steps))
    _, (states, actions, rewards, valid, terminal) = jax.lax.scan(body, (state, jnp.bool_(True)), steps)
    return Episode(states, actions, rewards.astype(jnp.float32), valid, jnp.any(terminal))


def rollouts(env, policy, key, num_episodes: int, num_steps: int, *, initial_states=None,
             first_actions=None) -> Episode:
    """`num_episodes` independent episodes (vmap of `rollout`): every leaf gains a leading (num_episodes,) axis.
    initial_states: a state pytree with leaves (num_episodes,) or None; first_actions: (num_episodes,) or None."""
    positive_int("num_episodes", num_episodes)
    keys = jax.random.split(key, num_episodes)
    run = lambda k, s, a: rollout(env, policy, k, num_steps, initial_state=s, first_action=a)
    return jax.vmap(run, in_axes=(0, None if initial_states is None else 0, None if first_actions is None else 0))(
        keys, initial_states, first_actions)
