"""Experiment: float32, bfloat16 and float16 with dynamic loss scaling train the LM to the same loss; an injected
overflow is skipped and recovered from.

    python -m experiments.precision [--steps 600] [--inject_at 300] [--out experiments/results/precision]

Three runs of experiments/configs/lm_tiny.py (the same data, initialisation and schedule), differing only in
config.model.dtype (the compute dtype; parameters and AdamW state stay float32) and config.precision:
  float32   no loss scaling;
  bfloat16  no loss scaling (bfloat16 has float32's exponent range);
  float16   precision.loss_scale="dynamic" (init 2^15, growth_interval 100 so that the trace shows growth).
At step --inject_at the float16 run's scale is set to 2^30 (the injected overflow: the scaled gradients exceed
float16's 65504), so the step's update must be skipped and the scale halved until the gradients are finite
again (`jaxmodels.train.loss_scaling`). The runs drive the library's Trainer and its compiled train step
directly, step by step, on the task's batches. Records per run: the train loss of every step, the loss
scale and the skipped steps (float16), the final eval bits/byte, the median step time and the train step's
memory from XLA. Writes OUT/results.json, OUT/results.md and OUT/precision.png (loss curves and the scale trace).
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from experiments.configs import lm_tiny
from jaxmodels.train.loop import Trainer

CASES = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"), "float16": ("float16", "dynamic")}
INJECTED_SCALE = 2.0**30


def case_config(name: str, steps: int):
    dtype, loss_scale = CASES[name]
    c = lm_tiny.get_config()
    c.model.dtype = dtype
    c.precision.update(loss_scale=loss_scale, growth_interval=100)
    c.train.num_steps = steps
    c.train.trackers = ()
    return c


def run_case(name: str, steps: int, inject_at: int) -> dict:
    """Train one case for `steps` steps; the float16 run gets the injected overflow at step `inject_at`."""
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(case_config(name, steps), workdir)
        memory = trainer.compile_train_step()
        state = trainer.init()
        batches = trainer.task.train_batches(0, 0, 1)
        losses, scales, skipped, times = [], [], [], []
        for step in range(steps):
            if step == inject_at and "loss_scale" in state:
                state["loss_scale"] = state["loss_scale"]._replace(scale=jax.numpy.float32(INJECTED_SCALE))
            batch = trainer.global_batch(next(batches))
            start = time.perf_counter()
            state, metrics = trainer.train_step(state, batch)
            metrics = jax.device_get(metrics)
            times.append(time.perf_counter() - start)
            losses.append(float(metrics["loss"]))
            if "loss_scale" in metrics:
                scales.append(float(metrics["loss_scale"]))
            if int(metrics["nonfinite"]):
                skipped.append(step)
        evaluation = trainer.evaluate(trainer.model_params(state), trainer.task.eval_batches())
    return {"name": name, "dtype": CASES[name][0], "loss_scale": CASES[name][1], "losses": losses,
            "scales": scales, "skipped_steps": skipped, "eval": evaluation,
            "median_step_s": statistics.median(times[10:]), "memory_gib": memory}


def recovery(result: dict, inject_at: int) -> dict:
    """The skipped steps after the injection and the scale the run settled at (float16 only)."""
    after = [s for s in result["skipped_steps"] if s >= inject_at]
    settled = result["scales"][after[-1] + 1] if after and after[-1] + 1 < len(result["scales"]) else None
    return {"skipped_after_injection": len(after), "last_skipped_step": after[-1] if after else None,
            "scale_after_recovery": settled}


def plot(results: list[dict], inject_at: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_scale) = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in results:
        smooth = np.convolve(r["losses"], np.ones(20) / 20, mode="valid")
        ax_loss.plot(np.arange(len(smooth)) + 19, smooth, label=f"{r['name']} (eval {r['eval']['bits_per_byte']:.3f} "
                     "bits/byte)")
    ax_loss.set(xlabel="step", ylabel="train loss (nats/byte, 20-step mean)", title="lm_tiny: loss by compute dtype")
    ax_loss.legend()
    f16 = next(r for r in results if r["scales"])
    ax_scale.semilogy(f16["scales"], base=2, label="loss scale S")
    ax_scale.scatter(f16["skipped_steps"], [f16["scales"][s] for s in f16["skipped_steps"]], color="red", s=12,
                     zorder=3, label="skipped (non-finite) steps")
    ax_scale.axvline(inject_at, color="grey", linestyle=":", label=f"S set to 2^30 at step {inject_at}")
    ax_scale.set(xlabel="step", ylabel="S", title="float16: dynamic loss scale")
    ax_scale.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: list[dict], inject_at: int) -> str:
    lines = ["| compute dtype | loss scaling | eval bits/byte | final train loss (mean of last 50) | skipped steps | "
             "median step (ms) | train-step temporaries (MiB) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['dtype']} | {r['loss_scale']} | {r['eval']['bits_per_byte']:.4f} | "
                     f"{np.mean(r['losses'][-50:]):.4f} | {len(r['skipped_steps'])} | {1e3 * r['median_step_s']:.2f} | "
                     f"{r['memory_gib']['temporaries_gib'] * 2**10:.1f} |")
    f16 = next(r for r in results if r["scales"])
    rec = recovery(f16, inject_at)
    lines += ["", f"float16: the scale started at 2^15; skipped before the injection: "
              f"{sum(s < inject_at for s in f16['skipped_steps'])} steps; after S = 2^30 at step {inject_at}: "
              f"{rec['skipped_after_injection']} skipped steps, none after step {rec['last_skipped_step']}, where S "
              f"settled at 2^{np.log2(rec['scale_after_recovery']):.0f}." if rec["scale_after_recovery"] else ""]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--inject_at", type=int, default=300)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--out", default=os.path.join("experiments", "results", "precision"))
    args = p.parse_args()
    if not 0 <= args.inject_at < args.steps:
        raise SystemExit(f"--inject_at must be in [0, --steps={args.steps}), got {args.inject_at}")
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name in args.cases.split(","):
        results.append(run_case(name, args.steps, args.inject_at))
        r = results[-1]
        print(f"{name}: eval {r['eval']['bits_per_byte']:.4f} bits/byte, {len(r['skipped_steps'])} skipped steps, "
              f"{1e3 * r['median_step_s']:.2f} ms/step", flush=True)
    device = jax.devices()[0]
    meta = {"device": f"{device.platform}:{device.device_kind}", "steps": args.steps, "inject_at": args.inject_at,
            "injected_scale": INJECTED_SCALE}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f)
    text = f"# float32 vs bfloat16 vs float16 + dynamic loss scaling ({meta['device']}, {args.steps} steps)\n\n"
    text += table(results, args.inject_at) if any(r["scales"] for r in results) else ""
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    if any(r["scales"] for r in results):
        plot(results, args.inject_at, os.path.join(args.out, "precision.png"))
    print(text)


if __name__ == "__main__":
    main()
