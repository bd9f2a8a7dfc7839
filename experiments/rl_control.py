"""Linear and neural action-value approximation on cart-pole: learning curves of semi-gradient Q-learning with a
Fourier basis and of DQN, each training run one jitted program, several seeds at once (vmap).

    python -m experiments.rl_control [--out experiments/results/rl] [--seeds 4] [--small]

Task: `CartPole` (gymnax's CartPole-v1 dynamics, reward 1 per step, episodes truncated at 500).
- linear: `linear_q_learning` with an order-3 Fourier basis (256 features over x in [-2.4, 2.4], x' in [-3, 3],
  theta in [-0.21, 0.21], theta' in [-3.5, 3.5]), 16 environments, alpha 0.002 (mean over environments),
  gamma 0.99, epsilon 0.2 -> 0.01 over the first half; 20k iterations = 320k environment steps.
- DQN: `dqn_train` with the default `DQNConfig` (MLP 64-64, 8 environments, buffer 20k, batch 128, Adam 5e-4, one
  gradient step per iteration from iteration 500, squared TD error, target copy every 50 iterations, epsilon
  1 -> 0.05 over the first quarter); 30k iterations = 240k environment steps.
Curves: mean return of the episodes that ended in each window of environment steps (mean over seeds, band min-max);
after training, the greedy policy's return over 100 fresh episodes per seed. Writes control.png and
rl_control.json into --out and prints a table.
"""

import argparse
import json
import os
import time

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from jaxmodels.rl import approximation, dqn, envs

FOURIER = approximation.FourierBasis(order=3, low=(-2.4, -3.0, -0.21, -3.5), high=(2.4, 3.0, 0.21, 3.5))


def curve(metrics, num_envs, windows):
    """(seeds, windows) mean return of the episodes ended per window, and the window ends in environment steps."""
    returns, episodes = np.asarray(metrics.returns), np.asarray(metrics.episodes)
    seeds, iterations = returns.shape
    per = iterations // windows
    r = returns[:, :per * windows].reshape(seeds, windows, per).sum(-1)
    e = episodes[:, :per * windows].reshape(seeds, windows, per).sum(-1)
    return np.where(e > 0, r / np.maximum(e, 1), np.nan), (np.arange(windows) + 1) * per * num_envs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/results/rl")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--small", action="store_true", help="short runs (a smoke test)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = envs.CartPole()
    iterations = 500 if args.small else 20_000
    keys = jax.random.split(jax.random.key(0), args.seeds)
    linear_config = approximation.LinearQConfig(num_envs=16, num_iterations=iterations, alpha=0.002, gamma=0.99,
                                                epsilon_start=0.2, epsilon_end=0.01, epsilon_steps=iterations // 2)
    dqn_config = dqn.DQNConfig(num_iterations=iterations, learning_starts=50) if args.small else dqn.DQNConfig()
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "seeds": args.seeds, "runs": {}}
    curves = {}

    start = time.perf_counter()
    W, metrics = jax.block_until_ready(jax.vmap(
        lambda k: approximation.linear_q_learning(env, FOURIER, k, linear_config))(keys))
    linear_seconds = time.perf_counter() - start
    greedy = [np.asarray(approximation.greedy_returns(env, lambda o, w=W[i]: w @ FOURIER(o), jax.random.key(100 + i),
                                                      100)) for i in range(args.seeds)]
    curves["linear (Fourier order 3, Q-learning)"] = curve(metrics, linear_config.num_envs, 40)
    results["runs"]["linear"] = {"config": linear_config.__dict__, "features": "Fourier order 3 (256)",
                                 "wall_seconds_all_seeds_incl_compile": linear_seconds,
                                 "env_steps_per_seed": iterations * linear_config.num_envs,
                                 "greedy_return_mean_per_seed": [float(g.mean()) for g in greedy]}

    start = time.perf_counter()
    init = jax.vmap(lambda k: dqn.init_q_network(env, k, dqn_config.hidden)[1])(keys)
    graphdef, _ = dqn.init_q_network(env, keys[0], dqn_config.hidden)
    params, metrics = jax.block_until_ready(jax.vmap(
        lambda p, k: dqn.dqn_train_from(env, dqn_config, graphdef, p, k))(init, jax.random.split(keys[0], args.seeds)))
    dqn_seconds = time.perf_counter() - start
    greedy = []
    for i in range(args.seeds):
        q = dqn.DQNResult(graphdef, jax.tree.map(lambda x, i=i: x[i], params), None).q_function()
        greedy.append(np.asarray(approximation.greedy_returns(env, q, jax.random.key(200 + i), 100)))
    curves["DQN (MLP 64-64)"] = curve(metrics, dqn_config.num_envs, 40)
    results["runs"]["dqn"] = {"config": {k: (list(v) if isinstance(v, tuple) else v)
                                         for k, v in dqn_config.__dict__.items()},
                              "wall_seconds_all_seeds_incl_compile": dqn_seconds,
                              "env_steps_per_seed": dqn_config.num_iterations * dqn_config.num_envs,
                              "greedy_return_mean_per_seed": [float(g.mean()) for g in greedy]}

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, (c, steps) in curves.items():
        ax.plot(steps, np.nanmean(c, 0), label=label)
        ax.fill_between(steps, np.nanmin(c, 0), np.nanmax(c, 0), alpha=0.2)
        results["runs"]["linear" if label.startswith("linear") else "dqn"]["curve"] = {
            "env_steps": steps.tolist(), "mean_return": np.nanmean(c, 0).tolist()}
    ax.axhline(500, color="gray", ls=":", lw=1)
    ax.set_xlabel("environment steps (per seed)"), ax.set_ylabel("return of episodes ended (mean over seeds)")
    ax.set_title(f"CartPole-v1: linear vs neural Q-learning ({args.seeds} seeds, band = min-max)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "control.png"), dpi=110)
    with open(os.path.join(args.out, "rl_control.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n| method | env steps per seed | final-window return (mean over seeds) | greedy return, 100 episodes per "
          "seed | wall s (all seeds, incl. compile) |\n|---|---|---|---|---|")
    for name in ("linear", "dqn"):
        run = results["runs"][name]
        print(f"| {name} | {run['env_steps_per_seed']:,} | {run['curve']['mean_return'][-1]:.1f} | "
              + ", ".join(f"{g:.1f}" for g in run["greedy_return_mean_per_seed"])
              + f" | {run['wall_seconds_all_seeds_incl_compile']:.1f} |")


if __name__ == "__main__":
    main()
