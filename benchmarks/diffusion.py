"""Train-step throughput and MFU of DiT (Peebles & Xie 2023) on 32x32x4 latents through the library's Trainer.

    python -m benchmarks.diffusion [--sizes S2,B2] [--batch 256] [--steps 20] [--out benchmarks/results/diffusion.json]
    python -m benchmarks.diffusion --smoke     # seconds on a CPU: a tiny DiT, 3 steps

For each size: experiments/configs/diffusion_digits.py turned into the paper's latent setting — task
"diffusion" with data "synthetic_latents" (standard-normal 32x32x4 latents, the shape of a 256x256 image
under SD's VAE, random labels of 1000 classes + the null label, label dropout 0.1), objective DDPM (eps,
T = 1000; DiT's), model "dit" (DiT-S/2: 384 x 12, 6 heads; DiT-B/2: 768 x 12, 12 heads; patch 2: 256
tokens), bf16 compute with float32 parameters and AdamW state — built by `jaxmodels.train.loop.Trainer`,
i.e. the jit-sharded train step every experiment uses. Runs warm-up steps, then times `--steps` steps,
each synchronised with block_until_ready, on batches already on the device. Reports the median step time,
images/s and MFU = 3 x `dit_flops_per_example` (forward + backward, attention over the full score
matrix, elementwise work not counted) x images/s against 989 TFLOP/s (H100/H200 dense bf16 datasheet
peak; `--peak-flops` overrides). Writes JSON.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import ml_collections

from experiments.configs import diffusion_digits
from jaxmodels.models.dit import dit_flops_per_example, dit_parameter_count
from jaxmodels.train.loop import Trainer

SIZES = {"S2": dict(hidden_dim=384, depth=12, num_heads=6), "B2": dict(hidden_dim=768, depth=12, num_heads=12),
         "smoke": dict(hidden_dim=64, depth=1, num_heads=2)}
PEAK_FLOPS = 989e12


def dit_config(size: str, batch: int, dtype: str) -> ml_collections.ConfigDict:
    """The benchmark's experiment config for DiT-`size` at `batch` 32x32x4 latents."""
    c = diffusion_digits.get_config()
    c.model = ml_collections.ConfigDict(dict(
        name="dit", input_size=32, patch_size=2, in_channels=4, mlp_ratio=4.0, num_classes=1000, position="sincos",
        learn_sigma=False, frequency_dim=256, dtype=dtype, param_dtype="float32", **SIZES[size]))
    c.data.name, c.data.global_batch_size = "synthetic_latents", batch
    c.diffusion.objective, c.diffusion.prediction, c.sample.sampler = "ddpm", "eps", "ddim"
    c.train.num_steps, c.train.checkpoint_every, c.optimizer.warmup_steps = 10**6, 10**6, 10
    return c


def bench(size: str, batch: int, steps: int, warmup: int, dtype: str, peak: float) -> dict:
    config = dit_config(size, batch, dtype)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir)
        t = time.perf_counter()
        memory = trainer.compile_train_step()
        compile_s = time.perf_counter() - t
        state = trainer.init()
        source = trainer.task.train_batches(0, 0, 1)
        batches = [trainer.global_batch(next(source)) for _ in range(4)]
        for i in range(warmup):
            state, metrics = trainer.train_step(state, batches[i % 4])
        jax.block_until_ready((state, metrics))
        times = []
        for i in range(steps):
            t = time.perf_counter()
            state, metrics = trainer.train_step(state, batches[i % 4])
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t)
        loss = float(metrics["loss"])
    m = config.model
    flops = 3 * dit_flops_per_example(input_size=32, patch_size=2, in_channels=4, hidden_dim=m.hidden_dim,
                                      depth=m.depth, mlp_ratio=m.mlp_ratio, frequency_dim=m.frequency_dim)
    step = statistics.median(times)
    return {"size": f"DiT-{size}" if size != "smoke" else "smoke", "batch": batch, "dtype": dtype,
            "parameters": dit_parameter_count(input_size=32, patch_size=2, in_channels=4, hidden_dim=m.hidden_dim,
                                              depth=m.depth, mlp_ratio=m.mlp_ratio, num_classes=1000),
            "train_flops_per_image": flops, "median_step_s": step, "min_step_s": min(times),
            "images_per_s": batch / step, "achieved_tflops": flops * batch / step / 1e12,
            "mfu": flops * batch / step / peak, "peak_flops": peak, "compile_s": compile_s, "final_loss": loss,
            "memory_gib": memory, "device": jax.devices()[0].device_kind, "num_devices": jax.device_count()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="S2,B2")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--peak-flops", type=float, default=PEAK_FLOPS)
    parser.add_argument("--out", default="benchmarks/results/diffusion.json")
    parser.add_argument("--smoke", action="store_true", help="tiny DiT, batch 2, 3 steps (CPU)")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.batch, args.steps, args.warmup, args.dtype = "smoke", 2, 3, 1, "float32"
    results = []
    print(f"{'model':>8} {'batch':>5} {'step ms':>9} {'images/s':>10} {'TFLOP/s':>8} {'MFU':>6}")
    for size in args.sizes.split(","):
        r = bench(size, args.batch, args.steps, args.warmup, args.dtype, args.peak_flops)
        results.append(r)
        print(f"{r['size']:>8} {r['batch']:>5} {r['median_step_s'] * 1e3:>9.2f} {r['images_per_s']:>10.1f} "
              f"{r['achieved_tflops']:>8.1f} {r['mfu']:>6.1%}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "DiT train step, 32x32x4 latents, library Trainer", "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
