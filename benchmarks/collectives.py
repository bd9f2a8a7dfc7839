"""All-reduce bus bandwidth (our ring vs lax.psum) and data-parallel scaling of the LM train step.

    python -m benchmarks.collectives [--sizes_mb 1,4,16,64,256,1024] [--size 125m] [--per_device_batch 8]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python -m benchmarks.collectives --smoke

Needs 2+ devices (all local GPUs of one host; --smoke: fake CPU devices, tiny sizes, results
written to a temporary file unless --out is given; it checks that the code runs, its timings
mean nothing).

1. All-reduce over all N devices of a float32 buffer of S bytes per device, from 1 MB to 1 GB:
   `jaxmodels.ops.collectives.ring_all_reduce` (reduce-scatter + all-gather from ppermute; one
   ring, and the bidirectional variant) against the baseline `lax.psum` (XLA's all-reduce, NCCL
   on GPU). Bandwidths as nccl-tests defines them (nccl-tests/doc/PERFORMANCE.md):
   algbw = S / t, busbw = algbw * 2(n - 1) / n, the latter comparable with the link's peak.
   t is the median of --iters device-synchronised calls after warm-up. The ring result is
   checked against psum's.
2. Data-parallel weak scaling of the LM train step (`jaxmodels.train.loop.Trainer`, size from
   benchmarks/lm_step.py SIZES, bf16 compute): for n = 1, 2, 4, ..., N devices and each strategy
   (replicated; zero with ring and with xla collectives; fsdp with mesh data=1, fsdp=n) a fixed
   --per_device_batch. Reports tokens/s, scaling efficiency = tokens/s(n) / (n * tokens/s of the
   same case on 1 device), and per-device memory: parameters and optimiser state as stored, and
   XLA's memory analysis (arguments, temporaries, peak).
"""

import argparse
import functools
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.lm_step import SIZES
from benchmarks.timing import median_time
from experiments.configs import lm_tiny
from jaxmodels.ops.collectives import ring_all_reduce
from jaxmodels.tasks.lm import token_batch
from jaxmodels.train.loop import Trainer

ALL_REDUCES = {
    "psum": lax.psum,  # the baseline
    "ring": ring_all_reduce,
    "ring_bidirectional": functools.partial(ring_all_reduce, bidirectional=True),
}
# (strategy, parallel.collectives); the collectives matter for zero only.
CASES = [("replicated", "ring"), ("zero", "ring"), ("zero", "xla"), ("fsdp", "ring")]
SMOKE_MODEL = dict(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64, remat="none")


def bus_bandwidth(size_bytes: float, seconds: float, n: int) -> tuple[float, float]:
    """(algbw, busbw) in bytes/s of an all-reduce of size_bytes per device on n devices (nccl-tests)."""
    algbw = size_bytes / seconds
    return algbw, algbw * 2 * (n - 1) / n


def bench_all_reduce(size_bytes: int, iters: int) -> list[dict]:
    """Time every ALL_REDUCES entry on a float32 buffer of size_bytes per device over all devices."""
    devices = jax.devices()
    n = len(devices)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("x",))
    elems = size_bytes // 4
    x = jax.device_put(jax.random.normal(jax.random.key(0), (n * elems,), jnp.float32), NamedSharding(mesh, P("x")))
    rows, reference = [], None
    for name, fn in ALL_REDUCES.items():
        f = jax.jit(jax.shard_map(functools.partial(fn, axis_name="x"), mesh=mesh, in_specs=P("x"), out_specs=P("x"),
                                  check_vma=False))
        out = jax.block_until_ready(f(x))
        reference = out if reference is None else reference
        seconds = median_time(lambda: f(x), warmup=3, iters=iters)  # noqa: B023
        algbw, busbw = bus_bandwidth(size_bytes, seconds, n)
        rows.append({"case": name, "bytes_per_device": size_bytes, "devices": n, "time_s": seconds,
                     "algbw_GBps": algbw / 1e9, "busbw_GBps": busbw / 1e9,
                     "max_abs_diff_vs_psum": float(jnp.max(jnp.abs(out - reference)))})
        del out
    return rows


def bench_train_step(strategy: str, collectives: str, n: int, model: dict, per_device_batch: int, seq_len: int,
                     dtype: str, iters: int) -> dict:
    """Median step time, tokens/s and per-device memory of the LM train step on the first n devices."""
    config = lm_tiny.get_config()
    config.model.update(model, dtype=dtype, param_dtype="float32")
    config.data.update(seq_len=seq_len, global_batch_size=per_device_batch * n)
    config.train.num_steps = 10_000
    config.mesh = dict(data=1, fsdp=-1, tensor=1) if strategy == "fsdp" else dict(data=-1, fsdp=1, tensor=1)
    config.parallel.update(strategy=strategy, collectives=collectives)
    trainer = Trainer(config, tempfile.mkdtemp(), jax.devices()[:n])
    memory = trainer.compile_train_step()
    rng = np.random.default_rng(0)
    batches = [trainer.global_batch(token_batch(rng.integers(0, 256, (per_device_batch * n, seq_len + 1))))
               for _ in range(2)]
    holder = {"state": trainer.init(), "i": 0}

    def one_step():
        holder["state"], metrics = trainer.train_step(holder["state"], batches[holder["i"] % 2])
        holder["i"] += 1
        return metrics["loss"]

    seconds = median_time(one_step, warmup=2, iters=iters)
    return {"strategy": strategy, "collectives": collectives, "devices": n, "global_batch": per_device_batch * n,
            "seq_len": seq_len, "step_time_s": seconds, "tokens_per_s": per_device_batch * n * seq_len / seconds,
            "memory_per_device_mib": {k.removesuffix("_gib"): v * 2**10 for k, v in memory.items()}}


def device_counts(total: int) -> list[int]:
    """1, 2, 4, ... up to total, and total itself."""
    counts = [1 << i for i in range(total.bit_length()) if 1 << i <= total]
    return counts + ([total] if counts[-1] != total else [])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for fake CPU devices: checks that it runs")
    p.add_argument("--sizes_mb", default="1,4,16,64,256,1024", help="all-reduce buffer sizes per device, MB")
    p.add_argument("--size", default="125m", choices=sorted(SIZES), help="LM size for the scaling part")
    p.add_argument("--per_device_batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None, help="default: benchmarks/results/collectives.json (--smoke: a temp file)")
    args = p.parse_args()
    n = jax.device_count()
    if n < 2:
        sys.exit(f"needs 2+ devices, found {n}; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=8")
    if args.smoke:
        sizes, model, dtype = [4096, 65536], SMOKE_MODEL, "float32"
        args.per_device_batch, args.seq_len, args.iters = 2, 32, 3
    else:
        sizes, dtype = [int(float(s) * 2**20) for s in args.sizes_mb.split(",")], "bfloat16"
        model = {k: v for k, v in SIZES[args.size].items() if k != "batch"}
    out = args.out or (os.path.join(tempfile.gettempdir(), "collectives_smoke.json") if args.smoke else
                       os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "collectives.json"))
    result = {"device": jax.devices()[0].device_kind, "devices": n, "jax": jax.__version__, "smoke": args.smoke,
              "all_reduce": {"baseline": "lax.psum", "busbw": "algbw * 2(n-1)/n (nccl-tests)", "rows": []},
              "scaling": {"model": model, "dtype": dtype, "per_device_batch": args.per_device_batch, "rows": []}}

    def save():
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:  # after each case, so a cut-off run keeps what it measured
            json.dump(result, f, indent=2)

    print(f"{n} x {result['device']}: all-reduce, float32, busbw = algbw * 2(n-1)/n")
    print(f"{'bytes/device':>13} {'case':>19} {'time us':>10} {'algbw GB/s':>11} {'busbw GB/s':>11} "
          f"{'|ring-psum|':>11}")
    for size in sizes:
        for r in bench_all_reduce(size, args.iters):
            result["all_reduce"]["rows"].append(r)
            print(f"{size:13d} {r['case']:>19} {r['time_s'] * 1e6:10.1f} {r['algbw_GBps']:11.2f} "
                  f"{r['busbw_GBps']:11.2f} {r['max_abs_diff_vs_psum']:11.2e}", flush=True)
        save()

    print(f"\nLM train step, weak scaling, {args.per_device_batch} x {args.seq_len} tokens per device, {dtype} compute")
    print(f"{'strategy':>10} {'coll':>5} {'n':>3} {'step ms':>9} {'tokens/s':>11} {'eff':>6} "
          f"{'params MiB':>11} {'opt MiB':>9} {'args MiB':>9} {'temp MiB':>9}")
    single = {}
    for strategy, collectives in CASES:
        for count in device_counts(n):
            r = bench_train_step(strategy, collectives, count, model, args.per_device_batch, args.seq_len, dtype,
                                 args.iters)
            single.setdefault((strategy, collectives), r["tokens_per_s"])
            r["efficiency"] = r["tokens_per_s"] / (count * single[(strategy, collectives)])
            result["scaling"]["rows"].append(r)
            save()
            m = r["memory_per_device_mib"]
            print(f"{strategy:>10} {collectives if strategy == 'zero' else '-':>5} {count:3d} "
                  f"{r['step_time_s'] * 1e3:9.2f} {r['tokens_per_s']:11.0f} {r['efficiency']:6.1%} "
                  f"{m['params']:11.2f} {m['opt_state']:9.2f} {m['arguments']:9.2f} {m['temporaries']:9.2f}",
                  flush=True)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
