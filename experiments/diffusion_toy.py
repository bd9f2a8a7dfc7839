"""Experiment 1: DDPM, EDM and rectified flow on the 2-D toys; sample quality vs number of sampling steps.

    python -m experiments.diffusion_toy [--steps 1500] [--out experiments/results/diffusion]

For each toy (checkerboard, two moons, 8 Gaussians) and objective (DDPM with v target and DDIM sampling,
EDM with Heun, rectified flow with Euler), trains experiments/configs/diffusion_toy2d.py through
`train_and_evaluate` (the library's jit-sharded train step), then draws 2000 samples at 1, 2, 4, 8, 16, 32
and 64 sampling steps and measures the sliced W2 (256 projections) to 2000 fresh data points; the
data-vs-data floor is the task's baseline. Writes toy_results.json, toy_samples.png (grid of scatter plots
at 32 steps) and toy_w2_vs_steps.png.
"""

import argparse
import json
import os
import tempfile
import time

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.configs import diffusion_toy2d
from jaxmodels.data import toy2d
from jaxmodels.tasks.diffusion import generate
from jaxmodels.train.loop import Trainer, train_and_evaluate

DATA = ("checkerboard", "two_moons", "eight_gaussians")
OBJECTIVES = {"ddpm": "ddim", "edm": "heun", "flow": "euler"}
STEPS = (1, 2, 4, 8, 16, 32, 64)
NUM_SAMPLES = 2000


def train(name: str, objective: str, steps: int, workdir: str):
    config = diffusion_toy2d.get_config()
    config.data.name, config.diffusion.objective = name, objective
    config.sample.sampler = OBJECTIVES[objective]
    config.train.num_steps, config.train.checkpoint_every, config.train.eval_every = steps, steps, 0
    config.train.log_every = steps // 2
    start = time.time()
    summary = train_and_evaluate(config, workdir)
    trainer = Trainer(config, workdir)
    _, state = trainer.restore_or_init()
    return trainer, trainer.model(state["params"]), summary, time.time() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", default="experiments/results/diffusion")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results, samples = {"train_steps": args.steps, "batch": 512, "num_samples": NUM_SAMPLES, "runs": {}}, {}
    for name in DATA:
        ref = np.asarray(toy2d.sample(name, 12345, NUM_SAMPLES))
        floor = float(toy2d.sliced_wasserstein2(ref, toy2d.sample(name, 54321, NUM_SAMPLES), jax.random.key(0)))
        results["runs"].setdefault(name, {"data_floor_sliced_w2": floor})
        for objective, sampler in OBJECTIVES.items():
            with tempfile.TemporaryDirectory() as workdir:
                trainer, model, summary, seconds = train(name, objective, args.steps, workdir)
            w2 = {}
            for n in STEPS:
                x = generate(model, trainer.task.spec, jax.random.key(7), (NUM_SAMPLES, 2), sampler=sampler,
                             num_steps=n)
                w2[n] = float(toy2d.sliced_wasserstein2(x, ref, jax.random.key(0)))
                if n == 32:
                    samples[(name, objective)] = x
            results["runs"][name][objective] = {"sampler": sampler, "train_seconds": seconds,
                                                "eval_loss_end": summary["eval_end"]["loss"], "sliced_w2": w2}
            print(name, objective, f"{seconds:.0f}s", {k: round(v, 4) for k, v in w2.items()}, flush=True)
    with open(os.path.join(args.out, "toy_results.json"), "w") as f:
        json.dump(results, f, indent=2)

    fig, axes = plt.subplots(len(DATA), len(OBJECTIVES) + 1, figsize=(12, 9))
    for i, name in enumerate(DATA):
        panels = [("data", np.asarray(toy2d.sample(name, 12345, NUM_SAMPLES)))] + \
                 [(f"{o} ({s}, 32 steps)", samples[(name, o)]) for o, s in OBJECTIVES.items()]
        for j, (title, x) in enumerate(panels):
            ax = axes[i, j]
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5)
            ax.set_xlim(-3, 3), ax.set_ylim(-3, 3), ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{name}: {title}", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "toy_samples.png"), dpi=110)

    fig, axes = plt.subplots(1, len(DATA), figsize=(13, 3.6))
    for ax, name in zip(axes, DATA):
        run = results["runs"][name]
        for objective, sampler in OBJECTIVES.items():
            ax.plot(STEPS, [run[objective]["sliced_w2"][n] for n in STEPS], marker="o",
                    label=f"{objective} ({sampler})")
        ax.axhline(run["data_floor_sliced_w2"], color="gray", ls="--", label="data vs data")
        ax.set_xscale("log", base=2), ax.set_yscale("log"), ax.set_xlabel("sampling steps"), ax.set_title(name)
    axes[0].set_ylabel("sliced W2 to data"), axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "toy_w2_vs_steps.png"), dpi=110)


if __name__ == "__main__":
    main()
