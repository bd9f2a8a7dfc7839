"""Monte Carlo prediction and control (Sutton & Barto, chapter 5), compiled end to end.

Monte Carlo methods learn values from sampled returns instead of a model: the value of a state is the mean of
the returns that followed its visits (the mean-estimation problem: the sample mean of i.i.d. returns converges to
their expectation). Here episodes are generated `batch_size` at a time (`rollouts`: a vmap of a `lax.scan`), and
a `lax.scan` over batches accumulates per-state sums, so a whole run is one jitted program.

- `mc_prediction`: first-visit or every-visit MC prediction of v_pi (section 5.1), as sample averages.
- `mc_control_exploring_starts`: Monte Carlo ES (section 5.3).
- `mc_control_epsilon_soft`: on-policy first-visit MC control with epsilon-greedy policies (section 5.4).
- `off_policy_mc_prediction`: off-policy prediction by ordinary (eq. 5.5) or weighted (eq. 5.6) importance
  sampling; `importance_sampling_curve` gives the running estimates of both after each episode (Figure 5.3).

Within a batch, episodes follow the policy as it was at the start of the batch; with `batch_size=1` the control
methods are exactly the book's one-episode-at-a-time algorithms.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.ops.checks import positive_int, real_in_range
from jaxmodels.rl.rollout import check_table, greedy_policy, rollouts, tabular_policy


def discounted_returns(rewards: jax.Array, valid: jax.Array, gamma: float) -> jax.Array:
    """G_t = R_{t+1} + gamma G_{t+1} over the valid steps (Sutton & Barto eq. 3.9), 0 elsewhere.
    rewards (..., T) float, valid (..., T) bool -> (..., T) float32."""
    rewards = jnp.where(valid, rewards, 0.0).astype(jnp.float32)

    def body(g, r):
        g = r + gamma * g
        return g, g

    _, g = jax.lax.scan(body, jnp.zeros(rewards.shape[:-1], jnp.float32), jnp.moveaxis(rewards, -1, 0), reverse=True)
    return jnp.where(valid, jnp.moveaxis(g, 0, -1), 0.0)


def first_visits(indices: jax.Array, valid: jax.Array, num_indices: int) -> jax.Array:
    """(T,) bool: step t is valid and the first valid step of the episode with indices[t] (first-visit MC).
    indices (T,) int in [0, num_indices), valid (T,) bool."""
    def body(seen, x):
        i, v = x
        first = v & ~seen[i]
        return seen.at[i].set(seen[i] | v), first

    _, first = jax.lax.scan(body, jnp.zeros(num_indices, bool), (indices, valid))
    return first


class MCResult(NamedTuple):
    """value (S,) float32: the estimate (0 where never visited); count (S,) float32: the visits (returns) averaged;
    standard_error (S,) float32: sample standard deviation / sqrt(count) of those returns (for first-visit MC the
    returns of a state are i.i.d.; for every-visit ones they are not, and this understates it; 0 below 2 visits);
    episodes_cut () int32: episodes that did not reach a terminal state within num_steps steps or the
    environment's episode limit (their returns are partial; choose num_steps so that this is 0)."""
    value: jax.Array
    count: jax.Array
    standard_error: jax.Array
    episodes_cut: jax.Array


class ControlResult(NamedTuple):
    """q (S, A) float32: action-value estimates (sample averages; 0 where never visited); count (S, A) float32;
    policy (S,) int32: the greedy policy argmax_a q (ties to the lowest action)."""
    q: jax.Array
    count: jax.Array
    policy: jax.Array


def _check_run(env, num_episodes, batch_size, num_steps, gamma) -> tuple[int, int, int]:
    positive_int("num_episodes", num_episodes)
    positive_int("batch_size", batch_size)
    num_steps = positive_int("num_steps (the rollout length)", env.max_steps if num_steps is None else num_steps)
    real_in_range("gamma", gamma, 0.0, 1.0)
    batch = min(batch_size, num_episodes)
    return batch, math.ceil(num_episodes / batch), num_steps


def _check_tabular(env) -> None:
    for attribute in ("num_indices", "state_index", "state_from_index", "nonterminal_indices"):
        if not hasattr(env, attribute):
            raise TypeError(f"{type(env).__name__} is not a tabular environment (it has no {attribute}); Monte Carlo "
                            f"tabular methods need GridWorld, Blackjack, RandomWalk or another env with state indices")


def _start_states(env, start_index, batch):
    if start_index is None:
        return None
    index = int(start_index)
    if not 0 <= index < env.num_indices:
        raise ValueError(f"start_index must be a state index in [0, {env.num_indices}), got {start_index}")
    return jax.vmap(env.state_from_index)(jnp.full((batch,), index, jnp.int32))


def _cut(episodes) -> jax.Array:
    """The episodes that did not reach a terminal state (cut by the rollout length or the episode limit)."""
    return jnp.sum(~episodes.terminated, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("env", "policy_fn", "num_episodes", "batch", "num_batches",
                                             "num_steps", "gamma", "first_visit", "start_index"))
def _prediction_sums(env, policy_fn, key, *, num_episodes, batch, num_batches, num_steps, gamma, first_visit,
                     start_index):
    S = env.num_indices
    starts = _start_states(env, start_index, batch)

    def one_batch(carry, xs):
        k, b = xs
        episodes = rollouts(env, policy_fn, k, batch, num_steps, initial_states=starts)
        index = jax.vmap(jax.vmap(env.state_index))(episodes.state)
        g = discounted_returns(episodes.reward, episodes.valid, gamma)
        mask = jax.vmap(first_visits, (0, 0, None))(index, episodes.valid, S) if first_visit else episodes.valid
        mask = mask & (b * batch + jnp.arange(batch) < num_episodes)[:, None]
        w = mask.astype(jnp.float32).ravel()
        sums = [jax.ops.segment_sum(x, index.ravel(), S) for x in (w, w * g.ravel(), w * g.ravel() ** 2)]
        return tuple(c + s for c, s in zip(carry, sums)), _cut(episodes)

    zeros = tuple(jnp.zeros(S, jnp.float32) for _ in range(3))
    (count, total, total_sq), cut = jax.lax.scan(one_batch, zeros,
                                                 (jax.random.split(key, num_batches), jnp.arange(num_batches)))
    return count, total, total_sq, jnp.sum(cut)


def _policy_fn(env, policy):
    return policy if callable(policy) else tabular_policy(env, policy)


def mc_prediction(env, policy, key, num_episodes: int, *, gamma: float = 1.0, first_visit: bool = True,
                  batch_size: int = 1024, num_steps: int | None = None, start_index: int | None = None) -> MCResult:
    """First-visit (or every-visit) Monte Carlo prediction of v_pi (Sutton & Barto section 5.1): the sample mean
    of the returns G_t (eq. 3.9) that followed the first (every) visit to each state, over `num_episodes` episodes.

    env: a tabular environment (GridWorld, Blackjack, RandomWalk); policy: (S, A) probabilities over state
    indices, or a function (key, state) -> action; key: PRNG key; num_steps: the rollout length (default
    env.max_steps); start_index: start every episode in this state (default env.reset). Returns `MCResult`.
    Episodes are generated batch_size at a time (vmap) inside one jitted lax.scan.
    """
    _check_tabular(env)
    batch, num_batches, num_steps = _check_run(env, num_episodes, batch_size, num_steps, gamma)
    count, total, total_sq, cut = _prediction_sums(
        env, _policy_fn(env, policy), key, num_episodes=num_episodes, batch=batch, num_batches=num_batches,
        num_steps=num_steps, gamma=float(gamma), first_visit=bool(first_visit), start_index=start_index)
    return _averages(count, total, total_sq, cut)


def _averages(count, total, total_sq, cut) -> MCResult:
    n = jnp.maximum(count, 1.0)
    mean = total / n
    var = jnp.maximum(total_sq / n - mean ** 2, 0.0) * n / jnp.maximum(n - 1.0, 1.0)
    se = jnp.where(count > 1, jnp.sqrt(var / n), 0.0)
    return MCResult(jnp.where(count > 0, mean, 0.0), count, se, cut)


def _pair_statistics(env, episodes, gamma, live):
    """Per (state, action) sums of the first-visit returns of a batch of episodes: (count, total) (S, A)."""
    S, A = env.num_indices, env.num_actions
    index = jax.vmap(jax.vmap(env.state_index))(episodes.state)
    pair = index * A + episodes.action
    g = discounted_returns(episodes.reward, episodes.valid, gamma)
    mask = jax.vmap(first_visits, (0, 0, None))(pair, episodes.valid, S * A) & live[:, None]
    w = mask.astype(jnp.float32).ravel()
    count = jax.ops.segment_sum(w, pair.ravel(), S * A).reshape(S, A)
    total = jax.ops.segment_sum(w * g.ravel(), pair.ravel(), S * A).reshape(S, A)
    return count, total


def _greedy(q, count, policy):
    """argmax_a q(s, .) where s was visited, else the current policy's action."""
    return jnp.where(count.sum(-1) > 0, jnp.argmax(q, -1), policy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("env", "num_episodes", "batch", "num_batches", "num_steps", "gamma",
                                             "epsilon"))
def _control(env, key, policy, *, num_episodes, batch, num_batches, num_steps, gamma, epsilon):
    S, A = env.num_indices, env.num_actions
    starts = jnp.asarray(env.nonterminal_indices, jnp.int32)

    def one_batch(carry, xs):
        count, total, policy = carry
        k, b = xs
        k_start, k_action, k_run = jax.random.split(k, 3)
        live = b * batch + jnp.arange(batch) < num_episodes
        if epsilon is None:  # exploring starts: a random non-terminal state and a random first action
            initial = jax.vmap(env.state_from_index)(jax.random.choice(k_start, starts, (batch,)))
            first = jax.random.randint(k_action, (batch,), 0, A)
            episodes = rollouts(env, greedy_policy(env, policy), k_run, batch, num_steps, initial_states=initial,
                                first_actions=first)
        else:  # epsilon-greedy with respect to the current greedy policy
            probs = (1.0 - epsilon) * jax.nn.one_hot(policy, A) + epsilon / A
            episodes = rollouts(env, tabular_policy(env, probs), k_run, batch, num_steps)
        c, t = _pair_statistics(env, episodes, gamma, live)
        count, total = count + c, total + t
        q = total / jnp.maximum(count, 1.0)
        return (count, total, _greedy(q, count, policy)), None

    zeros = jnp.zeros((S, A), jnp.float32)
    (count, total, policy), _ = jax.lax.scan(one_batch, (zeros, zeros, policy),
                                             (jax.random.split(key, num_batches), jnp.arange(num_batches)))
    return ControlResult(total / jnp.maximum(count, 1.0), count, policy)


def _initial_policy(env, initial_policy):
    if initial_policy is None:
        return jnp.zeros(env.num_indices, jnp.int32)
    policy = check_table("initial_policy", initial_policy, (env.num_indices,))
    if not jnp.issubdtype(policy.dtype, jnp.integer):
        raise TypeError(f"initial_policy must hold integer actions, got dtype {policy.dtype}")
    values = np.asarray(policy)
    if values.min() < 0 or values.max() >= env.num_actions:
        raise ValueError(f"initial_policy must hold actions in [0, {env.num_actions}), got values from "
                         f"{values.min()} to {values.max()}")
    return policy.astype(jnp.int32)


def mc_control_exploring_starts(env, key, num_episodes: int, *, initial_policy=None, gamma: float = 1.0,
                                batch_size: int = 1, num_steps: int | None = None) -> ControlResult:
    """Monte Carlo ES (Sutton & Barto section 5.3): each episode starts from a uniformly random non-terminal state
    and a uniformly random action, then follows the greedy policy; Q(s, a) is the mean of the first-visit returns
    after (s, a), and the policy is made greedy with respect to Q at the visited states after every batch of
    `batch_size` episodes (1: the book's algorithm). initial_policy: (S,) int actions (default all 0).
    Returns `ControlResult`."""
    _check_tabular(env)
    batch, num_batches, num_steps = _check_run(env, num_episodes, batch_size, num_steps, gamma)
    return _control(env, key, _initial_policy(env, initial_policy), num_episodes=num_episodes, batch=batch,
                    num_batches=num_batches, num_steps=num_steps, gamma=float(gamma), epsilon=None)


def mc_control_epsilon_soft(env, key, num_episodes: int, *, epsilon: float = 0.1, initial_policy=None,
                            gamma: float = 1.0, batch_size: int = 1, num_steps: int | None = None) -> ControlResult:
    """On-policy first-visit MC control for epsilon-soft policies (Sutton & Barto section 5.4): episodes start from
    env.reset and follow the epsilon-greedy policy of the current Q (probability 1 - epsilon + epsilon / A for the
    greedy action, epsilon / A for each other); Q averages first-visit returns, the greedy action is updated after
    every batch. Converges to the best epsilon-soft policy. Returns `ControlResult` (its `policy` the greedy one)."""
    _check_tabular(env)
    real_in_range("epsilon", epsilon, 0.0, 1.0)
    batch, num_batches, num_steps = _check_run(env, num_episodes, batch_size, num_steps, gamma)
    return _control(env, key, _initial_policy(env, initial_policy), num_episodes=num_episodes, batch=batch,
                    num_batches=num_batches, num_steps=num_steps, gamma=float(gamma), epsilon=float(epsilon))


# --------------------------------------------------------------------------------------------- off-policy
def importance_ratios(target_probs: jax.Array, behaviour_probs: jax.Array, valid: jax.Array) -> jax.Array:
    """rho_{t:T-1} = prod_{k=t}^{T-1} pi(A_k|S_k) / b(A_k|S_k) (Sutton & Barto eq. 5.3) for every step t of an
    episode. target_probs, behaviour_probs (..., T): pi and b of the actions taken; valid (..., T) bool.
    Returns (..., T) float32 (1 on invalid steps; a ratio with b = 0 is not defined: b must cover pi)."""
    step = jnp.where(valid, target_probs / jnp.where(valid, behaviour_probs, 1.0), 1.0).astype(jnp.float32)
    return jnp.flip(jnp.cumprod(jnp.flip(step, -1), -1), -1)


def importance_sampling_curve(ratios: jax.Array, returns: jax.Array, *, weighted: bool) -> jax.Array:
    """Running estimates of v_pi(s) after 1, 2, ..., N episodes from N returns G_i of s under the behaviour policy
    and their ratios rho_i: ordinary importance sampling sum rho_i G_i / n (Sutton & Barto eq. 5.5, unbiased) or
    weighted sum rho_i G_i / sum rho_i (eq. 5.6, biased, lower variance; 0 while sum rho_i = 0).
    ratios, returns (..., N) -> (..., N) float32."""
    ratios, returns = jnp.asarray(ratios, jnp.float32), jnp.asarray(returns, jnp.float32)
    if ratios.shape != returns.shape:
        raise ValueError(f"ratios and returns must have one shape, got {ratios.shape} and {returns.shape}")
    numerator = jnp.cumsum(ratios * returns, -1)
    if weighted:
        denominator = jnp.cumsum(ratios, -1)
        return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), 0.0)
    return numerator / jnp.arange(1, ratios.shape[-1] + 1, dtype=jnp.float32)


def _off_policy_episodes(env, target, behaviour, key, num_episodes, num_steps, start_index, gamma):
    episodes = rollouts(env, tabular_policy(env, behaviour), key, num_episodes, num_steps,
                        initial_states=_start_states(env, start_index, num_episodes))
    index = jax.vmap(jax.vmap(env.state_index))(episodes.state)
    rho = importance_ratios(target[index, episodes.action], behaviour[index, episodes.action], episodes.valid)
    return episodes, index, rho, discounted_returns(episodes.reward, episodes.valid, gamma)


@functools.partial(jax.jit, static_argnames=("env", "num_episodes", "num_steps", "start_index", "gamma"))
def off_policy_start_returns(env, target, behaviour, key, num_episodes: int, *, start_index: int,
                             num_steps: int | None = None, gamma: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(rho_{0:T-1} (N,), G_0 (N,)) of `num_episodes` episodes that start in state `start_index` and follow the
    behaviour policy: the inputs of `importance_sampling_curve` (Sutton & Barto Example 5.4 / Figure 5.3).
    target, behaviour: (S, A) probabilities (behaviour > 0 wherever target > 0)."""
    num_steps = env.max_steps if num_steps is None else num_steps
    target = check_table("target", target, (env.num_indices, env.num_actions))
    behaviour = check_table("behaviour", behaviour, (env.num_indices, env.num_actions))
    _, _, rho, g = _off_policy_episodes(env, target, behaviour, key, num_episodes, num_steps, start_index, gamma)
    return rho[:, 0], g[:, 0]


@functools.partial(jax.jit, static_argnames=("env", "num_episodes", "batch", "num_batches", "num_steps", "gamma",
                                             "first_visit", "start_index"))
def _off_policy_sums(env, target, behaviour, key, *, num_episodes, batch, num_batches, num_steps, gamma,
                     first_visit, start_index):
    S = env.num_indices

    def one_batch(carry, xs):
        k, b = xs
        episodes, index, rho, g = _off_policy_episodes(env, target, behaviour, k, batch, num_steps, start_index,
                                                       gamma)
        mask = jax.vmap(first_visits, (0, 0, None))(index, episodes.valid, S) if first_visit else episodes.valid
        mask = mask & (b * batch + jnp.arange(batch) < num_episodes)[:, None]
        w = mask.astype(jnp.float32).ravel()
        sums = [jax.ops.segment_sum(x, index.ravel(), S) for x in (w, w * rho.ravel(), w * (rho * g).ravel())]
        return tuple(c + s for c, s in zip(carry, sums)), _cut(episodes)

    zeros = tuple(jnp.zeros(S, jnp.float32) for _ in range(3))
    sums, cut = jax.lax.scan(one_batch, zeros, (jax.random.split(key, num_batches), jnp.arange(num_batches)))
    return sums, jnp.sum(cut)


def off_policy_mc_prediction(env, target, behaviour, key, num_episodes: int, *, weighted: bool = True,
                             gamma: float = 1.0, first_visit: bool = True, batch_size: int = 1024,
                             num_steps: int | None = None, start_index: int | None = None) -> MCResult:
    """Off-policy MC prediction of v_pi from episodes of the behaviour policy b (Sutton & Barto section 5.5):
    V(s) = sum rho_{t:T-1} G_t / |visits| (ordinary importance sampling, eq. 5.5) or
    sum rho_{t:T-1} G_t / sum rho_{t:T-1} (weighted, eq. 5.6), over the first (every) visits t of s.
    target, behaviour: (S, A) probabilities (b must cover pi). Returns `MCResult` (its standard_error is 0: the
    spread of importance-sampled returns is not a useful error bar here)."""
    _check_tabular(env)
    batch, num_batches, num_steps = _check_run(env, num_episodes, batch_size, num_steps, gamma)
    target = check_table("target", target, (env.num_indices, env.num_actions)).astype(jnp.float32)
    behaviour = check_table("behaviour", behaviour, (env.num_indices, env.num_actions)).astype(jnp.float32)
    (count, rho_sum, total), cut = _off_policy_sums(
        env, target, behaviour, key, num_episodes=num_episodes, batch=batch, num_batches=num_batches,
        num_steps=num_steps, gamma=float(gamma), first_visit=bool(first_visit), start_index=start_index)
    denominator = rho_sum if weighted else count
    value = jnp.where(denominator > 0, total / jnp.where(denominator > 0, denominator, 1.0), 0.0)
    return MCResult(value, count, jnp.zeros_like(value), cut)
