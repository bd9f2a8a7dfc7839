"""JAX-native environments with pure `reset(key)` / `step(state, action, key)`: a grid world, Blackjack, the
random-walk chain, cart-pole and mountain car.

Every environment is a frozen dataclass of its parameters (hashable, so it can be a static argument of `jax.jit`)
with these pure methods, for one environment (vmap them for a batch):

- `reset(key) -> (state, observation)`: a fresh episode; `state` is a NamedTuple of scalars (fixed shapes);
- `step(state, action, key) -> EnvStep(state, observation, reward, terminated, truncated)`: one transition;
  `terminated` means a terminal state of the MDP was reached (do not bootstrap), `truncated` that the episode
  limit `max_steps` was reached (the state is not terminal: bootstrap from it);
- `observe(state) -> observation`.

`step_and_reset` adds the automatic reset of gymnax and PureJaxRL for loops over many environments. The tabular
environments (grid world, Blackjack, random walk) also give `num_indices`, `state_index(state)` (in
[0, num_indices), terminal states included), `state_from_index(index)`, `nonterminal_indices`, `terminal_mask` and
`tabular_model()` (the transition probabilities and expected rewards that dynamic
programming needs, `jaxmodels.rl.dp`).

Invalid input fails at trace time with the expected and the received: an action outside [0, num_actions) (when
its value is known; a traced action is clipped into range), a state with a batch dimension, an episode limit
`max_steps` < 1.
"""

import dataclasses
import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.ops.checks import non_negative_int, positive_int, real_in_range, values_in_range


class EnvStep(NamedTuple):
    """What `step` returns. state: the next state; observation: its observation; reward () float32 (R_{t+1});
    terminated () bool: the next state is terminal; truncated () bool: the episode limit was reached."""
    state: Any
    observation: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array

    @property
    def done(self) -> jax.Array:
        """terminated or truncated: the episode is over."""
        return self.terminated | self.truncated


def check_action(env, action) -> jax.Array:
    """`action` as an int32 scalar in [0, env.num_actions). Raises ValueError for a non-scalar or (when its value
    is known) out-of-range action, TypeError for a non-integer one; a traced action is clipped into range."""
    action = jnp.asarray(action)
    name = type(env).__name__
    if action.shape != ():
        raise ValueError(f"{name}.step takes one environment's action, a scalar int (vmap over a batch), "
                         f"got shape {action.shape}")
    if not jnp.issubdtype(action.dtype, jnp.integer):
        raise TypeError(f"{name}.step: action must be an integer in [0, {env.num_actions}), got dtype {action.dtype}")
    values_in_range(f"{name} action", action, 0, env.num_actions)
    return jnp.clip(action, 0, env.num_actions - 1).astype(jnp.int32)


def check_state(env, state) -> None:
    """Raise TypeError unless `state` is `env.State`, ValueError unless each field is a scalar (one environment)."""
    name = type(env).__name__
    if not isinstance(state, env.State):
        raise TypeError(f"{name}.step expects a {env.State.__name__} (from {name}.reset), got {type(state).__name__}")
    for field, value in zip(state._fields, state):
        if jnp.shape(value) != ():
            raise ValueError(f"{name}.step takes one environment's state: {env.State.__name__}.{field} must be a "
                             f"scalar (vmap over a batch), got shape {jnp.shape(value)}")


def step_and_reset(env, state, action, key) -> tuple[Any, EnvStep]:
    """One step with automatic reset (gymnax, PureJaxRL): where the episode ended, the returned state is a fresh
    `env.reset` state. Returns (state to act from next, EnvStep of the true transition: its `observation` is
    that of the state reached, before the reset). Splits `key` as gymnax does: (step key, reset key)."""
    key_step, key_reset = jax.random.split(key)
    out = env.step(state, action, key_step)
    reset_state, _ = env.reset(key_reset)
    done = out.done
    return jax.tree.map(lambda r, s: jnp.where(done, r, s), reset_state, out.state), out


def _check_limit(env) -> None:
    positive_int(f"{type(env).__name__}.max_steps (the episode limit)", env.max_steps)


def _scalars(**fields):
    return {k: jnp.asarray(v) for k, v in fields.items()}


# ------------------------------------------------------------------------------------------------ grid world
class GridState(NamedTuple):
    """position () int32 (row * width + column); time () int32 (steps taken)."""
    position: jax.Array
    time: jax.Array


@dataclasses.dataclass(frozen=True)
class GridWorld:
    """Sutton & Barto's grid world (Example 4.1 by default): a `height` x `width` grid, actions 0..3 = up, right,
    down, left; a move off the grid leaves the position unchanged; every step gives `step_reward` (-1); the cells
    in `terminals` end the episode. Episodes start at a uniformly random non-terminal cell.

    Observation: the position () int32. Tabular index: the position (terminal cells included, `terminal_mask`).
    """
    height: int = 4
    width: int = 4
    terminals: tuple[tuple[int, int], ...] = ((0, 0), (3, 3))
    step_reward: float = -1.0
    max_steps: int = 1000

    State = GridState
    num_actions = 4
    MOVES = ((-1, 0), (0, 1), (1, 0), (0, -1))  # (row, column) of up, right, down, left

    def __post_init__(self):
        positive_int("GridWorld.height", self.height)
        positive_int("GridWorld.width", self.width)
        _check_limit(self)
        for r, c in self.terminals:
            if not (0 <= r < self.height and 0 <= c < self.width):
                raise ValueError(f"GridWorld.terminals must be cells of the {self.height}x{self.width} grid, "
                                 f"got {(r, c)}")
        if len(self.nonterminal_indices) == 0:
            raise ValueError("GridWorld needs at least one non-terminal cell")

    @property
    def num_indices(self) -> int:
        """The size of the tabular index space: every cell."""
        return self.height * self.width

    @property
    def terminal_mask(self) -> np.ndarray:
        """(num_indices,) bool: terminal cells."""
        mask = np.zeros(self.num_indices, bool)
        for r, c in self.terminals:
            mask[r * self.width + c] = True
        return mask

    @property
    def nonterminal_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.terminal_mask)

    def state_index(self, state: GridState) -> jax.Array:
        return state.position

    def state_from_index(self, index) -> GridState:
        return GridState(**_scalars(position=jnp.asarray(index, jnp.int32), time=jnp.int32(0)))

    def observe(self, state: GridState) -> jax.Array:
        return state.position

    def reset(self, key) -> tuple[GridState, jax.Array]:
        starts = jnp.asarray(self.nonterminal_indices, jnp.int32)
        state = self.state_from_index(jax.random.choice(key, starts))
        return state, self.observe(state)

    def step(self, state: GridState, action, key) -> EnvStep:
        del key  # deterministic
        check_state(self, state)
        action = check_action(self, action)
        moves = jnp.asarray(self.MOVES, jnp.int32)
        row, col = state.position // self.width, state.position % self.width
        row = jnp.clip(row + moves[action, 0], 0, self.height - 1)
        col = jnp.clip(col + moves[action, 1], 0, self.width - 1)
        terminal = jnp.asarray(self.terminal_mask)
        already = terminal[state.position]
        position = jnp.where(already, state.position, row * self.width + col)
        nxt = GridState(position.astype(jnp.int32), state.time + 1)
        reward = jnp.where(already, 0.0, self.step_reward).astype(jnp.float32)
        terminated = terminal[position]
        return EnvStep(nxt, self.observe(nxt), reward, terminated, ~terminated & (nxt.time >= self.max_steps))

    def tabular_model(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(P (S, A, S) float64 transition probabilities, R (S, A) expected rewards, terminal (S,) bool);
        terminal states are absorbing with reward 0."""
        S, A = self.num_indices, self.num_actions
        P, R, terminal = np.zeros((S, A, S)), np.zeros((S, A)), self.terminal_mask
        for s, a in itertools.product(range(S), range(A)):
            if terminal[s]:
                P[s, a, s] = 1.0
                continue
            r = min(max(s // self.width + self.MOVES[a][0], 0), self.height - 1)
            c = min(max(s % self.width + self.MOVES[a][1], 0), self.width - 1)
            P[s, a, r * self.width + c], R[s, a] = 1.0, self.step_reward
        return P, R, terminal


# ------------------------------------------------------------------------------------------------- Blackjack
class BlackjackState(NamedTuple):
    """player_sum () int32 (12..21 while playing, > 21 bust); usable_ace () bool; dealer_card () int32 (1..10,
    the dealer's showing card, ace = 1); natural () bool (the player still holds a two-card 21); time () int32."""
    player_sum: jax.Array
    usable_ace: jax.Array
    dealer_card: jax.Array
    natural: jax.Array
    time: jax.Array


def _draw(key, shape=()) -> jax.Array:
    """Cards from an infinite deck (drawn with replacement): 1 (ace) .. 9 with probability 1/13 each, 10 (ten,
    jack, queen, king) with 4/13. int32 of `shape`."""
    return jnp.minimum(jax.random.randint(key, shape, 1, 14), 10).astype(jnp.int32)


def _add_card(total, usable, card):
    """Best hand total after adding `card` to a hand of best total `total` with `usable` ace (counted as 11)."""
    hard = total - 10 * usable + card
    usable = (usable | (card == 1)) & (hard + 10 <= 21)
    return hard + 10 * usable, usable


def _dealer_outcome_probabilities(dealer_card: int) -> dict[int, float]:
    """Exact distribution of the dealer's final total (17..21, or 22 for bust) given the showing card
    (dealer hits below 17, sticks on 17 or more counting a usable ace as 11); the hidden card included."""
    card_p = {c: (4 / 13 if c == 10 else 1 / 13) for c in range(1, 11)}
    out: dict[int, float] = {}

    def play(total, usable, p):
        if total > 21:
            out[22] = out.get(22, 0.0) + p
        elif total >= 17:
            out[total] = out.get(total, 0.0) + p
        else:
            for c, pc in card_p.items():
                hard = total - 10 * usable + c
                u = (usable or c == 1) and hard + 10 <= 21
                play(hard + 10 * u, u, p * pc)

    first = (11, True) if dealer_card == 1 else (dealer_card, False)
    for c, pc in card_p.items():  # the hidden card is drawn before the dealer may stick
        hard = first[0] - 10 * first[1] + c
        u = (first[1] or c == 1) and hard + 10 <= 21
        play(hard + 10 * u, u, pc)
    return out


@dataclasses.dataclass(frozen=True)
class Blackjack:
    """Blackjack as in Sutton & Barto, Example 5.1: an infinite deck (cards drawn with replacement; face cards
    count 10, an ace 1 or 11), actions 0 = stick, 1 = hit. The player's sums below 12 are hit automatically
    (no decision matters there), so a state is (player sum 12..21, dealer's showing card 1..10, usable ace):
    200 states. Hitting past 21 loses (-1). On sticking, the dealer draws the hidden card and hits until 17 or
    more (a usable ace counts 11); then the larger sum wins (+1 / -1), equal sums draw (0), a dealer bust wins
    for the player. With `naturals` (the book's rule), a player who sticks on the initial two-card 21 wins unless
    the dealer's two cards are also 21 (a draw). Rewards are 0 until the end; undiscounted.

    Observation: (player_sum, dealer_card, usable_ace) int32 (3,). Tabular index:
    usable_ace * 100 + (player_sum - 12) * 10 + (dealer_card - 1) for the 200 playing states, 200 for the
    terminal (finished) state; `value[:200].reshape(2, 10, 10)` is (usable ace, player sum, dealer card).
    `max_steps` is an episode limit that never binds at its default (a player can hit at most 19 times).
    """
    naturals: bool = True
    max_steps: int = 32

    State = BlackjackState
    num_actions = 2
    num_indices = 201
    STICK, HIT = 0, 1

    def __post_init__(self):
        _check_limit(self)

    @property
    def terminal_mask(self) -> np.ndarray:
        return np.arange(self.num_indices) == 200

    @property
    def nonterminal_indices(self) -> np.ndarray:
        return np.arange(200)

    def state_index(self, state: BlackjackState) -> jax.Array:
        playing = state.player_sum <= 21
        index = state.usable_ace.astype(jnp.int32) * 100 + (state.player_sum - 12) * 10 + state.dealer_card - 1
        return jnp.where(playing, jnp.clip(index, 0, 199), 200).astype(jnp.int32)

    def state_from_index(self, index) -> BlackjackState:
        """The playing state of tabular index 0..199 (not a natural), e.g. for exploring starts."""
        index = jnp.asarray(index, jnp.int32)
        return BlackjackState(**_scalars(player_sum=(index % 100) // 10 + 12, usable_ace=index >= 100,
                                         dealer_card=index % 10 + 1, natural=jnp.bool_(False), time=jnp.int32(0)))

    def observe(self, state: BlackjackState) -> jax.Array:
        return jnp.stack([state.player_sum, state.dealer_card, state.usable_ace.astype(jnp.int32)])

    def reset(self, key) -> tuple[BlackjackState, jax.Array]:
        k_cards, k_dealer = jax.random.split(key)
        cards = _draw(k_cards, (11,))  # two cards, then up to 9 automatic hits below 12 (2+2+2+2+2+... >= 12)
        total, usable = _add_card(jnp.int32(0), jnp.bool_(False), cards[0])
        total, usable = _add_card(total, usable, cards[1])
        natural = total == 21

        def hit_below_12(i, carry):
            t, u = carry
            t2, u2 = _add_card(t, u, cards[i])
            return jnp.where(t < 12, t2, t), jnp.where(t < 12, u2, u)

        total, usable = jax.lax.fori_loop(2, 11, hit_below_12, (total, usable))
        state = BlackjackState(total.astype(jnp.int32), usable, _draw(k_dealer), natural, jnp.int32(0))
        return state, self.observe(state)

    def dealer_plays(self, dealer_card, key) -> tuple[jax.Array, jax.Array]:
        """The dealer's final total (> 21: bust) and whether the first two cards were 21, given the showing card:
        the hidden card, then hits until 17 or more. Fixed 12 draws with masking (enough: 12 aces reach 17)."""
        cards = _draw(key, (12,))
        total, usable = _add_card(jnp.int32(0), jnp.bool_(False), dealer_card)
        total, usable = _add_card(total, usable, cards[0])
        natural = total == 21

        def hit(i, carry):
            t, u = carry
            t2, u2 = _add_card(t, u, cards[i])
            return jnp.where(t < 17, t2, t), jnp.where(t < 17, u2, u)

        total, _ = jax.lax.fori_loop(1, 12, hit, (total, usable))
        return total, natural

    def step(self, state: BlackjackState, action, key) -> EnvStep:
        check_state(self, state)
        action = check_action(self, action)
        k_card, k_dealer = jax.random.split(key)
        hit_sum, hit_usable = _add_card(state.player_sum, state.usable_ace, _draw(k_card))
        bust = hit_sum > 21
        dealer_total, dealer_natural = self.dealer_plays(state.dealer_card, k_dealer)
        stick_reward = jnp.where(dealer_total > 21, 1.0, jnp.sign(state.player_sum - dealer_total))
        if self.naturals:
            stick_reward = jnp.where(state.natural, jnp.where(dealer_natural, 0.0, 1.0), stick_reward)
        hit = action == self.HIT
        nxt = BlackjackState(jnp.where(hit, hit_sum, state.player_sum).astype(jnp.int32),
                             jnp.where(hit, hit_usable, state.usable_ace), state.dealer_card,
                             state.natural & ~hit, state.time + 1)
        # A stick ends the episode; the state then shows the player's sum, and state_index maps it to 200 only
        # through `terminated` (callers stop at terminated).
        terminated = ~hit | bust
        reward = jnp.where(hit, jnp.where(bust, -1.0, 0.0), stick_reward).astype(jnp.float32)
        return EnvStep(nxt, self.observe(nxt), reward, terminated, ~terminated & (nxt.time >= self.max_steps))

    def threshold_policy(self, stick_from: int = 20) -> np.ndarray:
        """(201, 2) probabilities of the policy that sticks on sums >= `stick_from` and hits below (Example 5.1's
        policy for stick_from = 20)."""
        policy = np.zeros((self.num_indices, 2))
        sums = (np.arange(200) % 100) // 10 + 12
        policy[:200, self.STICK] = sums >= stick_from
        policy[:200, self.HIT] = sums < stick_from
        policy[200, self.STICK] = 1.0
        return policy

    def tabular_model(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(P (201, 2, 201), R (201, 2), terminal (201,)) of the 200-state MDP with the terminal state 200, exact
        for `naturals=False` (a natural's extra win is not a function of the 200 states: with `naturals`, the
        values of the usable-ace 21 states are those of a 21 reached by hitting). Stick: to the terminal state
        with the expected outcome against the dealer's exact final-total distribution; hit: a card 1..10."""
        card_p = {c: (4 / 13 if c == 10 else 1 / 13) for c in range(1, 11)}
        P, R = np.zeros((201, 2, 201)), np.zeros((201, 2))
        P[200, :, 200] = 1.0
        dealer = {d: _dealer_outcome_probabilities(d) for d in range(1, 11)}
        for index in range(200):
            usable, player, d = index >= 100, (index % 100) // 10 + 12, index % 10 + 1
            P[index, self.STICK, 200] = 1.0
            R[index, self.STICK] = sum(p * (1.0 if total > 21 else float(np.sign(player - total)))
                                       for total, p in dealer[d].items())
            for c, pc in card_p.items():
                hard = player - 10 * usable + c
                u = usable and hard + 10 <= 21  # a new ace cannot be usable at player >= 12
                total = hard + 10 * u
                if total > 21:
                    P[index, self.HIT, 200] += pc
                    R[index, self.HIT] -= pc
                else:
                    P[index, self.HIT, int(u) * 100 + (total - 12) * 10 + d - 1] += pc
        return P, R, self.terminal_mask


# ----------------------------------------------------------------------------------------------- random walk
class WalkState(NamedTuple):
    """position () int32: 0 and num_states + 1 are the terminal ends, 1..num_states the chain; time () int32."""
    position: jax.Array
    time: jax.Array


@dataclasses.dataclass(frozen=True)
class RandomWalk:
    """The random-walk chain (a Markov reward process: one action, 0). Defaults: Sutton & Barto Example 6.2, five
    states A..E (positions 1..5), start at C, a step left or right with equal probability, reward +1 on leaving
    to the right, 0 otherwise; true values 1/6 .. 5/6. `RandomWalk(num_states=1000, max_jump=100,
    left_reward=-1.0)` is the 1000-state walk of Example 9.1: a jump to one of the `max_jump` states on either
    side with equal probability, the probability of jumps past an end going to terminating on that side.

    Observation: the position () int32. Tabular index: the position 0..num_states + 1 (both ends terminal).
    """
    num_states: int = 5
    max_jump: int = 1
    left_reward: float = 0.0
    right_reward: float = 1.0
    start: int | None = None  # position 1..num_states; default the middle, (num_states + 1) // 2 rounded up
    max_steps: int = 100_000

    State = WalkState
    num_actions = 1

    def __post_init__(self):
        positive_int("RandomWalk.num_states", self.num_states)
        positive_int("RandomWalk.max_jump", self.max_jump)
        _check_limit(self)
        real_in_range("RandomWalk.left_reward", self.left_reward)
        real_in_range("RandomWalk.right_reward", self.right_reward)
        if self.start is not None and not 1 <= non_negative_int("RandomWalk.start", self.start) <= self.num_states:
            raise ValueError(f"RandomWalk.start must be a position in [1, {self.num_states}], got {self.start}")

    @property
    def num_indices(self) -> int:
        """The size of the tabular index space: the chain and its two ends."""
        return self.num_states + 2

    @property
    def start_position(self) -> int:
        return self.start if self.start is not None else math.ceil((self.num_states + 1) / 2)

    @property
    def terminal_mask(self) -> np.ndarray:
        mask = np.zeros(self.num_states + 2, bool)
        mask[[0, -1]] = True
        return mask

    @property
    def nonterminal_indices(self) -> np.ndarray:
        return np.arange(1, self.num_states + 1)

    def state_index(self, state: WalkState) -> jax.Array:
        return state.position

    def state_from_index(self, index) -> WalkState:
        return WalkState(**_scalars(position=jnp.asarray(index, jnp.int32), time=jnp.int32(0)))

    def observe(self, state: WalkState) -> jax.Array:
        return state.position

    def reset(self, key) -> tuple[WalkState, jax.Array]:
        del key
        state = self.state_from_index(self.start_position)
        return state, self.observe(state)

    def step(self, state: WalkState, action, key) -> EnvStep:
        check_state(self, state)
        check_action(self, action)
        jump = jax.random.randint(key, (), 1, self.max_jump + 1)
        jump = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 1)), jump, -jump)
        end = self.num_states + 1
        already = (state.position <= 0) | (state.position >= end)
        position = jnp.where(already, state.position, jnp.clip(state.position + jump, 0, end)).astype(jnp.int32)
        left, right = (position == 0) & ~already, (position == end) & ~already
        reward = jnp.where(left, self.left_reward, jnp.where(right, self.right_reward, 0.0)).astype(jnp.float32)
        terminated = (position == 0) | (position == end)
        nxt = WalkState(position, state.time + 1)
        return EnvStep(nxt, self.observe(nxt), reward, terminated, ~terminated & (nxt.time >= self.max_steps))

    def tabular_model(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(P (S, 1, S), R (S, 1), terminal (S,)) with S = num_states + 2."""
        n, k = self.num_states, self.max_jump
        S = n + 2
        P, R = np.zeros((S, 1, S)), np.zeros((S, 1))
        P[0, 0, 0] = P[S - 1, 0, S - 1] = 1.0
        for s in range(1, n + 1):
            for j in (*range(-k, 0), *range(1, k + 1)):
                t = min(max(s + j, 0), S - 1)
                P[s, 0, t] += 1 / (2 * k)
                R[s, 0] += (self.left_reward if t == 0 else self.right_reward if t == S - 1 else 0.0) / (2 * k)
        return P, R, self.terminal_mask


# ------------------------------------------------------------------------------------------------- cart-pole
class CartPoleState(NamedTuple):
    """x, x_dot, theta, theta_dot () float32 (cart position m, velocity m/s, pole angle rad, angular velocity
    rad/s); time () int32."""
    x: jax.Array
    x_dot: jax.Array
    theta: jax.Array
    theta_dot: jax.Array
    time: jax.Array


@dataclasses.dataclass(frozen=True)
class CartPole:
    """Cart-pole balancing (Barto, Sutton & Anderson 1983), with the frictionless dynamics and constants of
    gym's / gymnax's CartPole-v1: actions 0 = push left, 1 = push right with `force_mag`; explicit Euler steps of
    `tau` seconds on

        theta_acc = (g sin(theta) - cos(theta) temp) / (l (4/3 - m_p cos^2(theta) / (m_c + m_p))),
        temp = (F + m_p l theta_dot^2 sin(theta)) / (m_c + m_p),
        x_acc = temp - m_p l theta_acc cos(theta) / (m_c + m_p);

    reward +1 per step; terminated when |x| > 2.4 or |theta| > 12 degrees; truncated after `max_steps` (500).
    Reset: each state variable uniform in [-0.05, 0.05) (gymnax's draw, so the same key gives the same start).

    Observation: (x, x_dot, theta, theta_dot) float32 (4,).
    """
    gravity: float = 9.8
    masscart: float = 1.0
    masspole: float = 0.1
    length: float = 0.5  # half the pole's length
    force_mag: float = 10.0
    tau: float = 0.02
    theta_threshold: float = 12 * 2 * math.pi / 360
    x_threshold: float = 2.4
    max_steps: int = 500

    State = CartPoleState
    num_actions = 2
    observation_shape = (4,)

    def __post_init__(self):
        _check_limit(self)
        for name in ("gravity", "masscart", "masspole", "length", "force_mag", "tau"):
            real_in_range(f"CartPole.{name}", getattr(self, name), 0.0, include_low=False)

    def observe(self, state: CartPoleState) -> jax.Array:
        return jnp.stack([state.x, state.x_dot, state.theta, state.theta_dot])

    def reset(self, key) -> tuple[CartPoleState, jax.Array]:
        x = jax.random.uniform(key, minval=-0.05, maxval=0.05, shape=(4,))
        state = CartPoleState(x[0], x[1], x[2], x[3], jnp.int32(0))
        return state, self.observe(state)

    def step(self, state: CartPoleState, action, key) -> EnvStep:
        del key  # deterministic
        check_state(self, state)
        action = check_action(self, action)
        total_mass = self.masspole + self.masscart
        polemass_length = self.masspole * self.length
        force = self.force_mag * action - self.force_mag * (1 - action)
        cos, sin = jnp.cos(state.theta), jnp.sin(state.theta)
        temp = (force + polemass_length * state.theta_dot ** 2 * sin) / total_mass
        theta_acc = (self.gravity * sin - cos * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * cos ** 2 / total_mass))
        x_acc = temp - polemass_length * theta_acc * cos / total_mass
        nxt = CartPoleState(state.x + self.tau * state.x_dot, state.x_dot + self.tau * x_acc,
                            state.theta + self.tau * state.theta_dot, state.theta_dot + self.tau * theta_acc,
                            state.time + 1)
        terminated = (jnp.abs(nxt.x) > self.x_threshold) | (jnp.abs(nxt.theta) > self.theta_threshold)
        return EnvStep(nxt, self.observe(nxt), jnp.float32(1.0), terminated,
                       ~terminated & (nxt.time >= self.max_steps))


# ---------------------------------------------------------------------------------------------- mountain car
class MountainCarState(NamedTuple):
    """position, velocity () float32; time () int32."""
    position: jax.Array
    velocity: jax.Array
    time: jax.Array


@dataclasses.dataclass(frozen=True)
class MountainCar:
    """Mountain car (Sutton & Barto section 10.1; Moore 1990), the constants of gym's / gymnax's MountainCar-v0:
    actions 0, 1, 2 = full throttle reverse, zero, forward (A - 1 in {-1, 0, 1});

        velocity' = clip(velocity + 0.001 (A - 1) - 0.0025 cos(3 position), -0.07, 0.07),
        position' = clip(position + velocity', -1.2, 0.6), velocity' = 0 at the left bound when moving left;

    reward -1 per step; terminated when position' >= 0.5; truncated after `max_steps` (200; the book has no
    limit). Reset: position uniform in [-0.6, -0.4), velocity 0 (gymnax's draw).

    Observation: (position, velocity) float32 (2,).
    """
    force: float = 0.001
    gravity: float = 0.0025
    min_position: float = -1.2
    max_position: float = 0.6
    max_speed: float = 0.07
    goal_position: float = 0.5
    max_steps: int = 200

    State = MountainCarState
    num_actions = 3
    observation_shape = (2,)

    def __post_init__(self):
        _check_limit(self)
        if not self.min_position < self.goal_position <= self.max_position:
            raise ValueError(f"MountainCar needs min_position < goal_position <= max_position, got "
                             f"{self.min_position}, {self.goal_position}, {self.max_position}")

    def observe(self, state: MountainCarState) -> jax.Array:
        return jnp.stack([state.position, state.velocity])

    def reset(self, key) -> tuple[MountainCarState, jax.Array]:
        position = jax.random.uniform(key, shape=(), minval=-0.6, maxval=-0.4)
        state = MountainCarState(position, jnp.float32(0.0), jnp.int32(0))
        return state, self.observe(state)

    def step(self, state: MountainCarState, action, key) -> EnvStep:
        del key  # deterministic
        check_state(self, state)
        action = check_action(self, action)
        velocity = state.velocity + (action - 1) * self.force - jnp.cos(3 * state.position) * self.gravity
        velocity = jnp.clip(velocity, -self.max_speed, self.max_speed)
        position = jnp.clip(state.position + velocity, self.min_position, self.max_position)
        velocity = jnp.where((position == self.min_position) & (velocity < 0), 0.0, velocity)
        nxt = MountainCarState(position, velocity, state.time + 1)
        terminated = position >= self.goal_position
        return EnvStep(nxt, self.observe(nxt), jnp.float32(-1.0), terminated,
                       ~terminated & (nxt.time >= self.max_steps))


ENVIRONMENTS = {"grid_world": GridWorld, "blackjack": Blackjack, "random_walk": RandomWalk, "cart_pole": CartPole,
                "mountain_car": MountainCar}
