"""Experiment: a Switch-style MoE LM against dense LMs at equal active and at equal total parameters.

    python -m experiments.moe_vs_dense [--steps 400] [--out experiments/results/moe]

Trains three models on the embedded corpus with the same data, optimiser and number of steps:
  dense_active  lm_tiny: the dense model whose MLPs have the width of one expert, i.e. the same
                active (per-token) parameters and FLOPs as the MoE model up to its routers;
  moe           experiments/configs/lm_moe.py (8 experts, top-1, every other block);
  dense_total   lm_tiny with model.mlp_dim widened (in every block) until its total parameter count
                matches the MoE model's as closely as the width allows.
Each run lives in OUT/runs/<name>/ (finished runs are skipped, so re-running completes the set; a run
stopped by SIGINT/SIGTERM is recorded as interrupted with its curve so far, and resumes from its
checkpoint when the command is run again).
Records per run: final eval bits/byte, parameter counts (total, active per token), train FLOPs per
token (active parameters, `DecoderLM.train_flops_per_token`), median step time, the wall time of
training (sum of the measured step times, compilation and evaluation excluded), and for the MoE model
the load balance over training (max expert load relative to uniform, dropped fraction, load-balancing
loss, routing entropy). Because the CPU is shared, the step times measured during training drift with
the load; a separate timing pass (`--time_rounds`) measures every model's step in interleaved rounds
(each round times `--time_steps` synchronised steps of every model in turn; the median over all) so
the models see the same load, and "loss vs wall time" uses step x that median. Writes
OUT/results.json, OUT/results.md and OUT/moe_vs_dense.png (train bits/byte against steps and against
wall time, expert load balance against steps).
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from experiments.configs import lm_moe, lm_tiny
from jaxmodels.models import make_model
from jaxmodels.nn.transformer import moe_spec_from_config
from jaxmodels.tasks.lm import token_batch
from jaxmodels.train.loop import Trainer, train_and_evaluate

NAMES = ("dense_active", "moe", "dense_total")
BALANCE = ("max_expert_load", "dropped_fraction", "load_balancing_loss", "routing_entropy")


def num_params(model_config) -> int:
    model = nnx.eval_shape(lambda: make_model(model_config, nnx.Rngs(0)))
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def active_params(model_config) -> int:
    """Parameters a token uses: the total less the E - k idle experts of every MoE block."""
    m, moe = model_config, moe_spec_from_config(model_config.get("moe"))
    idle = moe.num_moe_layers(m.num_layers) * (moe.num_experts - moe.k) * 3 * m.embed_dim * m.mlp_dim
    return num_params(model_config) - (idle if moe.num_experts else 0)


def configs() -> dict:
    moe, dense = lm_moe.get_config(), lm_tiny.get_config()
    target, base = num_params(moe.model), num_params(dense.model)
    wide = lm_tiny.get_config()  # every block's SwiGLU MLP grows by 3 * embed_dim parameters per unit of width
    per_unit = 3 * wide.model.embed_dim * wide.model.num_layers
    wide.model.mlp_dim = dense.model.mlp_dim + round((target - base) / per_unit)
    return {"dense_active": dense, "moe": moe, "dense_total": wide}


def run(name: str, config, steps: int, workdir: str) -> dict:
    config.train.update(num_steps=steps, eval_every=0, checkpoint_every=steps, log_every=max(steps // 10, 1))
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 10)
    config.sample.max_new_tokens = 1
    summary = train_and_evaluate(config, workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in rows if "train/bits_per_byte" in r]
    step_times = [r["train/step_time_s"] for r in train if "train/step_time_s" in r]
    curve = {"step": [r["step"] for r in train], "bits_per_byte": [r["train/bits_per_byte"] for r in train],
             "wall_s": list(np.cumsum([r.get("train/step_time_s", 0.0) for r in train]))}
    for key in BALANCE:
        if f"train/{key}" in train[0]:
            curve[key] = [r[f"train/{key}"] for r in train]
    model = nnx.eval_shape(lambda: make_model(config.model, nnx.Rngs(0)))
    return {"name": name, "steps": steps, "completed_steps": summary["final_step"],
            "interrupted": summary["interrupted"], "mlp_dim": config.model.mlp_dim,
            "num_experts": config.model.moe.num_experts,
            "eval_bits_per_byte": None if summary["interrupted"] else summary["eval_end"]["bits_per_byte"],
            "total_params": num_params(config.model), "active_params": active_params(config.model),
            "train_flops_per_token": model.train_flops_per_token(config.data.seq_len),
            "median_step_time_s": statistics.median(step_times), "train_wall_s": float(sum(step_times)),
            "curve": curve}


def interleaved_step_times(all_configs: dict, rounds: int, steps: int) -> dict[str, float]:
    """name -> median seconds of a synchronised train step on random tokens, the models timed in turn
    within each of `rounds` rounds (after one compiling step each), so that they share the load."""
    trainers, states, batches, times = {}, {}, {}, {name: [] for name in all_configs}
    rng = np.random.default_rng(0)
    for name, config in all_configs.items():
        trainers[name] = Trainer(config, tempfile.mkdtemp())
        states[name] = trainers[name].init()
        shape = (config.data.global_batch_size, config.data.seq_len + 1)
        batches[name] = trainers[name].global_batch(token_batch(rng.integers(0, 256, shape, dtype=np.int32)))
        states[name], metrics = trainers[name].train_step(states[name], batches[name])
        jax.block_until_ready(metrics["loss"])
    for _ in range(rounds):
        for name, trainer in trainers.items():
            for _ in range(steps):
                start = time.perf_counter()
                states[name], metrics = trainer.train_step(states[name], batches[name])
                jax.block_until_ready(metrics["loss"])
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def smooth(values, width: int = 20):
    kernel = np.ones(min(width, len(values))) / min(width, len(values))
    return np.convolve(values, kernel, mode="valid")


def plot(rows: list[dict], path: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for r in rows:
        c = r["curve"]
        label = f"{r['name']} ({r['total_params'] / 1e6:.2f}M total, {r['active_params'] / 1e6:.2f}M active)"
        width = min(20, len(c["step"]))
        axes[0].plot(c["step"][width - 1:], smooth(c["bits_per_byte"], width), label=label)
        wall = np.asarray(c["step"]) * r.get("timed_step_s", r["median_step_time_s"])
        axes[1].plot(wall[width - 1:], smooth(c["bits_per_byte"], width), label=label)
    axes[0].set(xlabel="step", ylabel=f"train bits/byte ({20}-step mean)", title="loss vs steps")
    axes[1].set(xlabel="step x median step time (interleaved timing, shared 2-core CPU), s", ylabel="train bits/byte",
                title="loss vs wall time")
    for r in rows:
        c = r["curve"]
        if "max_expert_load" in c:
            axes[2].plot(c["step"], c["max_expert_load"], label="max expert load / uniform share")
            axes[2].plot(c["step"], c["load_balancing_loss"], label="load-balancing loss (1 = balanced)")
            axes[2].plot(c["step"], 10 * np.asarray(c["dropped_fraction"]), label="10 x dropped fraction")
    axes[2].set(xlabel="step", title="MoE load balance (lm_moe: 8 experts, top-1, capacity factor 1.25)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(top=min(4.0, axes[0].get_ylim()[1]))
    axes[1].set_ylim(top=min(4.0, axes[1].get_ylim()[1]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows: list[dict]) -> str:
    lines = ["| model | MLP width | experts | total params | active params | train MFLOP/token | eval bits/byte "
             "| step s (interleaved timing) | step s (median during training) | training wall s |",
             "|" + " --- |" * 10]
    for r in rows:
        timed = f"{r['timed_step_s']:.3f}" if "timed_step_s" in r else ""
        evaluated = (f"{r['eval_bits_per_byte']:.3f}" if r["eval_bits_per_byte"] is not None
                     else f"interrupted at step {r['completed_steps']}")
        lines.append(f"| {r['name']} | {r['mlp_dim']} | {r['num_experts'] or '-'} | {r['total_params'] / 1e6:.2f}M "
                     f"| {r['active_params'] / 1e6:.2f}M | {r['train_flops_per_token'] / 1e6:.2f} "
                     f"| {evaluated} | {timed} | {r['median_step_time_s']:.3f} "
                     f"| {r['train_wall_s']:.0f} |")
    moe = next((r for r in rows if r["name"] == "moe"), None)
    if moe:
        c = moe["curve"]
        last = slice(-max(len(c["step"]) // 10, 1), None)
        lines.append("")
        lines.append("MoE load balance over the last 10% of training (means): " + ", ".join(
            f"{k} {np.mean(c[k][last]):.3f}" for k in BALANCE) + f"; at the first step: max_expert_load "
            f"{c['max_expert_load'][0]:.2f}, dropped_fraction {c['dropped_fraction'][0]:.3f}.")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--names", default=",".join(NAMES))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--time_rounds", type=int, default=5)
    p.add_argument("--time_steps", type=int, default=4)
    p.add_argument("--out", default="experiments/results/moe")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    rows = json.load(open(results_path)) if os.path.exists(results_path) else []
    all_configs = configs()
    for name in args.names.split(","):
        if any(r["name"] == name and not r.get("interrupted") for r in rows):
            continue
        rows = [r for r in rows if r["name"] != name]  # an interrupted run resumes from its checkpoint
        rows.append(run(name, all_configs[name], args.steps, os.path.join(args.out, "runs", name)))
        rows.sort(key=lambda r: NAMES.index(r["name"]))
        with open(results_path, "w") as f:
            json.dump(rows, f, indent=1)
        print(table(rows), flush=True)
    if args.time_rounds and not any(r.get("interrupted") for r in rows) and any("timed_step_s" not in r for r in rows):
        timed = interleaved_step_times({r["name"]: all_configs[r["name"]] for r in rows}, args.time_rounds,
                                       args.time_steps)
        for r in rows:
            r["timed_step_s"] = timed[r["name"]]
        with open(results_path, "w") as f:
            json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table(rows) + "\n")
    plot(rows, os.path.join(args.out, "moe_vs_dense.png"))


if __name__ == "__main__":
    main()
