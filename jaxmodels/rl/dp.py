"""Dynamic programming on a tabular model, in float64 NumPy: the exact values the sampling methods are measured
against (Sutton & Barto chapter 4), and the fixed points of linear value-function approximation (chapter 9).

A model is (P, R, terminal) as the tabular environments' `tabular_model()` give it: P (S, A, S) transition
probabilities, R (S, A) expected rewards, terminal (S,) bool (absorbing states whose value is 0).
"""

import numpy as np


def check_model(P, R, terminal=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P, R, terminal as float64/bool arrays; ValueError for shapes that disagree or rows of P not summing to 1."""
    P, R = np.asarray(P, np.float64), np.asarray(R, np.float64)
    if P.ndim != 3 or P.shape[0] != P.shape[2] or R.shape != P.shape[:2]:
        raise ValueError(f"expected P (S, A, S) and R (S, A), got P {P.shape} and R {R.shape}")
    if not np.allclose(P.sum(-1), 1.0, atol=1e-9):
        raise ValueError("every row P[s, a, :] must sum to 1")
    terminal = np.zeros(P.shape[0], bool) if terminal is None else np.asarray(terminal, bool)
    if terminal.shape != P.shape[:1]:
        raise ValueError(f"terminal must be (S,) = {P.shape[:1]}, got {terminal.shape}")
    return P, R, terminal


def _as_probabilities(policy, S, A) -> np.ndarray:
    policy = np.asarray(policy, np.float64)
    if policy.shape == (S,):  # a deterministic policy given by its actions
        policy = np.eye(A)[policy.astype(int)]
    if policy.shape != (S, A) or not np.allclose(policy.sum(-1), 1.0):
        raise ValueError(f"policy must be (S, A) = {(S, A)} probabilities (rows summing to 1) or (S,) actions, "
                         f"got shape {policy.shape}")
    return policy


def policy_evaluation(P, R, terminal, policy, gamma: float = 1.0) -> np.ndarray:
    """v_pi (S,) float64 solving the Bellman equation v = r_pi + gamma P_pi v (Sutton & Barto eq. 4.4) exactly on the
    non-terminal states (terminal values 0). policy: (S, A) probabilities or (S,) actions. With gamma = 1 every
    state must reach a terminal state with probability 1 (else the system is singular: LinAlgError)."""
    P, R, terminal = check_model(P, R, terminal)
    S, A = R.shape
    pi = _as_probabilities(policy, S, A)
    live = ~terminal
    P_pi, r_pi = np.einsum("sa,sat->st", pi, P), np.einsum("sa,sa->s", pi, R)
    v = np.zeros(S)
    v[live] = np.linalg.solve(np.eye(live.sum()) - gamma * P_pi[np.ix_(live, live)], r_pi[live])
    return v


def q_from_v(P, R, v, gamma: float = 1.0) -> np.ndarray:
    """q(s, a) = R(s, a) + gamma sum_s' P(s'|s, a) v(s') (S, A) (Sutton & Barto eq. 4.6)."""
    return np.asarray(R, np.float64) + gamma * np.einsum("sat,t->sa", np.asarray(P, np.float64), v)


def value_iteration(P, R, terminal, gamma: float = 1.0, *, tol: float = 1e-12,
                    max_iterations: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """(v* (S,), q* (S, A)) by value iteration, v <- max_a [R + gamma P v] (Sutton & Barto eq. 4.10), until the
    largest change is below `tol`. Terminal values stay 0."""
    P, R, terminal = check_model(P, R, terminal)
    v = np.zeros(R.shape[0])
    for _ in range(max_iterations):
        new = np.where(terminal, 0.0, q_from_v(P, R, v, gamma).max(-1))
        if np.max(np.abs(new - v)) < tol:
            v = new
            break
        v = new
    return v, q_from_v(P, R, v, gamma)


def on_policy_distribution(P, terminal, policy, start) -> np.ndarray:
    """mu (S,) float64: the fraction of time spent in each non-terminal state in episodes that start from the
    distribution `start` (S,) (Sutton & Barto eq. 9.2-9.3: eta = h + eta P_pi, mu = eta / sum eta); 0 on terminals."""
    P, R_dummy, terminal = check_model(P, np.zeros(np.asarray(P).shape[:2]), terminal)
    del R_dummy
    S, A = P.shape[:2]
    pi, live = _as_probabilities(policy, S, A), ~terminal
    P_pi = np.einsum("sa,sat->st", pi, P)[np.ix_(live, live)]
    eta = np.zeros(S)
    eta[live] = np.linalg.solve(np.eye(live.sum()) - P_pi.T, np.asarray(start, np.float64)[live])
    return eta / eta.sum()


def linear_fixed_points(P, R, terminal, policy, start, X, gamma: float = 1.0) -> dict[str, np.ndarray]:
    """The weights linear methods converge to, for features X (S, d) (rows of terminal states unused):
    "mc": the minimiser of the mean squared value error VE(w) = sum_s mu(s) (v_pi(s) - x(s)^T w)^2 (Sutton & Barto
    eq. 9.1), where gradient Monte Carlo converges; "td": the TD fixed point w_TD = A^-1 b with
    A = X^T D (X - gamma P_pi X), b = X^T D r_pi (eq. 9.12; D = diag(mu), terminal features read as 0), where
    semi-gradient TD(0) converges. Also "mu" and "v" (the exact values)."""
    P, R, terminal = check_model(P, R, terminal)
    S, A_ = R.shape
    X = np.asarray(X, np.float64)
    if X.ndim != 2 or X.shape[0] != S:
        raise ValueError(f"X must be (S, d) = ({S}, d), got {X.shape}")
    pi = _as_probabilities(policy, S, A_)
    mu = on_policy_distribution(P, terminal, pi, start)
    v = policy_evaluation(P, R, terminal, pi, gamma)
    X = np.where(terminal[:, None], 0.0, X)
    D = np.diag(mu)
    P_pi, r_pi = np.einsum("sa,sat->st", pi, P), np.einsum("sa,sa->s", pi, R)
    w_mc = np.linalg.lstsq(np.sqrt(D) @ X, np.sqrt(mu) * v, rcond=None)[0]
    w_td = np.linalg.solve(X.T @ D @ (X - gamma * P_pi @ X), X.T @ D @ r_pi)
    return {"mc": w_mc, "td": w_td, "mu": mu, "v": v}
