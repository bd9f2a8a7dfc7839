"""Value-function approximation with linear features (Sutton & Barto chapters 9-10), compiled end to end.

From tables to parametrised functions: v(s) is no longer read from a table but computed as v(s, w) = w^T x(s)
from a feature vector x(s) (d,), so that similar states share what is learned and continuous states can be
handled at all. Features: `state_aggregation` (section 9.3), `FourierBasis` (section 9.5.2; Konidaris et al.
2011), `TileCoder` (section 9.5.4).

Prediction, on episodes of a fixed policy (generated batch_size at a time under vmap, then consumed in order,
so the result does not depend on batch_size):
- `gradient_mc`: gradient Monte Carlo, w <- w + alpha [G_t - v(S_t, w)] x(S_t) (eq. 9.7, the algorithm on p. 202);
- `semi_gradient_td`: n-step semi-gradient TD, w <- w + alpha [G_{t:t+n} - v(S_t, w)] x(S_t) (eq. 7.2 with
  9.7's semi-gradient; p. 209); n = 1 is semi-gradient TD(0) (p. 203).

Control, online on many environments at once (`lax.scan` over steps of a vmap over environments, automatic
resets): `linear_q_learning` (semi-gradient Q-learning or Sarsa, section 10.1, q(s, a, w) = w_a^T x(s)).
"""

import dataclasses
import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.ops.checks import one_of, positive_int, real_in_range
from jaxmodels.rl.envs import step_and_reset
from jaxmodels.rl.monte_carlo import discounted_returns
from jaxmodels.rl.rollout import rollouts


# ------------------------------------------------------------------------------------------------- features
def state_aggregation(position: jax.Array, num_states: int, num_groups: int) -> jax.Array:
    """One-hot group of a random-walk position (Sutton & Barto section 9.3, Example 9.1): positions 1..num_states
    in `num_groups` equal consecutive groups; the terminal positions 0 and num_states + 1 give zeros.
    position () int -> (num_groups,) float32. num_groups = num_states is the tabular (one-hot) case."""
    positive_int("num_states", num_states)
    positive_int("num_groups", num_groups)
    if num_states % num_groups:
        raise ValueError(f"num_groups must divide num_states, got {num_groups} and {num_states}")
    live = (position >= 1) & (position <= num_states)
    group = (jnp.clip(position, 1, num_states) - 1) // (num_states // num_groups)
    return jnp.where(live, jax.nn.one_hot(group, num_groups, dtype=jnp.float32), 0.0)


def _bounds(name, low, high) -> tuple[np.ndarray, np.ndarray]:
    low, high = np.asarray(low, np.float64).ravel(), np.asarray(high, np.float64).ravel()
    if low.shape != high.shape or low.size == 0 or not np.all(high > low):
        raise ValueError(f"{name}: low and high must be non-empty, of one length and high > low, got {low} and {high}")
    return low, high


@dataclasses.dataclass(frozen=True)
class FourierBasis:
    """Fourier cosine features x_i(s) = cos(pi c_i^T s~) for every c_i in {0, ..., order}^k (Sutton & Barto eq.
    9.18; Konidaris, Osentoski & Thomas 2011), with s~ = (s - low) / (high - low) clipped to [0, 1]^k.
    __call__(s (k,)) -> ((order + 1)^k,) float32. `learning_rate_scales` gives Konidaris et al.'s per-feature
    step-size scales 1 / ||c_i|| (1 for c = 0)."""
    order: int
    low: tuple[float, ...]
    high: tuple[float, ...]

    def __post_init__(self):
        positive_int("FourierBasis.order", self.order)
        _bounds("FourierBasis", self.low, self.high)

    @property
    def coefficients(self) -> np.ndarray:
        """(num_features, k) int: the c_i."""
        return np.array(list(itertools.product(range(self.order + 1), repeat=len(self.low))))

    @property
    def num_features(self) -> int:
        return (self.order + 1) ** len(self.low)

    @property
    def learning_rate_scales(self) -> np.ndarray:
        norms = np.linalg.norm(self.coefficients, axis=1)
        return np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 1.0)

    def __call__(self, s: jax.Array) -> jax.Array:
        low, high = _bounds("FourierBasis", self.low, self.high)
        s = jnp.asarray(s, jnp.float32)
        if s.shape != low.shape:
            raise ValueError(f"FourierBasis expects a state of shape {low.shape}, got {s.shape}")
        unit = jnp.clip((s - low) / (high - low), 0.0, 1.0)
        return jnp.cos(jnp.pi * jnp.asarray(self.coefficients, jnp.float32) @ unit)


@dataclasses.dataclass(frozen=True)
class TileCoder:
    """Tile coding (Sutton & Barto section 9.5.4): `num_tilings` grids of `tiles` tiles per dimension over
    [low, high], each offset by a fraction of a tile, tiling i by i (1, 3, 5, ...) / num_tilings tile widths in
    dimensions 1, 2, 3, ... (the book's asymmetric displacements). Each tiling has (tiles + 1)^k tiles so that the
    offset grids still cover the box; states outside are clipped into it.
    `indices(s (k,)) -> (num_tilings,) int32` (one active tile per tiling, in [0, num_features));
    `__call__(s) -> (num_features,) float32`, the binary feature vector with num_tilings ones."""
    num_tilings: int
    tiles: int
    low: tuple[float, ...]
    high: tuple[float, ...]

    def __post_init__(self):
        positive_int("TileCoder.num_tilings", self.num_tilings)
        positive_int("TileCoder.tiles", self.tiles)
        _bounds("TileCoder", self.low, self.high)

    @property
    def tiles_per_tiling(self) -> int:
        return (self.tiles + 1) ** len(self.low)

    @property
    def num_features(self) -> int:
        return self.num_tilings * self.tiles_per_tiling

    def indices(self, s: jax.Array) -> jax.Array:
        low, high = _bounds("TileCoder", self.low, self.high)
        k = low.size
        s = jnp.asarray(s, jnp.float32)
        if s.shape != (k,):
            raise ValueError(f"TileCoder expects a state of shape {(k,)}, got {s.shape}")
        scaled = jnp.clip((s - low) / (high - low), 0.0, 1.0) * self.tiles  # in tile widths
        displacement = np.arange(self.num_tilings)[:, None] * (2 * np.arange(k) + 1)[None, :] / self.num_tilings
        cell = jnp.floor(scaled[None, :] + (displacement % 1.0)).astype(jnp.int32)  # (num_tilings, k)
        cell = jnp.clip(cell, 0, self.tiles)
        strides = (self.tiles + 1) ** np.arange(k)
        return (jnp.arange(self.num_tilings) * self.tiles_per_tiling + cell @ strides).astype(jnp.int32)

    def __call__(self, s: jax.Array) -> jax.Array:
        return jnp.zeros(self.num_features, jnp.float32).at[self.indices(s)].add(1.0)


# ----------------------------------------------------------------------------------------------- prediction
class PredictionResult(NamedTuple):
    """w (d,) float32: the final weights; history (num_episodes, d) float32: the weights after each episode;
    episodes_cut () int32: episodes that did not terminate within num_steps steps or the episode limit (their
    returns are partial; choose num_steps so that this is 0)."""
    w: jax.Array
    history: jax.Array
    episodes_cut: jax.Array


def _n_step_episode(w, x, rewards, valid, alpha, gamma, n):
    """Consume one episode in order: for tau = 0 .. T-1, w += alpha (G_{tau:tau+n} - w.x_tau) x_tau, where
    G_{tau:tau+n} bootstraps from w.x_{tau+n} (the current w) when tau + n < T; n = None: the full return (MC).
    x (T, d), rewards (T,), valid (T,)."""
    length = jnp.sum(valid, dtype=jnp.int32)
    g = discounted_returns(rewards, valid, gamma)
    if n is None:
        partial, bootstrap = g, jnp.zeros_like(valid)
    else:  # sum_{i<n} gamma^i R_{tau+i+1} = G_tau - gamma^n G_{tau+n}
        shifted = jnp.concatenate([g[n:], jnp.zeros(min(n, g.shape[0]), g.dtype)])
        partial = g - gamma ** n * shifted
        bootstrap = jnp.arange(valid.shape[0]) + n < length
    x_next = jnp.concatenate([x[n:], jnp.zeros((min(n, x.shape[0]), x.shape[1]), x.dtype)]) if n else x

    def update(tau, w):
        target = partial[tau] + jnp.where(bootstrap[tau], gamma ** (n or 0) * (x_next[tau] @ w), 0.0)
        return w + alpha * (target - x[tau] @ w) * x[tau]

    return jax.lax.fori_loop(0, length, update, w)


@functools.partial(jax.jit, static_argnames=("env", "features", "policy", "num_episodes", "batch", "num_steps",
                                             "gamma", "n"))
def _linear_prediction(env, features, policy, key, w0, alpha, *, num_episodes, batch, num_steps, gamma, n):
    num_batches = math.ceil(num_episodes / batch)

    def one_batch(w, xs):
        k, b = xs
        episodes = rollouts(env, policy, k, batch, num_steps)
        x = jax.vmap(jax.vmap(lambda s: features(env.observe(s))))(episodes.state)

        def one_episode(w, e):
            live = b * batch + e < num_episodes
            new = _n_step_episode(w, x[e], episodes.reward[e], episodes.valid[e] & live, alpha, gamma, n)
            return new, new

        w, history = jax.lax.scan(one_episode, w, jnp.arange(batch))
        live = b * batch + jnp.arange(batch) < num_episodes
        return w, (history, jnp.sum(live & ~episodes.terminated, dtype=jnp.int32))

    w, (history, cut) = jax.lax.scan(one_batch, w0, (jax.random.split(key, num_batches), jnp.arange(num_batches)))
    return PredictionResult(w, history.reshape(-1, w0.shape[0])[:num_episodes], jnp.sum(cut))


def _prediction(env, features, key, num_episodes, alpha, n, gamma, policy, num_steps, batch_size, w0, num_features):
    positive_int("num_episodes", num_episodes)
    positive_int("batch_size", batch_size)
    num_steps = positive_int("num_steps (the rollout length)", env.max_steps if num_steps is None else num_steps)
    real_in_range("alpha", alpha, 0.0, include_low=False)
    real_in_range("gamma", gamma, 0.0, 1.0)
    if w0 is None:
        w0 = jnp.zeros(positive_int("num_features", num_features) if num_features else
                       jax.eval_shape(lambda: features(env.observe(env.reset(jax.random.key(0))[0]))).shape[0])
    w0 = jnp.asarray(w0, jnp.float32)
    if w0.ndim != 1:
        raise ValueError(f"w0 must be (d,), got shape {w0.shape}")
    policy = policy or (lambda k, s: jnp.int32(0))
    return _linear_prediction(env, features, policy, key, w0, jnp.float32(alpha), num_episodes=num_episodes,
                              batch=min(batch_size, num_episodes), num_steps=num_steps, gamma=float(gamma), n=n)


def gradient_mc(env, features, key, num_episodes: int, *, alpha: float, gamma: float = 1.0, policy=None,
                num_steps: int | None = None, batch_size: int = 256, w0=None) -> PredictionResult:
    """Gradient Monte Carlo prediction of v_pi with a linear v(s, w) = w^T x(s) (Sutton & Barto p. 202, eq. 9.7):
    after each episode, for t = 0 .. T-1 in order, w <- w + alpha [G_t - w^T x(S_t)] x(S_t).

    env: an environment; features: a function observation -> (d,) float32; policy: (key, state) -> action
    (default: always action 0, e.g. for RandomWalk); w0: (d,) initial weights (default zeros). Converges (with a
    decreasing alpha, or approximately with a small one) to the minimiser of the on-policy mean squared value
    error (`jaxmodels.rl.dp.linear_fixed_points` "mc"). Returns `PredictionResult`.
    """
    return _prediction(env, features, key, num_episodes, alpha, None, gamma, policy, num_steps, batch_size, w0, None)


def semi_gradient_td(env, features, key, num_episodes: int, *, alpha: float, n: int = 1, gamma: float = 1.0,
                     policy=None, num_steps: int | None = None, batch_size: int = 256, w0=None) -> PredictionResult:
    """n-step semi-gradient TD prediction with a linear v(s, w) = w^T x(s) (Sutton & Barto p. 209; n = 1 is
    semi-gradient TD(0), p. 203): for tau = 0 .. T-1 in order,
    w <- w + alpha [G_{tau:tau+n} - w^T x(S_tau)] x(S_tau), G_{tau:tau+n} = sum_{i<n} gamma^i R_{tau+i+1}
    + gamma^n w^T x(S_{tau+n}) (the bootstrap only when tau + n < T), with the w of that moment.
    Arguments as `gradient_mc`. TD(0) converges to the TD fixed point (eq. 9.12, `linear_fixed_points` "td")."""
    positive_int("n", n)
    return _prediction(env, features, key, num_episodes, alpha, n, gamma, policy, num_steps, batch_size, w0, None)


# --------------------------------------------------------------------------------------------------- control
def epsilon_greedy(key, q_values: jax.Array, epsilon) -> jax.Array:
    """An action drawn epsilon-greedily from q_values (A,): uniform with probability epsilon, else argmax. () int32."""
    k_explore, k_action = jax.random.split(key)
    random_action = jax.random.randint(k_action, (), 0, q_values.shape[-1])
    return jnp.where(jax.random.uniform(k_explore) < epsilon, random_action, jnp.argmax(q_values)).astype(jnp.int32)


def linear_schedule(start: float, end: float, steps: int):
    """step -> start + (end - start) min(step / steps, 1): a linearly decaying exploration rate."""
    return lambda step: start + (end - start) * jnp.minimum(step / max(steps, 1), 1.0)


class ControlMetrics(NamedTuple):
    """Per iteration (each: num_envs environment steps), arrays (num_iterations,): returns: sum of the returns of
    the episodes that ended in it; episodes: how many ended; epsilon: the exploration rate used; loss: the mean
    squared TD error of the update."""
    returns: jax.Array
    episodes: jax.Array
    epsilon: jax.Array
    loss: jax.Array


@dataclasses.dataclass(frozen=True)
class LinearQConfig:
    """Semi-gradient Q-learning / Sarsa with q(s, a, w) = w_a^T x(s). num_envs environments step together;
    num_iterations steps of each; alpha: step size of the update averaged over the environments (for tile coding
    Sutton & Barto use 0.5 / num_tilings, Figure 10.1); epsilon decays linearly from epsilon_start to epsilon_end
    over epsilon_steps iterations; algorithm: "q_learning" (target R + gamma max_a q(S', a)) or "sarsa"
    (R + gamma q(S', A'))."""
    num_envs: int = 16
    num_iterations: int = 10_000
    alpha: float = 0.1
    gamma: float = 1.0
    epsilon_start: float = 0.1
    epsilon_end: float = 0.1
    epsilon_steps: int = 1
    algorithm: str = "q_learning"

    def __post_init__(self):
        positive_int("LinearQConfig.num_envs", self.num_envs)
        positive_int("LinearQConfig.num_iterations", self.num_iterations)
        positive_int("LinearQConfig.epsilon_steps", self.epsilon_steps)
        real_in_range("LinearQConfig.alpha", self.alpha, 0.0, include_low=False)
        real_in_range("LinearQConfig.gamma", self.gamma, 0.0, 1.0)
        real_in_range("LinearQConfig.epsilon_start", self.epsilon_start, 0.0, 1.0)
        real_in_range("LinearQConfig.epsilon_end", self.epsilon_end, 0.0, 1.0)
        one_of("LinearQConfig.algorithm", self.algorithm, ("q_learning", "sarsa"))


@functools.partial(jax.jit, static_argnames=("env", "features", "config"))
def linear_q_learning(env, features, key, config: LinearQConfig) -> tuple[jax.Array, ControlMetrics]:
    """Semi-gradient Q-learning (or Sarsa) with linear features, online on config.num_envs environments at once
    (Sutton & Barto section 10.1, the episodic semi-gradient Sarsa of p. 244, and Q-learning's target of eq. 6.8):
    every iteration each environment takes an epsilon-greedy action, and
    W_a <- W_a + alpha mean_envs [delta x(S)] for the actions taken, delta = R + gamma (1 - terminated) q(S', .)
    - q(S, A); a truncated episode bootstraps from its last state. One jitted lax.scan over iterations of a vmap over
    environments, with automatic resets. features: observation -> (d,) float32.
    Returns (W (num_actions, d) float32, `ControlMetrics`)."""
    A, N = env.num_actions, config.num_envs
    d = jax.eval_shape(lambda: features(env.observe(env.reset(jax.random.key(0))[0]))).shape[0]
    epsilon_at = linear_schedule(config.epsilon_start, config.epsilon_end, config.epsilon_steps)
    k_reset, k_first, k_loop = jax.random.split(key, 3)
    states, observations = jax.vmap(env.reset)(jax.random.split(k_reset, N))
    W = jnp.zeros((A, d), jnp.float32)
    act = jax.vmap(epsilon_greedy, (0, 0, None))
    x0 = jax.vmap(features)(observations)
    actions = act(jax.random.split(k_first, N), x0 @ W.T, config.epsilon_start)

    def iteration(carry, xs):
        W, states, actions, episode_return = carry
        step, k = xs
        k_env, k_act = jax.random.split(k)
        epsilon = epsilon_at(step)
        x = jax.vmap(lambda s: features(env.observe(s)))(states)
        next_states, out = jax.vmap(lambda s, a, kk: step_and_reset(env, s, a, kk))(
            states, actions, jax.random.split(k_env, N))
        x_next = jax.vmap(features)(out.observation)   # the true next state (before any reset)
        q_next = x_next @ W.T
        x_act = jax.vmap(lambda s: features(env.observe(s)))(next_states)  # where each env acts next
        next_actions = act(jax.random.split(k_act, N), x_act @ W.T, epsilon)
        if config.algorithm == "sarsa":  # q(S', A'); at a truncation A' belongs to the reset state: use max q(S', .)
            bootstrap = jnp.where(out.done, q_next.max(-1), jnp.take_along_axis(q_next, next_actions[:, None], 1)[:, 0])
        else:
            bootstrap = q_next.max(-1)
        target = out.reward + config.gamma * jnp.where(out.terminated, 0.0, bootstrap)
        q_taken = jnp.take_along_axis(x @ W.T, actions[:, None], 1)[:, 0]
        delta = target - q_taken
        W = W + config.alpha / N * jax.ops.segment_sum(delta[:, None] * x, actions, A)
        episode_return = episode_return + out.reward
        done = out.done
        metrics = (jnp.sum(jnp.where(done, episode_return, 0.0)), jnp.sum(done), epsilon, jnp.mean(delta ** 2))
        return (W, next_states, next_actions, jnp.where(done, 0.0, episode_return)), metrics

    carry = (W, states, actions, jnp.zeros(N, jnp.float32))
    (W, *_), metrics = jax.lax.scan(iteration, carry, (jnp.arange(config.num_iterations),
                                                       jax.random.split(k_loop, config.num_iterations)))
    return W, ControlMetrics(*metrics)


def greedy_returns(env, q_function, key, num_episodes: int, *, num_steps: int | None = None) -> jax.Array:
    """Undiscounted returns (num_episodes,) of the greedy policy argmax_a q_function(observation) (A,), each
    episode at most num_steps (default env.max_steps) steps; episodes run in parallel (vmap of lax.scan)."""
    num_steps = positive_int("num_steps", env.max_steps if num_steps is None else num_steps)
    policy = lambda k, s: jnp.argmax(q_function(env.observe(s))).astype(jnp.int32)
    episodes = rollouts(env, policy, key, num_episodes, num_steps)
    return episodes.reward.sum(-1)
