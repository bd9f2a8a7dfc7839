"""Normalising flows: Glow's train-step throughput and memory at 32x32x3, and a CNF's cost against its number of
function evaluations.

    python -m benchmarks.flows [--sizes small,paper] [--batch 64] [--steps 20] [--out benchmarks/results/flows.json]
    python -m benchmarks.flows --small     # seconds on a CPU: a tiny Glow at 8x8x3, a few CNF solves; no JSON

Glow: experiments/configs/flow_digits.py turned into the paper's CIFAR-10 setting — task "flow" on data
"synthetic_images" (uniformly random 8-bit 32x32x3 images: the cost of a step does not depend on the pixels),
uniform dequantisation, logit transform, float32, AdamW — built by `jaxmodels.train.loop.Trainer`, the
jit-sharded train step every experiment uses. Sizes: "paper" is Glow's CIFAR-10 model (L = 3 levels, K = 32
steps, 512 hidden channels, Kingma & Dhariwal 2018, Table 4 / App. D: 44M parameters in theirs), "small" L = 3,
K = 8, 128 channels. Reports the median step time of `--steps` steps after warm-up (each synchronised with
block_until_ready), images/s, and XLA's memory analysis of the compiled step (`Trainer.compile_train_step`).
No baseline library is compared (none in this environment); the figure to compare with is the paper's.

CNF: one training step (value and gradient of the mean NLL, through diffrax's RecursiveCheckpointAdjoint) of
experiments/configs/flow_toy2d.py's CNF (3 ConcatSquash layers of 64, exact trace, 2-D, batch 512) and of a
64-dimensional one (the digits' size; 2 x 256, Hutchinson trace, batch 64), for solvers Euler, Heun and
Tsit5 at 2..32 fixed steps: the number of function evaluations (NFE = steps x stages) against the median step
time. The cost should grow linearly in NFE; the ratio time / NFE is the cost of one evaluation with its trace.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from benchmarks.timing import median_time, trainer_step_times
from experiments.configs import flow_digits
from jaxmodels.models.flows import CNF
from jaxmodels.train.loop import Trainer

GLOW_SIZES = {"paper": dict(num_levels=3, num_steps=32, hidden_dim=512),
              "small": dict(num_levels=3, num_steps=8, hidden_dim=128),
              "tiny": dict(num_levels=2, num_steps=1, hidden_dim=8)}
CNF_CASES = {"2d_exact": dict(input_shape=(2,), hidden_dims=(64, 64, 64), trace="exact", batch=512),
             "64d_hutchinson": dict(input_shape=(64,), hidden_dims=(256, 256), trace="hutchinson", batch=64)}


def glow_config(size: str, batch: int, side: int) -> ml_collections.ConfigDict:
    c = flow_digits.get_config()
    c.model.name, c.model.input_shape = "glow", (side, side, 3)
    c.model.glow.update(GLOW_SIZES[size])
    c.data.update(name="synthetic_images", global_batch_size=batch)
    c.train.update(num_steps=10**6, checkpoint_every=10**6)
    c.optimizer.warmup_steps = 10
    return c


def bench_glow(size: str, batch: int, steps: int, warmup: int, side: int) -> dict:
    config = glow_config(size, batch, side)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir)
        t = time.perf_counter()
        memory = trainer.compile_train_step()
        compile_s = time.perf_counter() - t
        times, state, metrics = trainer_step_times(trainer, steps, warmup)
        parameters = sum(x.size for x in jax.tree.leaves(state["params"]))
    step = statistics.median(times)
    return {"model": f"Glow-{size}", **GLOW_SIZES[size], "image": [side, side, 3], "batch": batch,
            "parameters": int(parameters), "median_step_s": step, "min_step_s": min(times),
            "images_per_s": batch / step,
            "compile_s": compile_s, "final_bits_per_dim": float(metrics["bits_per_dim"]), "memory_gib": memory,
            "device": jax.devices()[0].device_kind}


def bench_cnf(case: str, solver: str, num_steps: int, iters: int) -> dict:
    spec = dict(CNF_CASES[case])
    batch = spec.pop("batch")
    model = CNF(solver=solver, num_steps=num_steps, rngs=nnx.Rngs(0), **spec)
    graphdef, params = nnx.split(model)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    x = jax.random.normal(jax.random.key(1), (batch, *spec["input_shape"]))

    @jax.jit
    def step(params, opt_state, key):
        loss, grads = jax.value_and_grad(lambda p: -jnp.mean(nnx.merge(graphdef, p).log_prob(x, key=key)))(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    seconds = median_time(step, params, opt_state, jax.random.key(2), iters=iters)
    nfe = model.num_function_evaluations
    return {"case": case, "solver": solver, "num_steps": num_steps, "nfe": nfe, "batch": batch,
            "median_step_s": seconds, "ms_per_nfe": 1e3 * seconds / nfe, "device": jax.devices()[0].device_kind}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="small,paper")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cnf-steps", default="2,4,8,16,32")
    parser.add_argument("--out", default="benchmarks/results/flows.json")
    parser.add_argument("--small", action="store_true", help="tiny Glow at 8x8x3, batch 4, 3 steps; 2 CNF solves; "
                                                             "writes no JSON (CPU smoke run)")
    args = parser.parse_args()
    side, solvers, iters = 32, ("euler", "heun", "tsit5"), 10
    if args.small:
        args.sizes, args.batch, args.steps, args.warmup, args.cnf_steps = "tiny", 4, 3, 1, "2"
        side, solvers, iters = 8, ("euler", "heun"), 2
    results = {"glow": [], "cnf": []}

    def save():  # after every row: a run cut short keeps what it measured
        if not args.small:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump({"benchmark": "Glow train step at 32x32x3 (library Trainer); CNF train step vs NFE",
                           **results}, f, indent=2)

    # The CNF sweep first: the paper-size Glow's compilation takes minutes.
    print(f"{'CNF case':>16} {'solver':>6} {'steps':>5} {'NFE':>4} {'step ms':>9} {'ms/NFE':>7}")
    for case in CNF_CASES:
        for solver in solvers:
            for n in map(int, args.cnf_steps.split(",")):
                r = bench_cnf(case, solver, n, iters)
                results["cnf"].append(r)
                save()
                print(f"{case:>16} {solver:>6} {n:>5} {r['nfe']:>4} {r['median_step_s'] * 1e3:>9.2f} "
                      f"{r['ms_per_nfe']:>7.3f}", flush=True)
    print(f"\n{'model':>12} {'batch':>5} {'params':>10} {'step ms':>9} {'images/s':>9} {'peak GiB':>9}")
    for size in args.sizes.split(","):
        r = bench_glow(size, args.batch, args.steps, args.warmup, side)
        results["glow"].append(r)
        save()
        peak = r["memory_gib"].get("peak_gib", r["memory_gib"]["temporaries_gib"])
        print(f"{r['model']:>12} {r['batch']:>5} {r['parameters']:>10} {r['median_step_s'] * 1e3:>9.2f} "
              f"{r['images_per_s']:>9.1f} {peak:>9.3f}", flush=True)

if __name__ == "__main__":
    main()
