"""Monte Carlo methods on Blackjack and value-function approximation on the 1000-state random walk: Sutton & Barto's
Figures 5.1, 5.2, 5.3 and the Figure 9.1 / 9.2 (left) setting, each against dynamic programming's exact answer.

    python -m experiments.rl_tabular [--out experiments/results/rl] [--small]

1. Figure 5.1: first-visit MC prediction of the policy that sticks on 20 or 21, after 10k and 500k episodes
   (heat maps), with the RMS error against the exact values (a DP over the infinite-deck model,
   `Blackjack.tabular_model`; the experiment uses naturals=False, where that model is exact).
2. Figure 5.2: Monte Carlo ES, 500k episodes (batches of 100), initial policy stick on 20/21: the greedy policy
   and max_a Q, against value iteration's optimal policy and v*.
3. Figure 5.3: ordinary vs weighted importance sampling of v_pi(13, dealer 2, usable ace) = -0.27726 (exact here
   -0.27720), behaviour uniformly random, target stick on 20/21: mean squared error over 100 runs vs episodes.
4. Figures 9.1 / 9.2 left: gradient MC (alpha 2e-5) and semi-gradient TD(0) (alpha 2e-4) with 10-group state
   aggregation on the 1000-state random walk, 100k episodes each, against the true values and the closed-form
   fixed points (VE minimiser and TD fixed point, eq. 9.12).

Writes blackjack_prediction.png, blackjack_mc_es.png, importance_sampling.png, random_walk.png and
rl_tabular.json into --out and prints a table. --small runs every part at a fraction of the episodes (seconds).
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from jaxmodels.rl import approximation, dp, envs, monte_carlo

START_13_2_USABLE = 100 + (13 - 12) * 10 + (2 - 1)


def heat(ax, grid, title, vmin=-1.0, vmax=1.0, cmap="RdBu"):
    """grid (10 sums 12..21, 10 dealer cards A..10)."""
    im = ax.imshow(grid, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, extent=(0.5, 10.5, 11.5, 21.5),
                   aspect="auto")
    ax.set_xticks(range(1, 11), ["A", *map(str, range(2, 11))], fontsize=7)
    ax.set_yticks(range(12, 22), [str(s) for s in range(12, 22)], fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("dealer showing", fontsize=7), ax.set_ylabel("player sum", fontsize=7)
    return im


def timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def blackjack_prediction(scale, out, results):
    env = envs.Blackjack(naturals=False)
    P, R, T = env.tabular_model()
    policy = env.threshold_policy(20)
    exact = dp.policy_evaluation(P, R, T, policy)
    fig, axes = plt.subplots(2, 3, figsize=(11, 6.5))
    rows = {}
    for col, n in enumerate((10_000, 500_000)):
        n = max(int(n * scale), 1000)
        result, seconds = timed(lambda n=n: monte_carlo.mc_prediction(env, policy, jax.random.key(0), n,
                                                                      batch_size=10_000))
        value = np.asarray(result.value)[:200]
        rmse = float(np.sqrt(np.mean((value - exact[:200]) ** 2)))
        rows[n] = {"episodes": n, "seconds": seconds, "rmse_vs_dp": rmse,
                   "max_abs_error": float(np.max(np.abs(value - exact[:200])))}
        for row, usable in enumerate((1, 0)):
            heat(axes[row, col], value.reshape(2, 10, 10)[usable],
                 f"{'usable' if usable else 'no usable'} ace, after {n:,} episodes")
    for row, usable in enumerate((1, 0)):
        im = heat(axes[row, 2], exact[:200].reshape(2, 10, 10)[usable], f"{'usable' if usable else 'no usable'} "
                  "ace, exact (DP)")
    fig.colorbar(im, ax=axes, shrink=0.6, label="v(s), stick on 20 or 21")
    fig.suptitle("Figure 5.1: first-visit MC prediction on Blackjack", fontsize=10)
    fig.savefig(os.path.join(out, "blackjack_prediction.png"), dpi=110)
    results["figure_5_1"] = list(rows.values())


def blackjack_control(scale, out, results):
    env = envs.Blackjack(naturals=False)
    P, R, T = env.tabular_model()
    v_star, q_star = dp.value_iteration(P, R, T)
    n = max(int(500_000 * scale), 10_000)
    initial = jnp.asarray(env.threshold_policy(20)[:, 1], jnp.int32)
    result, seconds = timed(lambda: monte_carlo.mc_control_exploring_starts(env, jax.random.key(1), n,
                                                                            batch_size=100, initial_policy=initial))
    policy, q = np.asarray(result.policy)[:200], np.asarray(result.q)[:200]
    optimal = q_star.argmax(-1)[:200]
    v_policy = dp.policy_evaluation(P, R, T, np.asarray(result.policy))
    differ = np.flatnonzero(policy != optimal)
    results["figure_5_2"] = {
        "episodes": n, "batch_size": 100, "seconds": seconds,
        "states_where_policy_differs_from_optimal": int(differ.size),
        "largest_q_gap_at_those_states": float(np.max(np.abs(q_star[differ, 0] - q_star[differ, 1]))) if differ.size
        else 0.0,
        "mean_value_loss_of_learned_policy": float(np.mean(v_star[:200] - v_policy[:200])),
        "rmse_max_q_vs_v_star": float(np.sqrt(np.mean((q.max(-1) - v_star[:200]) ** 2))),
    }
    fig, axes = plt.subplots(2, 3, figsize=(11, 6.5))
    for row, usable in enumerate((1, 0)):
        name = "usable" if usable else "no usable"
        heat(axes[row, 0], policy.reshape(2, 10, 10)[usable], f"MC ES policy, {name} ace (red = hit)",
             0, 1, "coolwarm")
        heat(axes[row, 1], optimal.reshape(2, 10, 10)[usable], f"optimal policy (DP), {name} ace", 0, 1, "coolwarm")
        im = heat(axes[row, 2], q.max(-1).reshape(2, 10, 10)[usable], f"MC ES max_a Q, {name} ace")
    fig.colorbar(im, ax=axes[:, 2], shrink=0.6, label="v*(s)")
    fig.suptitle(f"Figure 5.2: Monte Carlo ES, {n:,} episodes", fontsize=10)
    fig.savefig(os.path.join(out, "blackjack_mc_es.png"), dpi=110)


def importance_sampling(scale, out, results):
    env = envs.Blackjack(naturals=False)
    P, R, T = env.tabular_model()
    target, behaviour = env.threshold_policy(20), np.full((201, 2), 0.5)
    exact = float(dp.policy_evaluation(P, R, T, target)[START_13_2_USABLE])
    runs, n = 100, max(int(10_000 * scale), 1000)

    def curves():
        rho, g = monte_carlo.off_policy_start_returns(env, jnp.asarray(target), jnp.asarray(behaviour),
                                                      jax.random.key(2), runs * n, start_index=START_13_2_USABLE)
        rho, g = rho.reshape(runs, n), g.reshape(runs, n)
        return tuple(jnp.mean((monte_carlo.importance_sampling_curve(rho, g, weighted=w) - exact) ** 2, 0)
                     for w in (False, True))

    (ordinary, weighted), seconds = timed(curves)
    ordinary, weighted = np.asarray(ordinary), np.asarray(weighted)
    episodes = np.arange(1, n + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(episodes, ordinary, label="ordinary importance sampling")
    ax.plot(episodes, weighted, label="weighted importance sampling")
    ax.set_xscale("log"), ax.set_ylim(0, 5), ax.set_xlabel("episodes (log scale)")
    ax.set_ylabel(f"mean squared error (average over {runs} runs)"), ax.legend()
    ax.set_title(f"Figure 5.3: v(13, 2, usable ace) = {exact:.5f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "importance_sampling.png"), dpi=110)
    marks = [m for m in (1, 10, 100, 1000, 10_000) if m <= n]
    results["figure_5_3"] = {"exact_value": exact, "runs": runs, "episodes": n, "seconds": seconds,
                             "mse_ordinary": {m: float(ordinary[m - 1]) for m in marks},
                             "mse_weighted": {m: float(weighted[m - 1]) for m in marks}}


def random_walk(scale, out, results):
    env = envs.RandomWalk(num_states=1000, max_jump=100, left_reward=-1.0)
    P, R, T = env.tabular_model()
    features = lambda p: approximation.state_aggregation(p, 1000, 10)
    X = np.asarray(jax.vmap(features)(jnp.arange(1002)))
    fixed = dp.linear_fixed_points(P, R, T, np.ones((1002, 1)), np.eye(1002)[env.start_position], X)
    n = max(int(100_000 * scale), 2000)
    rows = {}
    for name, method, alpha in (("gradient_mc", approximation.gradient_mc, 2e-5),
                                ("semi_gradient_td0", approximation.semi_gradient_td, 2e-4)):
        result, seconds = timed(lambda method=method, alpha=alpha: method(
            env, features, jax.random.key(3), n, alpha=alpha, num_steps=1000, batch_size=1000))
        w = np.asarray(result.w)
        reference = fixed["mc" if name == "gradient_mc" else "td"]
        mu = fixed["mu"][1:-1]
        rows[name] = {"alpha": alpha, "episodes": n, "seconds": seconds, "episodes_cut": int(result.episodes_cut),
                      "w": w.tolist(), "closed_form_fixed_point": reference.tolist(),
                      "max_abs_to_fixed_point": float(np.max(np.abs(w - reference))),
                      "root_VE": float(np.sqrt(np.sum(mu * (X[1:-1] @ w - fixed["v"][1:-1]) ** 2)))}
    results["random_walk_1000"] = rows
    fig, ax = plt.subplots(figsize=(7, 4.2))
    states = np.arange(1, 1001)
    ax.plot(states, fixed["v"][1:-1], color="k", lw=1, label="true value v_pi")
    for name, style in (("gradient_mc", "-"), ("semi_gradient_td0", "--")):
        ax.step(states, X[1:-1] @ np.asarray(rows[name]["w"]), style, where="mid",
                label=f"{name.replace('_', ' ')} (alpha {rows[name]['alpha']:g})")
    ax2 = ax.twinx()
    ax2.fill_between(states, fixed["mu"][1:-1], color="gray", alpha=0.25)
    ax2.set_ylabel("on-policy distribution mu", fontsize=8)
    ax.set_xlabel("state"), ax.set_ylabel("value"), ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"Figures 9.1 / 9.2 (left): state aggregation (10 groups), {n:,} episodes", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "random_walk.png"), dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/results/rl")
    parser.add_argument("--small", action="store_true", help="a fraction of the episodes (a smoke run)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    scale = 0.02 if args.small else 1.0
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "small": args.small}
    for part in (blackjack_prediction, blackjack_control, importance_sampling, random_walk):
        part(scale, args.out, results)
        print(part.__name__, "done", flush=True)
    with open(os.path.join(args.out, "rl_tabular.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n| experiment | episodes | result | wall s |\n|---|---|---|---|")
    for row in results["figure_5_1"]:
        print(f"| Fig 5.1 MC prediction, stick on 20 | {row['episodes']:,} | RMS error vs DP {row['rmse_vs_dp']:.4f}"
              f" (max {row['max_abs_error']:.3f}) | {row['seconds']:.1f} |")
    es = results["figure_5_2"]
    optimal_states = 200 - es["states_where_policy_differs_from_optimal"]
    print(f"| Fig 5.2 MC ES | {es['episodes']:,} | policy = optimal in {optimal_states}/200 states (the others' "
          f"optimal Q gaps <= {es['largest_q_gap_at_those_states']:.3f}); mean value loss "
          f"{es['mean_value_loss_of_learned_policy']:.4f}; RMS(max Q - v*) {es['rmse_max_q_vs_v_star']:.4f} | "
          f"{es['seconds']:.1f} |")
    is_ = results["figure_5_3"]
    last = max(is_["mse_ordinary"])
    print(f"| Fig 5.3 IS, 100 runs | {is_['episodes']:,} | MSE at 1 / 10 / {last} episodes: ordinary "
          + " / ".join(f"{is_['mse_ordinary'][m]:.3g}" for m in (1, 10, last)) + ", weighted "
          + " / ".join(f"{is_['mse_weighted'][m]:.3g}" for m in (1, 10, last)) + f" | {is_['seconds']:.1f} |")
    for name, row in results["random_walk_1000"].items():
        print(f"| 1000-state walk, {name} | {row['episodes']:,} | max abs to closed-form fixed point "
              f"{row['max_abs_to_fixed_point']:.4f}; sqrt(VE) {row['root_VE']:.4f} | {row['seconds']:.1f} |")


if __name__ == "__main__":
    main()
