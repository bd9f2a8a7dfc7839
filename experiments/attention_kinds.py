"""Experiment: quality vs cost of every attention kind on the embedded corpus.

    python -m experiments.attention_kinds [--steps 200] [--lengths 128,256] [--out experiments/results/attention_kinds]

Trains each experiments/configs/lm_<kind>.py for a fixed budget of `--steps` steps at a fixed
number of tokens per step (`--tokens_per_step`, batch = tokens / length) at each context length,
then records the final eval bits/byte (the config's eval set at that length). Each run lives in
OUT/runs/<kind>_<length>/ and resumes from its checkpoint if interrupted; finished runs are
skipped, so re-running the command completes the table. Step time is measured in a separate pass
(`--time_steps` synchronised steps on random tokens after compilation, median), so that it can be
taken on an otherwise idle machine; `--time_only` re-measures it for the finished runs.
Writes OUT/results.json, OUT/results.md (table) and OUT/quality_vs_cost.png.
"""

import argparse
import importlib
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

from jaxmodels.models import make_model
from jaxmodels.tasks.lm import token_batch
from jaxmodels.train.loop import Trainer, train_and_evaluate

KINDS = ("softmax", "alibi", "linear", "performer", "norm", "diag", "transnormer", "sparse_strided",
         "sparse_fixed", "local_global", "gau", "flash_gau")


def kind_config(kind: str, length: int, tokens_per_step: int):
    config = importlib.import_module(f"experiments.configs.lm_{kind}").get_config()
    config.data.update(seq_len=length, global_batch_size=tokens_per_step // length)
    return config


def median_step_time(kind: str, length: int, tokens_per_step: int, num_steps: int) -> float:
    """Median wall time of synchronised train steps (after one compiling step) on random tokens."""
    config = kind_config(kind, length, tokens_per_step)
    trainer = Trainer(config, tempfile.mkdtemp())
    state = trainer.init()
    rng = np.random.default_rng(0)
    batch = trainer.global_batch(token_batch(rng.integers(0, 256, (config.data.global_batch_size, length + 1))))
    times = []
    for _ in range(num_steps + 1):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def run(kind: str, length: int, steps: int, tokens_per_step: int, workdir: str) -> dict:
    config = kind_config(kind, length, tokens_per_step)
    config.train.update(num_steps=steps, eval_every=0, checkpoint_every=steps, log_every=steps)
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 10)
    config.sample.max_new_tokens = 1
    summary = train_and_evaluate(config, workdir)
    model = nnx.eval_shape(lambda: make_model(config.model, nnx.Rngs(0)))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {"kind": kind, "length": length, "steps": steps, "tokens_per_step": tokens_per_step,
            "eval_bits_per_byte": summary["eval_end"]["bits_per_byte"], "num_params": int(params)}


def plot(rows: list[dict], path: str) -> None:
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 5), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for r in (r for r in rows if r["length"] == length and "median_step_time_s" in r):
            ax.scatter(r["median_step_time_s"] * 1e3, r["eval_bits_per_byte"])
            ax.annotate(r["kind"], (r["median_step_time_s"] * 1e3, r["eval_bits_per_byte"]), fontsize=8)
        ax.set(title=f"context {length}", xlabel="median step time on CPU (ms)",
               ylabel="eval bits/byte (lower is better)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Attention kinds after {rows[0]['steps']} steps of {rows[0]['tokens_per_step']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict]) -> str:
    lengths = sorted({r["length"] for r in rows})
    by = {(r["kind"], r["length"]): r for r in rows}
    head = "| kind | params | " + " | ".join(f"bits/byte @{n} | step ms @{n}" for n in lengths) + " |"
    lines = [head, "|" + " --- |" * (2 + 2 * len(lengths))]
    for kind in dict.fromkeys(r["kind"] for r in rows):
        cells = []
        for n in lengths:
            r = by.get((kind, n))
            cells += ["" if r is None else f"{r['eval_bits_per_byte']:.3f}",
                      "" if r is None or "median_step_time_s" not in r else f"{r['median_step_time_s'] * 1e3:.0f}"]
        params = next(r["num_params"] for r in rows if r["kind"] == kind)
        lines.append(f"| {kind} | {params / 1e6:.2f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--lengths", default="128,256")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--tokens_per_step", type=int, default=2048)
    p.add_argument("--time_steps", type=int, default=10)
    p.add_argument("--time_only", action="store_true", help="re-measure step times of the finished runs")
    p.add_argument("--out", default="experiments/results/attention_kinds")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    rows = json.load(open(results_path)) if os.path.exists(results_path) else []
    done = {(r["kind"], r["length"]) for r in rows}
    for length in map(int, args.lengths.split(",")):
        for kind in args.kinds.split(","):
            if (kind, length) in done and not args.time_only:
                continue
            if (kind, length) not in done:
                rows.append(run(kind, length, args.steps, args.tokens_per_step,
                                os.path.join(args.out, "runs", f"{kind}_{length}")))
            row = next(r for r in rows if (r["kind"], r["length"]) == (kind, length))
            row["median_step_time_s"] = median_step_time(kind, length, row["tokens_per_step"], args.time_steps)
            with open(results_path, "w") as f:
                json.dump(rows, f, indent=1)
            print(table(rows), flush=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table(rows) + "\n")
    plot(rows, os.path.join(args.out, "quality_vs_cost.png"))


if __name__ == "__main__":
    main()
