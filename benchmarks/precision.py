"""Train-step time and memory of the decoder LM in float32, bfloat16 and float16 (with and without dynamic loss
scaling): what mixed precision buys, and what loss scaling costs.

    python -m benchmarks.precision [--size 125m] [--steps 20] [--seq_len 1024] [--out benchmarks/results/precision.json]
    python -m benchmarks.precision --small    # CPU smoke: 2 layers, embed_dim 64, seq 64, batch 8, 5 steps,
                                              # written to benchmarks/results/precision_small.json

Each case builds the library's Trainer from experiments/configs/lm_tiny.py with the size's shape
(`benchmarks.lm_step.SIZES`), float32 parameters and AdamW state, and model.dtype (compute) of the case:
  float32            the baseline;
  bfloat16           bf16 compute, no loss scaling (float32's exponent range);
  float16            fp16 compute with precision.loss_scale="dynamic" (scaled loss, unscaled gradients, the
                     non-finite guard and the scale's update: `jaxmodels.train.loss_scaling`);
  float16_unscaled   fp16 compute without loss scaling: the difference to "float16" is loss scaling's cost.
It compiles the train step ahead of time (per-device memory from XLA's memory analysis: arguments, temporaries,
peak where the backend reports it), then times `--steps` steps (median, each synchronised with
block_until_ready, after 2 warm-up steps) on fixed random byte batches. Reports the step time, its ratio to
float32's, tokens/s, model TFLOP/s (`DecoderLM.train_flops_per_token`: 6N + causal attention at half the score
matrix) and that against a matmul ceiling measured in the same dtype. float32 matmuls use JAX's default precision
(TF32 on NVIDIA GPUs since Ampere), as the library's float32 runs do.
"""

import argparse
import json
import os
import tempfile

import jax
import numpy as np

from benchmarks.lm_step import SIZES
from benchmarks.timing import median_time
from experiments.configs import lm_tiny
from jaxmodels.train.loop import Trainer

CASES = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"), "float16": ("float16", "dynamic"),
         "float16_unscaled": ("float16", "none")}
SMALL = dict(num_layers=2, embed_dim=64, num_heads=2, num_kv_heads=2, head_dim=32, mlp_dim=192, batch=8, remat="none")


def matmul_ceiling(dtype: str, n: int) -> float:
    """Measured FLOP/s of an (n, n) @ (n, n) matmul in `dtype` on one device (random operands)."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), dtype) for i in range(2))
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n**3 / median_time(lambda: f(a, b), warmup=3, iters=10)


def bench(case: str, shape: dict, seq_len: int, steps: int, prng_impl: str) -> dict:
    dtype, loss_scale = CASES[case]
    spec = dict(shape)
    batch = spec.pop("batch")
    config = lm_tiny.get_config()
    config.model.update(spec, dtype=dtype, param_dtype="float32")
    config.data.update(seq_len=seq_len, global_batch_size=batch)
    config.train.update(num_steps=10_000, prng_impl=prng_impl)
    config.precision.loss_scale = loss_scale
    trainer = Trainer(config, tempfile.mkdtemp())
    state = trainer.init()
    memory = trainer.compile_train_step()
    rng = np.random.default_rng(0)
    batches = [trainer.global_batch({"tokens": rng.integers(0, 256, (batch, seq_len + 1), dtype=np.int32),
                                     "segment_ids": np.ones((batch, seq_len + 1), np.int32)}) for _ in range(4)]
    holder = {"state": state, "i": 0, "nonfinite": 0}

    def one_step():
        holder["state"], metrics = trainer.train_step(holder["state"], batches[holder["i"] % 4])
        holder["i"] += 1
        holder["nonfinite"] += metrics["nonfinite"]
        return metrics["loss"]

    step_time = median_time(one_step, warmup=2, iters=steps)
    params = sum(x.size for x in jax.tree.leaves(holder["state"]["params"]))
    result = {"case": case, "dtype": dtype, "loss_scale": loss_scale, "params": int(params), "seq_len": seq_len,
              "global_batch": batch, "step_time_s": step_time, "tokens_per_s": batch * seq_len / step_time,
              "model_tflops_per_s": trainer.flops_per_example * batch / step_time / 1e12,
              "memory_per_device_gib": memory, "nonfinite_steps": int(holder["nonfinite"]), "steps": holder["i"]}
    if loss_scale != "none":
        result["final_loss_scale"] = float(holder["state"]["loss_scale"].scale)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="125m", choices=[s for s in SIZES if not s.startswith("mamba")])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--small", action="store_true", help="CPU smoke run: a 2-layer d=64 model, seq 64, 5 steps")
    # rbg: the GPU compiles the initialiser ~5x faster than threefry (benchmarks/results/lm_step_notes.md).
    p.add_argument("--prng_impl", default="rbg")
    p.add_argument("--out", default=None, help="default: benchmarks/results/precision.json (precision_small.json with "
                                              "--small)")
    args = p.parse_args()
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   "precision_small.json" if args.small else "precision.json")
    shape, seq_len, steps, n = (SMALL, 64, 5, 512) if args.small else (SIZES[args.size], args.seq_len, args.steps, 8192)
    device = jax.devices()[0]
    ceilings = {d: matmul_ceiling(d, n) for d in sorted({CASES[c][0] for c in args.cases.split(",")})}
    rows = []
    result = {"device": device.device_kind, "jax": jax.__version__, "size": "small" if args.small else args.size,
              "baseline": "the float32 train step of the same model", "measured_matmul_flops": ceilings,
              "results": rows}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    for case in args.cases.split(","):
        r = bench(case, shape, seq_len, steps, args.prng_impl)
        r["fraction_of_matmul_ceiling"] = r["model_tflops_per_s"] * 1e12 / ceilings[r["dtype"]]
        rows.append(r)
        base = next((row for row in rows if row["case"] == "float32"), None)
        for row in rows:
            row["step_time_vs_float32"] = row["step_time_s"] / base["step_time_s"] if base else None
        with open(out, "w") as f:  # after each case, so a cut-off run keeps what it measured
            json.dump(result, f, indent=2)
        print(case, {k: v for k, v in r.items() if k != "memory_per_device_gib"}, flush=True)
    print(f"{device.device_kind}: matmul ceilings " + ", ".join(f"{d} {v / 1e12:.3g} TFLOP/s"
                                                                for d, v in ceilings.items()))
    print(f"{'case':17} {'step ms':>8} {'vs f32':>7} {'tok/s':>10} {'TFLOP/s':>8} {'of mm':>6} {'args MiB':>9} "
          f"{'temp MiB':>9} {'skipped':>7}")
    for r in rows:
        mem = r["memory_per_device_gib"]
        ratio = f"{r['step_time_vs_float32']:7.2f}" if r["step_time_vs_float32"] else f"{'-':>7}"
        print(f"{r['case']:17} {r['step_time_s'] * 1e3:8.2f} {ratio} {r['tokens_per_s']:10.0f} "
              f"{r['model_tflops_per_s']:8.3f} {r['fraction_of_matmul_ceiling']:6.1%} "
              f"{mem['arguments_gib'] * 2**10:9.1f} {mem['temporaries_gib'] * 2**10:9.1f} {r['nonfinite_steps']:7d}")


if __name__ == "__main__":
    main()
