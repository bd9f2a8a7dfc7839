"""Experiment: the same LM on bytes (lm_tiny) and on byte-level BPE tokens (lm_tiny_bpe), in bits per byte.

    python -m experiments.bpe_vs_bytes [--steps 600] [--out experiments/results/bpe_vs_bytes]

Trains experiments/configs/lm_tiny.py and experiments/configs/lm_tiny_bpe.py with the same model, optimiser,
steps and batch of 32 windows of 128 tokens, then evaluates each on every window of the embedded corpus's
validation split once (`data.eval_batches=0`). bits/byte counts each target token's nats over the UTF-8 bytes it
stands for, so the two numbers are comparable although a BPE window holds more text. Records per run: eval
bits/byte and loss per token at the start and the end, bytes per token, parameters, the tokens and bytes trained
on, the median step time and the wall time; writes OUT/results.json and OUT/results.md. Runs live in OUT/runs/
(a finished run is not trained again).
"""

import argparse
import json
import os
import statistics
import time

import jax
import ml_collections
from flax import nnx

from experiments.configs import lm_tiny, lm_tiny_bpe
from jaxmodels.models import make_model
from jaxmodels.train.loop import train_and_evaluate

CONFIGS = {"bytes": lm_tiny, "bpe_2048": lm_tiny_bpe}


def run(name: str, steps: int, out: str) -> dict:
    """Train config `name` for `steps` steps into OUT/runs/NAME; returns its row of the results table."""
    config = CONFIGS[name].get_config()
    config.train.update(num_steps=steps, eval_every=0, checkpoint_every=steps, trackers=("jsonl",))
    config.data.eval_batches = 0
    workdir = os.path.join(out, "runs", name)
    start = time.perf_counter()
    summary = train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "train/num_bytes" in r]
    with open(os.path.join(workdir, "config.json")) as f:  # the run's config: model.vocab_size resolved
        model_config = ml_collections.ConfigDict(json.load(f)["model"])
    model = nnx.eval_shape(lambda: make_model(model_config, nnx.Rngs(0)))
    end = summary["eval_end"]
    return {
        "tokenizer": config.data.tokenizer, "vocab_size": int(model_config.vocab_size),
        "parameters": sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
        "eval_bits_per_byte_start": summary["eval_start"]["bits_per_byte"], "eval_bits_per_byte": end["bits_per_byte"],
        "eval_loss_per_token": end["loss"], "eval_bytes_per_token": end["num_bytes"] / end["num_tokens"],
        "eval_tokens": int(end["num_tokens"]),
        "train_tokens": steps * config.data.global_batch_size * config.data.seq_len,
        # per logged step, scaled to all steps (train metrics are logged every train.log_every steps)
        "train_bytes": round(statistics.mean(r["train/num_bytes"] for r in rows) * steps),
        "median_step_time_s": statistics.median(r["train/step_time_s"] for r in rows if "train/step_time_s" in r),
        "wall_s": wall, "device": jax.devices()[0].device_kind, "sample": summary.get("sample", ""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default="experiments/results/bpe_vs_bytes")
    args = parser.parse_args()
    results = {"steps": args.steps, "runs": {name: run(name, args.steps, args.out) for name in CONFIGS}}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = ["| tokenizer | parameters | eval bits/byte (start → end) | loss/token | bytes/token | tokens trained | "
             "bytes trained | median step | wall |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"].values():
        lines.append(f"| {r['tokenizer']} ({r['vocab_size']} ids) | {r['parameters']:,} | "
                     f"{r['eval_bits_per_byte_start']:.3f} → {r['eval_bits_per_byte']:.3f} | "
                     f"{r['eval_loss_per_token']:.3f} | {r['eval_bytes_per_token']:.2f} | {r['train_tokens']:,} | "
                     f"{r['train_bytes']:,} | {r['median_step_time_s'] * 1e3:.1f} ms | {r['wall_s']:.0f} s |")
    table = "\n".join(lines)
    device = results["runs"]["bytes"]["device"]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"# BPE vs bytes, {args.steps} steps on {device}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
