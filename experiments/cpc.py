"""Contrastive Predictive Coding on 8x8 digits read row by row: the MI bound over training and a linear probe.

    python -m experiments.cpc [--steps 1500] [--out experiments/results/cpc]

Trains experiments/configs/cpc_digits.py through `train_and_evaluate` in three variants: GRU context with
in-batch + cross-time negatives (N = 64 x 8 = 512 candidates, the config's default), GRU with in-batch negatives
only (N = 64), and a causal-convolution context with both. Logs the train MI bound log N - L (mean over k = 1..3
and per k) every 50 steps and the eval bound on 4 test batches. Then fits the linear probe (logistic regression
on the frozen mean context, `CPCTask.probe_accuracy`) on all 1500 training digits and on 100 of them, for the
trained network and for randomly initialised ones (3 seeds). Writes results.json, results.md and mi_bound.png.
"""

import argparse
import json
import os
import tempfile
import time

import matplotlib
import numpy as np
from flax import nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.configs import cpc_digits
from jaxmodels.train.loop import Trainer, train_and_evaluate

VARIANTS = {"gru, batch+time negatives": {}, "gru, batch negatives": {"cpc.negatives": "batch"},
            "causal conv, batch+time negatives": {"model.context": "causal_conv"}}
RANDOM_SEEDS = (1, 2, 3)


def probe(task, model, examples: int) -> float:
    task.config.sample.probe_examples = examples
    return task.probe_accuracy(model)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", default="experiments/results/cpc")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {"train_steps": args.steps, "batch": 64, "variants": {}}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, overrides in VARIANTS.items():
        config = cpc_digits.get_config()
        for path, value in overrides.items():
            section, field = path.split(".")
            config[section][field] = value
        config.train.update(num_steps=args.steps, checkpoint_every=args.steps, eval_every=args.steps // 3,
                            log_every=50)
        with tempfile.TemporaryDirectory() as workdir:
            start = time.time()
            summary = train_and_evaluate(config, workdir)
            seconds = time.time() - start
            with open(os.path.join(workdir, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f]
            trainer = Trainer(config, workdir)
            _, state = trainer.restore_or_init()
            model = trainer.model(state["params"])
        task = trainer.task
        curve = [(r["step"], r["train/mi_bound"]) for r in rows if "train/mi_bound" in r]
        trained = {n: probe(task, model, n) for n in (0, 100)}
        random = {n: [probe(task, task.build_model(nnx.Rngs(s)), n) for s in RANDOM_SEEDS] for n in (0, 100)}
        results["variants"][name] = {
            "train_seconds": seconds, "log_n": task.baseline()["mi_bound_ceiling"],
            "eval_end": summary["eval_end"], "train_mi_bound_curve": curve,
            "probe_accuracy_all_labels": {"trained": trained[0], "random_mean": float(np.mean(random[0])),
                                          "random": random[0]},
            "probe_accuracy_100_labels": {"trained": trained[100], "random_mean": float(np.mean(random[100])),
                                          "random": random[100]}}
        print(name, f"{seconds:.0f}s eval MI bound {summary['eval_end']['mi_bound']:.3f} (log N "
              f"{task.baseline()['mi_bound_ceiling']:.3f}); probe all {trained[0]:.3f} vs random "
              f"{np.mean(random[0]):.3f}; 100 labels {trained[100]:.3f} vs {np.mean(random[100]):.3f}", flush=True)
        steps, bounds = zip(*curve)
        axes[0].plot(steps, bounds, label=f"{name} (log N = {task.baseline()['mi_bound_ceiling']:.2f})")
        if name == next(iter(VARIANTS)):
            for k in (1, 2, 3):
                axes[1].plot(*zip(*[(r["step"], r[f"train/mi_bound_k{k}"]) for r in rows
                                    if f"train/mi_bound_k{k}" in r]), label=f"k = {k}")
    axes[0].set_xlabel("step"), axes[0].set_ylabel("log N - L (nats)"), axes[0].legend(fontsize=8)
    axes[0].set_title("InfoNCE lower bound on I(x_{t+k}; c_t), mean over k")
    axes[1].set_xlabel("step"), axes[1].legend(), axes[1].set_title(f"{next(iter(VARIANTS))}: bound per k")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "mi_bound.png"), dpi=80)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
