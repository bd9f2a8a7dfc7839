"""Train-step throughput and MFU of the decoder LM (the library's own jitted, sharded step).

    python -m benchmarks.lm_step [--sizes 125m,1b] [--out benchmarks/results/lm_step.json] [--profile DIR]

For each size: builds the Trainer from experiments/configs/lm_tiny.py with the size's overrides
(bf16 compute, float32 params and AdamW state, seq 2048, byte vocabulary), runs warm-up steps,
then times `--steps` steps, each synchronised with block_until_ready, on fresh random token
batches. Reports the median step time, tokens/s, and MFU against (a) the datasheet dense bf16
peak (989 TFLOP/s for H100/H200) and (b) a bf16 matmul ceiling measured in the same run.
With --profile, also traces 3 steps per size with jax.profiler and prints where the device time
goes (kernels grouped into matmul / attention / scatter / other, and the top kernels).
Model FLOPs are counted analytically (jaxmodels.models.lm.train_flops_per_token: 6N + causal
attention at half the score matrix; rematerialisation not counted).
"""

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import median_time
from experiments.configs import lm_mamba, lm_tiny
from jaxmodels.tasks.lm import token_batch
from jaxmodels.train.loop import Trainer
from jaxmodels.train.metrics import device_peak_flops

SIZES = {
    # ~125M (GPT-3 Small shape): 12 x 768, 12 heads of 64, SwiGLU 2048.
    "125m": dict(num_layers=12, embed_dim=768, num_heads=12, num_kv_heads=12, head_dim=64, mlp_dim=2048,
                 batch=32, remat="none"),
    # ~1.0B: 16 x 2048, 16 heads of 128, SwiGLU 5632 (LLaMA-style proportions).
    "1b": dict(num_layers=16, embed_dim=2048, num_heads=16, num_kv_heads=16, head_dim=128, mlp_dim=5632,
               batch=16, remat="save_dots"),
    # Mamba-130m's shape (Gu & Dao 2023, Table 12): 24 layers, d_model 768, d_inner 1536, N 16.
    "mamba130m": dict(num_layers=24, embed_dim=768, d_state=16, expand=2, batch=32, remat=None),
}


def matmul_ceiling(n: int = 8192) -> float:
    """Measured bf16 matmul FLOP/s on one device (random operands, not zeros)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n**3 / median_time(lambda: f(a, b), warmup=3, iters=20)


def kernel_category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("fmha", "flash", "cudnn", "attention")):
        return "attention"
    if any(k in n for k in ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "wgmma")):
        return "matmul"
    if "scatter" in n:
        return "scatter"
    return "other"


def device_time_breakdown(trace_dir: str, num_steps: int, top: int = 15) -> dict:
    """Sums GPU kernel durations per step from a jax.profiler perfetto trace: by category and top kernels.

    Kernels are the 'X' events on '/device:GPU' processes in threads named 'Stream ...'.
    """
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in e["args"]["name"]}
    streams = {(e["pid"], e["tid"]) for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
               and e["pid"] in gpu_pids and "stream" in e["args"]["name"].lower()}
    per_kernel = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and (e["pid"], e.get("tid")) in streams:
            per_kernel[e["name"]] += e["dur"] / 1e3 / num_steps  # ms per step
    per_category = collections.Counter()
    for name, ms in per_kernel.items():
        per_category[kernel_category(name)] += ms
    return {"ms_per_step_by_category": dict(per_category),
            "top_kernels_ms_per_step": per_kernel.most_common(top)}


def bench(size: str, steps: int, seq_len: int, profile_dir: str | None = None, batch: int | None = None) -> dict:
    spec = dict(SIZES[size])
    default_batch, remat = spec.pop("batch"), spec.pop("remat")
    batch = batch or default_batch
    config = (lm_mamba if size.startswith("mamba") else lm_tiny).get_config()
    if remat is not None:
        spec["remat"] = remat
    config.model.update(spec, dtype="bfloat16", param_dtype="float32")
    config.data.update(seq_len=seq_len, global_batch_size=batch)
    config.train.num_steps = 10_000
    trainer = Trainer(config, tempfile.mkdtemp())
    t = time.perf_counter()
    compiled_init = trainer.init.lower().compile()
    init_compile_s = time.perf_counter() - t
    t = time.perf_counter()
    state = jax.block_until_ready(compiled_init())
    init_run_s = time.perf_counter() - t
    print(f"{size}: init compile {init_compile_s:.1f} s, run {init_run_s:.1f} s", flush=True)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    rng = np.random.default_rng(0)
    batches = [trainer.global_batch(token_batch(rng.integers(0, 256, (batch, seq_len + 1)))) for _ in range(4)]
    holder = {"state": state, "i": 0}

    def one_step():
        holder["state"], metrics = trainer.train_step(holder["state"], batches[holder["i"] % 4])
        holder["i"] += 1
        return metrics["loss"]

    t = time.perf_counter()
    jax.block_until_ready(one_step())
    first_step_s = time.perf_counter() - t  # compile + one step
    step_time = median_time(one_step, warmup=2, iters=steps)
    flops = trainer.flops_per_example * batch
    profile = None
    if profile_dir:
        trace_dir = os.path.join(profile_dir, size)
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(3):
                jax.block_until_ready(one_step())
        profile = device_time_breakdown(trace_dir, 3)
        print(f"{size}: device ms/step by category", {k: round(v, 1) for k, v in
                                                      profile["ms_per_step_by_category"].items()})
        for name, ms in profile["top_kernels_ms_per_step"]:
            print(f"  {ms:8.2f} ms  {name[:110]}")
    return {"init_compile_s": init_compile_s, "init_run_s": init_run_s,
            "prng_impl": str(jax.config.jax_default_prng_impl), "first_step_s": first_step_s, "profile": profile,
            "case": size, "params": n_params, "seq_len": seq_len, "global_batch": batch, "remat": remat,
            "step_time_s": step_time, "tokens_per_s": batch * seq_len / step_time,
            "model_tflops_per_s": flops / step_time / 1e12}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="125m,1b")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the size's)")
    p.add_argument("--profile", default=None, help="directory for jax.profiler traces (off by default)")
    p.add_argument("--prng_impl", default=None, help="jax_default_prng_impl for this run (threefry2x32, rbg)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "lm_step.json"))
    args = p.parse_args()
    if args.prng_impl:
        jax.config.update("jax_default_prng_impl", args.prng_impl)
    device = jax.devices()[0]
    peak = device_peak_flops(device.device_kind)
    ceiling = matmul_ceiling()
    rows = []
    result = {"device": device.device_kind, "jax": jax.__version__, "peak_flops": peak,
              "measured_bf16_matmul_flops": ceiling, "baseline": "device bf16 dense peak and measured matmul",
              "results": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    for size in args.sizes.split(","):
        r = bench(size, args.steps, args.seq_len, args.profile, args.batch)
        r["mfu_vs_peak"] = r["model_tflops_per_s"] * 1e12 / peak if peak else None
        r["mfu_vs_measured_matmul"] = r["model_tflops_per_s"] * 1e12 / ceiling
        rows.append(r)
        with open(args.out, "w") as f:  # after each size, so a cut-off run keeps what it measured
            json.dump(result, f, indent=2)
        print(r["case"], {k: v for k, v in r.items() if k != "profile"}, flush=True)
    print(f"{device.device_kind}: measured bf16 matmul {ceiling / 1e12:.0f} TFLOP/s, peak "
          f"{(peak or 0) / 1e12:.0f} TFLOP/s")
    print(f"{'case':6} {'params':>8} {'batch':>5} {'step ms':>8} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'vs mm':>6}")
    for r in rows:
        print(f"{r['case']:6} {r['params'] / 1e6:7.0f}M {r['global_batch']:5d} {r['step_time_s'] * 1e3:8.1f} "
              f"{r['tokens_per_s']:10.0f} {r['model_tflops_per_s']:8.1f} {r['mfu_vs_peak'] or 0:6.1%} "
              f"{r['mfu_vs_measured_matmul']:6.1%}")


if __name__ == "__main__":
    main()
