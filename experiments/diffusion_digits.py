"""Experiment 2: class-conditional 8x8 digits — DDPM/DDIM, EDM-Heun, rectified flow and reflow; quality by
a digit classifier trained here, vs sampling steps and vs classifier-free guidance scale.

    python -m experiments.diffusion_digits [--steps 800] [--reflow-steps 400] [--out experiments/results/diffusion]

1. Trains the evaluation classifier (`fit_digit_classifier`) and reports its test accuracy and the Fréchet
   distance (FD) between its features of the real train and test digits (the floor).
2. Trains experiments/configs/diffusion_digits.py (UNet, label dropout 0.1) with objective ddpm (v target),
   edm and flow through `train_and_evaluate`.
3. For samplers DDPM (ancestral), DDIM, EDM-Heun and RF-Euler: 200 samples (20 per class) at 1, 2, 4, 8,
   32 steps (guidance 1) and at 32 steps for guidance 0, 1, 2, 3, 5: classifier accuracy w.r.t. the
   conditioning label and FD to the test split.
4. Reflow (Liu et al. 2022, §2.3): 4000 (noise, sample) pairs from the flow at 32 Euler steps, guidance 1;
   the 2-rectified flow starts from the 1-rectified one's weights and trains --reflow-steps steps on the
   pairs with the library's Trainer train step; both are compared at 1, 2, 4, 8 Euler steps.
Writes digits_results.json and digits_samples.png (sample grids, one class per row).
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

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.configs import diffusion_digits
from jaxmodels.data import digits
from jaxmodels.tasks.diffusion import digit_sample_metrics, fit_digit_classifier, generate
from jaxmodels.train.loop import Trainer, train_and_evaluate

RUNS = {"ddpm": ("ddpm", "ddim"), "edm": ("heun",), "flow": ("euler",)}
STEPS = (1, 2, 4, 8, 32)
SCALES = (0.0, 1.0, 2.0, 3.0, 5.0)
NUM = 200


def config_for(objective: str, steps: int):
    c = diffusion_digits.get_config()
    c.diffusion.objective, c.sample.sampler = objective, RUNS[objective][0]
    c.train.num_steps, c.train.checkpoint_every, c.train.eval_every, c.train.log_every = steps, steps, 0, steps // 4
    return c


def grid(x: np.ndarray, rows: int = 10) -> np.ndarray:
    """(rows * cols, 8, 8, 1) in [-1, 1] -> one (rows * 9, cols * 9) image, digits of a class on a row."""
    x = np.clip(x[..., 0], -1, 1).reshape(-1, rows, 8, 8).transpose(1, 0, 2, 3)  # labels cycle 0..9
    padded = np.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1)), constant_values=-1)
    return padded.transpose(0, 2, 1, 3).reshape(rows * 9, -1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--reflow-steps", type=int, default=400)
    parser.add_argument("--objectives", default="ddpm,edm,flow", help="subset of ddpm,edm,flow (flow: reflow too)")
    parser.add_argument("--out", default="experiments/results/diffusion")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    classifier = fit_digit_classifier(num_steps=400)
    test_images, test_labels, _ = digits.load_split("test")
    train_images, _, _ = digits.load_split("train")
    ref = digits.to_unit_range(test_images)
    real = digit_sample_metrics(classifier, ref, test_labels, digits.to_unit_range(train_images))
    results = {"settings": {"train_steps": args.steps, "batch": 64, "reflow_steps": args.reflow_steps,
                            "num_samples": NUM, "model": "unet 16-32 ch, no attention", "label_dropout": 0.1},
               "classifier": {"test_accuracy": real["accuracy"], "fd_train_vs_test": real["frechet_distance"],
                              "seconds": time.time() - start},
               "runs": {}}
    print("classifier", results["classifier"], flush=True)
    labels = np.arange(NUM) % 10
    models, grids = {}, {}
    for objective in args.objectives.split(","):
        samplers = RUNS[objective]
        workdir = tempfile.mkdtemp()
        t = time.time()
        summary = train_and_evaluate(config_for(objective, args.steps), workdir)
        trainer = Trainer(config_for(objective, args.steps), workdir)
        _, state = trainer.restore_or_init()
        model, spec = trainer.model(state["params"]), trainer.task.spec
        models[objective] = (trainer, state, model)
        print(objective, "trained", f"{time.time() - t:.0f}s", summary["eval_end"], flush=True)
        for sampler in samplers:
            run = {"train_seconds": time.time() - t, "eval_loss_end": summary["eval_end"]["loss"], "steps": {},
                   "guidance_at_32_steps": {}}
            for n in STEPS:
                x = generate(model, spec, jax.random.key(1), (NUM, 8, 8, 1), labels, sampler=sampler, num_steps=n)
                run["steps"][n] = digit_sample_metrics(classifier, x, labels, ref)
            for w in SCALES:
                x = generate(model, spec, jax.random.key(1), (NUM, 8, 8, 1), labels, sampler=sampler, num_steps=32,
                             guidance_scale=w)
                run["guidance_at_32_steps"][w] = digit_sample_metrics(classifier, x, labels, ref)
                if w == 2.0:
                    grids[f"{objective} / {sampler}, 32 steps, w=2"] = grid(x[:100])
            results["runs"][f"{objective}_{sampler}"] = run
            print(objective, sampler, json.dumps(run), flush=True)

    if "flow" not in models:
        return
    # Reflow from the 1-rectified flow.
    trainer, state, model = models["flow"]
    spec = trainer.task.spec
    t = time.time()
    pair_labels = np.arange(4000) % 10
    k = jax.random.key(2024)
    # generate draws its noise from split(key)[0]: reproduce it to store the exact coupling.
    k_noise = jax.random.split(k)[0]
    pairs_x = generate(model, spec, k, (4000, 8, 8, 1), pair_labels, sampler="euler", num_steps=32)
    noise = np.asarray(jax.random.normal(k_noise, (4000, 8, 8, 1)))
    pairs_path = os.path.join(tempfile.mkdtemp(), "pairs.npz")
    np.savez(pairs_path, inputs=pairs_x, noise=noise, labels=pair_labels.astype(np.int32))
    c = config_for("flow", args.reflow_steps)
    c.data.pairs_path = pairs_path
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 5e-4, 20
    reflow = Trainer(c, tempfile.mkdtemp())
    rstate = reflow.init()
    # A copy: the train step donates its state, which must not take the 1-rectified model's buffers with it.
    rstate["params"] = jax.device_put(jax.tree.map(jnp.copy, state["params"]), reflow.state_shardings["params"])
    batches = reflow.task.train_batches(0, 0, 1)
    for _ in range(args.reflow_steps):
        rstate, metrics = reflow.train_step(rstate, reflow.global_batch(next(batches)))
    model2 = reflow.model(rstate["params"])
    results["reflow"] = {"pairs": 4000, "pair_sampler": "euler 32 steps, w=1", "seconds": time.time() - t,
                         "final_train_loss": float(metrics["loss"]), "1-rectified": {}, "2-rectified": {}}
    for n in (1, 2, 4, 8):
        for name, m in (("1-rectified", model), ("2-rectified", model2)):
            x = generate(m, spec, jax.random.key(1), (NUM, 8, 8, 1), labels, sampler="euler", num_steps=n)
            results["reflow"][name][n] = digit_sample_metrics(classifier, x, labels, ref)
            if n == 1:
                grids[f"{name} flow, 1 Euler step, w=1"] = grid(x[:100])
    print("reflow", json.dumps(results["reflow"]), flush=True)
    results["total_seconds"] = time.time() - start
    with open(os.path.join(args.out, "digits_results.json"), "w") as f:
        json.dump(results, f, indent=2)

    fig, axes = plt.subplots(1, len(grids), figsize=(3 * len(grids), 3.4))
    for ax, (title, g) in zip(axes, grids.items()):
        ax.imshow(g, cmap="gray_r", vmin=-1, vmax=1), ax.set_title(title, fontsize=7), ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "digits_samples.png"), dpi=120)


if __name__ == "__main__":
    main()
