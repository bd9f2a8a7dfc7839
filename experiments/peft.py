"""Experiment: parameter-efficient fine-tuning methods against full fine-tuning, on a shift of the byte corpus.

    python -m experiments.peft [--pretrain_steps 300] [--steps 100] [--out experiments/results/peft]

1. Pre-trains lm_tiny (experiments/configs/lm_tiny.py) on the first half of the embedded corpus's train split
   (data.train_split="train[:50%]": the stdlib's modules from __future__ to idlelib, in path order).
2. Fine-tunes it (experiments/configs/lm_tiny_lora.py, train.init_from = the pre-trained run) on
   "train[50%:90%]" (idlelib to turtledemo) and evaluates on "train[90%:]" (the rest: unseen modules of the
   second half), once per method: full fine-tuning (peft.method "none"), LoRA r=4 and r=16 on W_q and W_v,
   prefix tuning (16 positions, MLP width 64), prompt tuning (16 embeddings), Houlsby adapters (bottleneck 16).
   Every fine-tune has the same data, steps and schedule; the peak learning rates (LEARNING_RATES) follow the
   papers' practice (lower for full fine-tuning, higher for prompts), none was tuned here.
Each run lives in OUT/runs/<name>/ (finished runs are skipped). Records per method: trained parameters, eval
bits/byte before and after fine-tuning on the held-out modules, median step time (the shared 2-core CPU's load
drifts: the times are indicative), and the train state's memory (trained params, optimizer state, frozen base).
Writes OUT/results.json and OUT/results.md.
"""

import argparse
import json
import math
import os
import statistics

import jax
import orbax.checkpoint as ocp

from experiments.configs import lm_tiny, lm_tiny_lora
from jaxmodels.train.checkpoint import params_item
from jaxmodels.train.loop import train_and_evaluate

METHODS = {  # name -> peft section overrides
    "full": dict(method="none"),
    "lora_r4": dict(method="lora", rank=4, alpha=8.0),
    "lora_r16": dict(method="lora", rank=16, alpha=32.0),
    "prefix": dict(method="prefix", prefix_length=16, prefix_hidden=64),
    "prompt": dict(method="prompt", prompt_length=16),
    "adapter": dict(method="adapter", adapter_dim=16),
}
LEARNING_RATES = {"full": 1e-3, "prompt": 3e-2, "prefix": 1e-2}  # the others: lm_tiny_lora's 3e-3
PRETRAIN_SPLIT, FINETUNE_SPLIT, EVAL_SPLIT = "train[:50%]", "train[50%:90%]", "train[90%:]"


def pretrain_config(steps: int):
    c = lm_tiny.get_config()
    c.data.train_split = PRETRAIN_SPLIT
    c.train.num_steps, c.train.eval_every, c.train.checkpoint_every = steps, 0, steps
    c.train.trackers = ("jsonl",)
    return c


def finetune_config(name: str, base: str, steps: int):
    c = lm_tiny_lora.get_config()
    c.peft.update(METHODS[name])
    c.train.init_from = base
    c.data.train_split, c.data.eval_split = FINETUNE_SPLIT, EVAL_SPLIT
    c.train.num_steps, c.train.eval_every, c.train.checkpoint_every = steps, 0, steps
    c.train.trackers = ("jsonl",)
    c.optimizer.learning_rate = LEARNING_RATES.get(name, c.optimizer.learning_rate)
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, steps // 5)
    return c


def run(name: str, config, workdir: str) -> dict:
    summary = train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    step_times = [r["train/step_time_s"] for r in rows if "train/step_time_s" in r]
    memory = summary["memory_per_device"]
    return {"name": name, "peft": dict(config.get("peft", {})) if name != "pretrain" else None,
            "learning_rate": config.optimizer.learning_rate, "steps": config.train.num_steps,
            "eval_start_bits_per_byte": summary["eval_start"]["bits_per_byte"],
            "eval_end_bits_per_byte": summary["eval_end"]["bits_per_byte"],
            "median_step_time_s": statistics.median(step_times),
            "trained_params_mib": memory["params_gib"] * 1024, "opt_state_mib": memory["opt_state_gib"] * 1024,
            "frozen_mib": memory.get("frozen_gib", 0.0) * 1024}


def trained_parameters(workdir: str) -> int:
    """The number of trained parameters of a run: the size of the params in its latest checkpoint."""
    tree = ocp.PyTreeCheckpointHandler().metadata(params_item(workdir)).tree["params"]
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def table(base: dict, rows: list[dict]) -> str:
    total = rows[0]["trained"]  # full fine-tuning trains every parameter
    lines = [f"Base: lm_tiny pre-trained {base['steps']} steps on {PRETRAIN_SPLIT} (eval bits/byte on "
             f"{EVAL_SPLIT}: {rows[0]['eval_start_bits_per_byte']:.3f}); each method fine-tunes {rows[0]['steps']} "
             f"steps on {FINETUNE_SPLIT}, eval on {EVAL_SPLIT} (8 batches of 32 x 128 bytes).", "",
             "| method | trained params | % of model | peak lr | eval bits/byte start | eval bits/byte end | "
             "step time (s) | trained + opt state (MiB) | frozen (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['trained']:,} | {100 * r['trained'] / total:.2f} | {r['learning_rate']:g} "
                     f"| {r['eval_start_bits_per_byte']:.3f} | {r['eval_end_bits_per_byte']:.3f} "
                     f"| {r['median_step_time_s']:.3f} | {r['trained_params_mib'] + r['opt_state_mib']:.2f} "
                     f"| {r['frozen_mib']:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain_steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="experiments/results/peft")
    args = parser.parse_args()
    runs = os.path.abspath(os.path.join(args.out, "runs"))
    base_dir = os.path.join(runs, "pretrain")
    base = run("pretrain", pretrain_config(args.pretrain_steps), base_dir)
    rows = []
    for name in METHODS:
        workdir = os.path.join(runs, name)
        rows.append({**run(name, finetune_config(name, base_dir, args.steps), workdir),
                     "trained": trained_parameters(workdir)})
    text = table(base, rows)
    print(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"pretrain": base, "methods": rows}, f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("# PEFT methods vs full fine-tuning (experiments/peft.py)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
