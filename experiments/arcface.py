"""ArcFace vs CosFace vs plain softmax embeddings on MNIST-5k: verification accuracy on digit classes never seen in
training (experiments/configs/arcface_mnist.py; `jaxmodels.tasks.embedding`).

    python -m experiments.arcface [--heads softmax,arcface,cosface] [--steps 1000] [--data mnist]
                                  [--out experiments/results/arcface]

Each head trains the same network (ConvNet trunk, 64-d embedding) through `train_and_evaluate` on classes 0-6;
then the held-out classes 7-9 are verified: the cosine threshold is the best one on 3000 same + 3000 different
pairs of their train-split digits, the accuracy is measured on 3000 + 3000 pairs of their test-split digits (plus
the ROC AUC, threshold-free); the same for the seen classes' test digits. Raw pixels are the baseline. Writes
results.json, results.md and scores.png (the cosine of unseen test pairs, same vs different, per head).
"""

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.configs import arcface_mnist
from jaxmodels.tasks import make_task, metrics
from jaxmodels.tasks.embedding import cosine_scores
from jaxmodels.train.loop import Trainer, train_and_evaluate

HEADS = {"softmax": {}, "arcface": {"margin": 0.5}, "cosface": {"margin": 0.35}}


def run(head: str, steps: int, data: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """Trains one head; its results and the cosine scores of the unseen test pairs with their same flags."""
    config = arcface_mnist.get_config()
    config.model.update(head=head, **HEADS[head])
    config.data.name = data
    config.train.update(num_steps=steps, checkpoint_every=steps, eval_every=steps, log_every=max(steps // 4, 1),
                        trackers=("jsonl",))
    with tempfile.TemporaryDirectory() as workdir:
        start = time.time()
        summary = train_and_evaluate(config, workdir)
        train_seconds = time.time() - start
        trainer = Trainer(config, workdir)
        _, state = trainer.restore_or_init()
        model = trainer.model(state["params"])
    task = trainer.task
    verification = task.verification(model)
    test_x, test_y = task.split("test", seen=False)
    pairs, same = metrics.verification_pairs(test_y, config.verification.num_pairs, config.verification.seed + 1)
    scores = cosine_scores(task.embed(model, test_x), pairs)
    result = {"head": head, "scale": config.model.scale, "margin": config.model.margin if head != "softmax" else None,
              "train_steps": steps, "seen_test_classification_accuracy": summary["eval_end"]["accuracy"],
              "verification": verification, "train_seconds": train_seconds}
    return result, scores, same


def markdown(out: dict) -> str:
    pixels = out["pixels"]
    lines = ["# ArcFace vs CosFace vs softmax embeddings: verification of unseen MNIST classes", "",
             f"`python -m experiments.arcface` (experiments/configs/arcface_mnist.py; {out['device']}). Train on "
             f"{out['data']} classes {out['train_classes']} (train split), verify the held-out classes: threshold "
             f"chosen on {out['num_pairs']} same + {out['num_pairs']} different pairs of their train-split digits, "
             "accuracy on as many pairs of their test-split digits; cosine similarity of L2-normalised 64-d "
             "embeddings. Seen classes: the same protocol on the training classes' test digits.", "",
             "| head | s | m | unseen: test verification accuracy | unseen: test ROC AUC | unseen: threshold | "
             "seen: test verification accuracy | seen: test classification accuracy | train (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| raw pixels | - | - | {pixels['unseen']['test_accuracy']:.4f} | {pixels['unseen']['test_auc']:.4f} | "
             f"{pixels['unseen']['threshold']:.3f} | {pixels['seen']['test_accuracy']:.4f} | - | - |"]
    for r in out["runs"]:
        v = r["verification"]
        lines.append(f"| {r['head']} | {r['scale'] if r['head'] != 'softmax' else '-'} | "
                     f"{r['margin'] if r['margin'] is not None else '-'} | {v['unseen']['test_accuracy']:.4f} | "
                     f"{v['unseen']['test_auc']:.4f} | {v['unseen']['threshold']:.3f} | "
                     f"{v['seen']['test_accuracy']:.4f} | {r['seen_test_classification_accuracy']:.4f} | "
                     f"{r['train_seconds']:.0f} |")
    lines += ["", "![cosine scores of unseen test pairs](scores.png)", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", default="softmax,arcface,cosface")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--out", default="experiments/results/arcface")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    config = arcface_mnist.get_config()
    config.data.name = args.data
    task = make_task(config)
    path = os.path.join(args.out, "results.json")
    previous = json.load(open(path)) if os.path.exists(path) else {}
    runs = {r["head"]: r for r in previous.get("runs", []) if previous.get("data") == args.data}
    out = {"device": f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores ({platform.machine()})",
           "data": args.data, "train_classes": list(config.data.train_classes),
           "num_pairs": config.verification.num_pairs, "pixels": task.verification(None)}
    for head in args.heads.split(","):  # heads run before (with their scores) are kept
        result, scores, same = run(head, args.steps, args.data)
        runs[head] = {**result, "unseen_test_scores": {"same": scores[same].round(4).tolist(),
                                                       "different": scores[~same].round(4).tolist()}}
        v = result["verification"]
        print(f"{head}: unseen verification {v['unseen']['test_accuracy']:.4f} (AUC {v['unseen']['test_auc']:.4f}), "
              f"seen {v['seen']['test_accuracy']:.4f}, {result['train_seconds']:.0f} s", flush=True)
    out["runs"] = [runs[h] for h in HEADS if h in runs]
    plot(out["runs"], os.path.join(args.out, "scores.png"))
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(out))


def plot(runs: list[dict], path: str) -> None:
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.4), squeeze=False)
    bins = np.linspace(-1, 1, 81)
    for ax, r in zip(axes[0], runs):
        v = r["verification"]["unseen"]
        ax.hist(r["unseen_test_scores"]["same"], bins, alpha=0.6, label="same class")
        ax.hist(r["unseen_test_scores"]["different"], bins, alpha=0.6, label="different classes")
        ax.axvline(v["threshold"], color="k", lw=1, ls="--", label="threshold (validation)")
        ax.set(title=f"{r['head']}: unseen test pairs, accuracy {v['test_accuracy']:.3f}", xlabel="cosine")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
