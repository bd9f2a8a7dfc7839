"""Environment steps per second under vmap (batch 1 .. 65536) against gymnax, and the wall time of a DQN run.

    python -m benchmarks.rl [--batches 1,16,256,4096,65536] [--steps 100] [--out benchmarks/results/rl.json] [--smoke]

For each environment and batch size B: one jitted `lax.scan` of `--steps` steps of B environments under vmap,
uniformly random actions, automatic resets (`step_and_reset`; gymnax's `env.step` resets the same way); the time is
the median of 5 runs after warm-up, synchronised with block_until_ready (benchmarks/timing.py), and the rate is
B * steps / time. Baseline: gymnax's CartPole-v1 and MountainCar-v0 in the same loop (when gymnax is installed;
its Blackjack does not exist). Then the wall time of `dqn_train` with the default DQNConfig on CartPole
(20k iterations x 8 environments), compile included and excluded.
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from benchmarks.timing import median_time
from jaxmodels.rl import dqn, envs

OURS = {"CartPole": envs.CartPole(), "MountainCar": envs.MountainCar(), "Blackjack": envs.Blackjack(),
        "GridWorld": envs.GridWorld(), "RandomWalk": envs.RandomWalk()}
GYMNAX = {"CartPole": "CartPole-v1", "MountainCar": "MountainCar-v0"}


def ours_loop(env, batch, steps):
    def run(key):
        k_reset, k_loop = jax.random.split(key)
        states, _ = jax.vmap(env.reset)(jax.random.split(k_reset, batch))

        def body(states, k):
            k_act, k_step = jax.random.split(k)
            actions = jax.random.randint(k_act, (batch,), 0, env.num_actions)
            states, out = jax.vmap(lambda s, a, kk: envs.step_and_reset(env, s, a, kk))(
                states, actions, jax.random.split(k_step, batch))
            return states, out.reward.sum()

        states, rewards = jax.lax.scan(body, states, jax.random.split(k_loop, steps))
        return rewards.sum() + checksum(states)  # the final states are used: XLA cannot drop the dynamics

    return jax.jit(run)


def checksum(states):
    return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(states))


def gymnax_loop(name, batch, steps):
    import gymnax

    env, params = gymnax.make(name)

    def run(key):
        k_reset, k_loop = jax.random.split(key)
        _, states = jax.vmap(env.reset, (0, None))(jax.random.split(k_reset, batch), params)

        def body(states, k):
            k_act, k_step = jax.random.split(k)
            actions = jax.random.randint(k_act, (batch,), 0, env.num_actions)
            _, states, reward, *_ = jax.vmap(env.step, (0, 0, 0, None))(
                jax.random.split(k_step, batch), states, actions, params)
            return states, reward.sum()

        states, rewards = jax.lax.scan(body, states, jax.random.split(k_loop, steps))
        return rewards.sum() + checksum(states)

    return jax.jit(run)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,16,256,4096,65536")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--envs", default=",".join(OURS))
    p.add_argument("--dqn_iterations", type=int, default=20_000)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (checks the script runs)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "rl.json"))
    args = p.parse_args()
    if args.smoke:
        args.batches, args.steps, args.dqn_iterations = "1,16", 10, 200
    try:
        import gymnax  # noqa: F401
        have_gymnax = True
    except ImportError:
        have_gymnax = False
    result = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
              "steps_per_run": args.steps, "baseline": "gymnax" if have_gymnax else None, "env_steps": []}
    for name in args.envs.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            row = {"env": name, "batch": batch}
            loops = {"jaxmodels": ours_loop(OURS[name], batch, args.steps)}
            if have_gymnax and name in GYMNAX:
                loops["gymnax"] = gymnax_loop(GYMNAX[name], batch, args.steps)
            for label, fn in loops.items():
                seconds = median_time(fn, jax.random.key(0), warmup=1, iters=5)
                row[f"{label}_steps_per_s"] = batch * args.steps / seconds
            if "gymnax_steps_per_s" in row:
                row["ratio_vs_gymnax"] = row["jaxmodels_steps_per_s"] / row["gymnax_steps_per_s"]
            result["env_steps"].append(row)
            print({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    config = dqn.DQNConfig(num_iterations=args.dqn_iterations)
    env = envs.CartPole()
    graphdef, params = dqn.init_q_network(env, jax.random.key(0), config.hidden)
    start = time.perf_counter()
    compiled = dqn.dqn_train_from.lower(env, config, graphdef, params, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    trained, metrics = jax.block_until_ready(compiled(params, jax.random.key(1)))
    run_s = time.perf_counter() - start
    tail = slice(-max(args.dqn_iterations // 10, 1), None)
    result["dqn_cartpole"] = {"iterations": config.num_iterations, "num_envs": config.num_envs,
                              "env_steps": config.num_iterations * config.num_envs,
                              "gradient_steps": config.num_iterations - config.learning_starts,
                              "compile_s": compile_s, "run_s": run_s,
                              "last_10pct_mean_return": float(metrics.returns[tail].sum()
                                                              / jnp.maximum(metrics.episodes[tail].sum(), 1))}
    print(result["dqn_cartpole"])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{result['device']} ({result['backend']}); env steps/s, random actions with auto-reset")
    print(f"{'env':12} {'batch':>6} {'jaxmodels':>12} {'gymnax':>12} {'ratio':>6}")
    for r in result["env_steps"]:
        print(f"{r['env']:12} {r['batch']:6d} {r['jaxmodels_steps_per_s']:12.3g} "
              f"{r.get('gymnax_steps_per_s', float('nan')):12.3g} {r.get('ratio_vs_gymnax', float('nan')):6.2f}")


if __name__ == "__main__":
    main()
