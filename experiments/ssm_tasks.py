"""Experiment: state-space models on the tasks of the S4 and Mamba papers, at 2-core-CPU scale.

    python -m experiments.ssm_tasks [--only copying,induction,digits,lm] [--quick] [--out experiments/results/ssm]

  copying    selective copying (Mamba Table 1): S4D (LTI) vs Mamba (S6), accuracy on the 16 answers;
  induction  induction heads (Mamba Table 2): Mamba vs softmax attention + RoPE vs S4D, trained at length
             256, accuracy at each of --lengths (attention only up to --max_attention_length);
  digits     sequential 8x8 digits (S4's sequential MNIST, small): S4D, S4, LRU test accuracy;
  lm         embedded-corpus byte LM: Mamba vs Transformer at about equal parameters, same steps and
             batch: eval bits/byte and wall time.

Each run lives in OUT/runs/<name>/ (train_and_evaluate resumes from its checkpoint); OUT/results.json is
rewritten after every run and runs already in it are skipped, so re-running completes the table.
Writes OUT/results.json and OUT/ssm_tasks.png and prints the results table (kept in OUT/results.md).
--quick: a few steps of everything
at tiny lengths into /tmp/ssm_tasks_quick (a smoke test of this script, not a result).
"""

import argparse
import importlib
import json
import os
import time

import matplotlib

matplotlib.use("Agg")
import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from tqdm import tqdm

from experiments.configs import ssm_selective_copying
from jaxmodels.tasks import make_task
from jaxmodels.train.loop import Trainer, init_rngs, train_and_evaluate

EXPERIMENTS = ("copying", "induction", "digits", "lm")


def mamba_model(**overrides) -> dict:
    """Mamba, d_state 16. On CPU the scan runs in chunks of 16 positions (the same function as the
    associative scan, measured 2x faster on a 2-core CPU); elsewhere the layer picks its scan (the fused
    kernel on GPU)."""
    chunk_size = 16 if jax.default_backend() == "cpu" else None
    return {**ssm_selective_copying.token_model("mamba", **overrides), "chunk_size": chunk_size}


def token_run(config_name: str, kind: str, args):
    config = importlib.import_module(f"experiments.configs.{config_name}").get_config()
    config.model = mamba_model() if kind == "mamba" else ssm_selective_copying.token_model(kind)
    config.data.global_batch_size = args.batch_size
    config.data.seq_len = 64 if args.quick else args.seq_len
    if config.data.name == "selective_copying":
        config.data.num_tokens = args.num_tokens
    if args.learning_rate:
        config.optimizer.learning_rate = args.learning_rate
    config.train.update(num_steps=args.steps, eval_every=0, checkpoint_every=args.steps)
    return config


def digits_run(mixer: str, args):
    config = importlib.import_module("experiments.configs.ssm_digits").get_config()
    config.model.mixer = mixer
    if mixer == "lru":
        config.model.mixer_kwargs = {"r_min": 0.5}
    config.train.update(num_steps=args.digits_steps, eval_every=0, checkpoint_every=args.digits_steps)
    return config


def lm_run(kind: str, args):
    """Byte LM, d_model 64: Transformer (2 layers, SwiGLU 192) vs Mamba (3 layers), ~0.13M parameters each."""
    config = importlib.import_module("experiments.configs.lm_tiny").get_config()
    if kind == "mamba":
        config.model = mamba_model(vocab_size=256, num_layers=3)
    else:
        config.model.update(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=4, head_dim=16, mlp_dim=192)
    config.data.update(seq_len=128, global_batch_size=args.batch_size)
    config.sample.max_new_tokens = 64
    config.train.update(num_steps=args.lm_steps, eval_every=0, checkpoint_every=args.lm_steps)
    return config


def planned_runs(args) -> list[tuple[str, str, object]]:
    """(experiment, run name, config) for every run of the selected experiments."""
    runs = []
    for experiment in args.only:  # in the order given
        if experiment == "copying":
            runs += [("copying", f"copying_{k}", token_run("ssm_selective_copying", k, args)) for k in ("s4d", "mamba")]
        elif experiment == "induction":
            runs += [("induction", f"induction_{k}", token_run("ssm_induction_heads", k, args))
                     for k in ("s4d", "attention", "mamba")]
        elif experiment == "digits":
            runs += [("digits", f"digits_{m}", digits_run(m, args)) for m in ("s4d", "lru", "s4")]
        else:
            runs += [("lm", f"lm_{k}", lm_run(k, args)) for k in ("transformer", "mamba")]
    if args.quick:
        for _, _, config in runs:
            config.train.update(num_steps=3, log_every=1, checkpoint_every=3)
            config.data.eval_batches = 1
    return runs


def num_params(config) -> int:
    task = make_task(config)
    model = nnx.eval_shape(lambda: task.build_model(init_rngs(config)))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def length_generalisation(config, workdir: str, lengths: list[int], batch_size: int) -> dict:
    """Accuracy at each length of the model restored from workdir's final checkpoint."""
    trainer = Trainer(config, workdir)
    _, state = trainer.restore_or_init()
    model = trainer.model(state["params"])
    out = {}
    for length in tqdm(lengths, desc="lengths", leave=False):
        start = time.perf_counter()
        metrics = trainer.task.evaluate_lengths(model, [length], batch_size)[length]
        out[str(length)] = {**metrics, "eval_s": time.perf_counter() - start}
    return out


def run_one(experiment: str, name: str, config, args) -> dict:
    workdir = os.path.join(args.out, "runs", name)
    start = time.perf_counter()
    summary = train_and_evaluate(config, workdir)
    row = {"experiment": experiment, "model": config.model.name, "params": num_params(config),
           "steps": config.train.num_steps, "batch": config.data.global_batch_size,
           "seq_len": config.data.get("seq_len", 64), "wall_s": time.perf_counter() - start,
           "eval": summary["eval_end"], "baseline": summary["baseline"], "sample": summary["sample"]}
    if experiment == "induction":
        kind = name.split("_", 1)[1]
        limit = args.max_attention_length if kind == "attention" else max(args.lengths)
        lengths = [n for n in args.lengths if n <= limit]
        row["lengths"] = length_generalisation(config, workdir, lengths, args.eval_batch_size)
        row["lengths_skipped"] = [n for n in args.lengths if n > limit]
    return row


def plot(results: dict, path: str) -> None:
    """One panel per experiment present in `results`: bars of the final metric, or for induction heads
    accuracy against test length."""
    present = [e for e in EXPERIMENTS if any(v["experiment"] == e for v in results.values())]
    if not present:
        return
    fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.8), squeeze=False)
    for ax, experiment in zip(axes[0], present):
        rows = {k: v for k, v in results.items() if v["experiment"] == experiment}
        length = next(iter(rows.values()))["seq_len"]
        if experiment == "induction":
            for name, v in rows.items():
                lengths = sorted(int(n) for n in v["lengths"])
                ax.plot(lengths, [v["lengths"][str(n)]["accuracy"] for n in lengths], "o-", label=name.split("_", 1)[1])
            ax.set_xscale("log", base=2)
            ax.axvline(length, color="gray", ls=":")
            ax.set_title(f"induction heads (trained at {length})")
            ax.set_xlabel("test length")
            ax.set_ylabel("accuracy")
            ax.legend()
            continue
        metric = "bits_per_byte" if experiment == "lm" else "accuracy"
        ax.bar([k.split("_", 1)[1] for k in rows], [v["eval"][metric] for v in rows.values()], color="tab:blue")
        ax.set_title({"copying": f"selective copying (L={length})", "digits": "sequential digits (test)",
                      "lm": "byte LM, equal params"}[experiment])
        ax.set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict) -> str:
    lines = ["| run | params | steps x batch | seq len | eval | wall (s) |", "|---|---|---|---|---|---|"]
    for name, v in results.items():
        metrics = ", ".join(f"{k} {x:.4f}" for k, x in v["eval"].items())
        lines.append(f"| {name} | {v['params']:,} | {v['steps']} x {v['batch']} | {v['seq_len']} | {metrics} | "
                     f"{v['wall_s']:.0f} |")
    induction = {k: v for k, v in results.items() if v["experiment"] == "induction"}
    if induction:
        lengths = sorted({int(n) for v in induction.values() for n in [*v["lengths"], *v["lengths_skipped"]]})
        trained_at = next(iter(induction.values()))["seq_len"]
        lines += ["", f"Induction heads accuracy by test length (trained at {trained_at}; '-' = not run):", "",
                  "| model | " + " | ".join(map(str, lengths)) + " |", "|---" * (len(lengths) + 1) + "|"]
        for name, v in induction.items():
            cells = [f"{v['lengths'][str(n)]['accuracy']:.3f}" if str(n) in v["lengths"] else "-" for n in lengths]
            lines.append(f"| {name.split('_', 1)[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(EXPERIMENTS),
                   help="comma-separated subset of " + ",".join(EXPERIMENTS) + ", run in this order")
    p.add_argument("--steps", type=int, default=300, help="training steps of the copying and induction runs")
    p.add_argument("--digits_steps", type=int, default=400)
    p.add_argument("--lm_steps", type=int, default=150)
    p.add_argument("--batch_size", type=int, default=16, help="copying, induction and LM batch size")
    p.add_argument("--seq_len", type=int, default=256,
                   help="training length of copying and induction (the paper's: 256)")
    p.add_argument("--num_tokens", type=int, default=16, help="selective copying: data tokens to copy")
    p.add_argument("--learning_rate", type=float, default=None, help="copying and induction (default: the config's)")
    p.add_argument("--lengths", default="256,512,1024,2048,4096,8192", help="induction heads test lengths")
    p.add_argument("--max_attention_length", type=int, default=4096)
    p.add_argument("--eval_batch_size", type=int, default=8, help="batch of the length-generalisation evals")
    p.add_argument("--quick", action="store_true", help="3 steps of everything at tiny lengths (smoke test)")
    p.add_argument("--out", default=None, help="default experiments/results/ssm, /tmp/ssm_tasks_quick with --quick")
    args = p.parse_args()
    args.only = args.only.split(",")
    if set(args.only) - set(EXPERIMENTS):
        p.error(f"unknown experiments {sorted(set(args.only) - set(EXPERIMENTS))}; valid: {list(EXPERIMENTS)}")
    args.lengths = [64, 128] if args.quick else [int(n) for n in args.lengths.split(",")]
    args.out = args.out or ("/tmp/ssm_tasks_quick" if args.quick else "experiments/results/ssm")
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    results = json.load(open(json_path)) if os.path.exists(json_path) else {}
    runs = [r for r in planned_runs(args) if r[1] not in results]
    for experiment, name, config in tqdm(runs, desc="runs"):
        results[name] = run_one(experiment, name, config, args)
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    plot(results, os.path.join(args.out, "ssm_tasks.png"))
    print(table(results))


if __name__ == "__main__":
    main()
