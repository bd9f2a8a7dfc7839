"""Mamba's selective scan on the GPU: associative scan vs sequential lax.scan vs chunked vs the fused kernel vs
the SSD chunked form of Mamba-2.

    python -m benchmarks.ssm [--lengths 2048,4096,8192,16384] [--out benchmarks/results/ssm_scan.json] [--small]
    python -m benchmarks.ssm --implementations associative,fused,ssd_q8,ssd,ssd_q32,ssd_q64 \
        --backward associative,fused,ssd_q8,ssd --out benchmarks/results/ssm_scan_ssd.json

Mamba-130m-like sizes (Gu & Dao 2023): d_inner 1536, N 16, batch 8, bf16 u/delta/z/B/C, float32 A, D,
delta_bias, softplus on; the scan computes in float32. For each length and implementation: median time
of the forward and of forward+backward (jitted, synchronised, after warm-up), the temporary device memory
XLA reserves for the compiled program (`memory_analysis().temp_size_in_bytes`), and, for the forward,
the achieved bandwidth on the bytes any implementation must move (u, delta, z read and y written once,
B and C read once) against the measured device-to-device copy bandwidth. The baseline of the speed-up
column is the associative scan (`jaxmodels.ops.scan.selective_scan`).

"ssd" is `selective_scan(..., implementation="ssd")` (Dao & Gu 2024, §6) with its default chunk length
(`scan.SSD_CHUNK`), ssd_q{Q} the same with chunks of Q positions. It needs A scalar per channel, so when a
case of it is listed every implementation gets A of shape (d_inner, 1) (broadcast over N; the fused kernel is
handed it broadcast), the same scan for all, and the JSON records A's shape.
"""

import argparse
import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import median_time
from jaxmodels.ops.kernels.fused_scan import fused_selective_scan
from jaxmodels.ops.scan import selective_scan, selective_scan_init_state, selective_scan_step


def sequential_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The recurrent form over time with lax.scan (one selective_scan_step per position)."""
    def step(state, xs):
        u_t, delta_t, B_t, C_t, z_t = xs
        y, state = selective_scan_step(state, u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias, delta_softplus)
        return state, y

    state = selective_scan_init_state(u.shape[0], u.shape[2], B.shape[-1])
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (u, delta, B, C, z))
    _, y = jax.lax.scan(step, state, xs)
    return jnp.moveaxis(y, 0, 1)


IMPLEMENTATIONS = {
    "associative": selective_scan,
    "sequential": sequential_scan,
    "chunked_256": lambda *a, **k: selective_scan(*a, **k, chunk_size=256),
    "fused": fused_selective_scan,  # the kernel's default options
    "ssd": functools.partial(selective_scan, implementation="ssd"),  # chunks of scan.SSD_CHUNK positions
}
FUSED_VARIANT = re.compile(r"fused_d(\d+)_w(\d+)_u(\d+)")  # channels per program, warps, steps per iteration
SSD_VARIANT = re.compile(r"ssd_q(\d+)")  # positions per chunk


def _full_a(fused):
    """The fused kernel (which takes A (d_inner, N)) for A of shape (d_inner, 1) too, broadcast over N."""
    def scan(u, delta, A, B, C, *args, **kwargs):
        return fused(u, delta, jnp.broadcast_to(A, (A.shape[0], B.shape[-1])), B, C, *args, **kwargs)
    return scan


def implementation(name):
    """The scan function for a name: a key of IMPLEMENTATIONS, fused_d{block_d}_w{num_warps}_u{unroll} or
    ssd_q{chunk}."""
    variant = FUSED_VARIANT.fullmatch(name)
    if variant:
        block_d, num_warps, unroll = map(int, variant.groups())
        return _full_a(functools.partial(fused_selective_scan, block_d=block_d, num_warps=num_warps, unroll=unroll))
    variant = SSD_VARIANT.fullmatch(name)
    if variant:
        return functools.partial(selective_scan, implementation="ssd", chunk_size=int(variant.group(1)))
    if name not in IMPLEMENTATIONS:
        raise SystemExit(f"unknown implementation {name!r}: one of {list(IMPLEMENTATIONS)}, fused_d8_w1_u4 or "
                         "ssd_q64 etc.")
    return _full_a(IMPLEMENTATIONS[name]) if name == "fused" else IMPLEMENTATIONS[name]


def copy_bandwidth(n_bytes=2 ** 30):
    x = jax.random.normal(jax.random.key(1), (n_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda x: x * 1.0001)
    return 2 * n_bytes / median_time(copy, x, iters=20)


def inputs(batch, length, d_inner, n_state, seed=0, scalar_a=False):
    """The benchmark's inputs; with `scalar_a`, A of shape (d_inner, 1) (one scalar per channel)."""
    k = jax.random.split(jax.random.key(seed), 7)
    bf16 = jnp.bfloat16
    return dict(
        u=jax.random.normal(k[0], (batch, length, d_inner), bf16),
        delta=(jax.random.normal(k[1], (batch, length, d_inner)) * 0.5 - 3.0).astype(bf16),
        A=-jnp.exp(jax.random.normal(k[2], (d_inner, 1 if scalar_a else n_state)) * 0.5),
        B=jax.random.normal(k[3], (batch, length, n_state), bf16),
        C=jax.random.normal(k[4], (batch, length, n_state), bf16),
        D=jax.random.normal(k[5], (d_inner,)),
        z=jax.random.normal(k[6], (batch, length, d_inner), bf16),
        delta_bias=jnp.full((d_inner,), -1.0),
    )


def bench_case(name, fn, args, iters, backward):
    keys = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    flat = tuple(args[k] for k in keys)
    fwd = jax.jit(lambda *a: fn(*a, delta_softplus=True))
    diff = (0, 1, 2, 3, 4, 5, 6)

    def loss(*a):
        return jnp.sum(fn(*a, delta_softplus=True).astype(jnp.float32) ** 2)

    fwd_bwd = jax.jit(jax.grad(loss, argnums=diff))
    row, grads = {"implementation": name}, None
    for label, f in (("fwd", fwd), ("fwd_bwd", fwd_bwd))[:2 if backward else 1]:
        try:
            compiled = f.lower(*flat).compile()
            mem = compiled.memory_analysis()
            row[f"{label}_temp_bytes"] = getattr(mem, "temp_size_in_bytes", None)
            row[f"{label}_s"] = median_time(compiled, *flat, iters=iters)
            if label == "fwd_bwd":
                grads = [np.asarray(g, np.float32) for g in compiled(*flat)]
        except Exception as e:  # out of memory at long lengths is a result, not a crash
            row[f"{label}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row, grads


def rel_err(x, reference):
    return float(np.linalg.norm(x - reference) / np.linalg.norm(reference))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="2048,4096,8192,16384")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--d_inner", type=int, default=1536)
    p.add_argument("--n_state", type=int, default=16)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
    p.add_argument("--backward", default="associative,fused",
                   help="implementations whose forward+backward is timed too")
    p.add_argument("--small", "--smoke", dest="small", action="store_true",
                   help="tiny sizes on any backend (checks the script runs)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ssm_scan.json"))
    args = p.parse_args(argv)
    if args.small:
        args.lengths, args.batch, args.d_inner, args.n_state, args.iters = "32", 1, 64, 4, 2
    names = args.implementations.split(",")
    for name in names:
        implementation(name)  # unknown names stop the run before anything is measured
    scalar_a = any(name == "ssd" or SSD_VARIANT.fullmatch(name) for name in names)
    device = jax.devices()[0]
    bandwidth = copy_bandwidth() if not args.small else None
    result = {"device": device.device_kind, "jax": jax.__version__, "baseline": "associative",
              "measured_copy_bytes_per_s": bandwidth, "batch": args.batch, "d_inner": args.d_inner,
              "n_state": args.n_state, "A_shape": [args.d_inner, 1 if scalar_a else args.n_state],
              "dtype": "bfloat16 inputs, float32 scan", "small": args.small, "results": []}
    for length in (int(x) for x in args.lengths.split(",")):
        data = inputs(args.batch, length, args.d_inner, args.n_state, scalar_a=scalar_a)
        reference = grads_reference = None
        must_move = 2 * (4 * args.batch * length * args.d_inner + 2 * args.batch * length * args.n_state)
        for name in names:
            fn = implementation(name)
            row, grads = bench_case(name, fn, data, args.iters, name in args.backward.split(","))
            row.update(length=length, must_move_bytes=must_move)
            y = jax.jit(lambda *a, fn=fn: fn(*a, delta_softplus=True))(
                *(data[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")))
            y = np.asarray(y, np.float32)
            if reference is None:
                reference = y
            row["rel_err_vs_first"] = rel_err(y, reference)
            if grads is not None:  # gradients of u, delta, A, B, C, D, z against the first timed backward
                grads_reference = grads_reference or grads
                row["grad_rel_err_vs_first"] = [rel_err(g, r) for g, r in zip(grads, grads_reference)]
            if "fwd_s" in row and bandwidth:
                row["fwd_bandwidth_fraction"] = must_move / row["fwd_s"] / bandwidth
            result["results"].append(row)
            print({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            with open(args.out, "w") as f:  # after each case, so a cut-off run keeps what it measured
                json.dump(result, f, indent=2)
    base = {r["length"]: r for r in result["results"] if r["implementation"] == "associative"}
    print(f"{device.device_kind}; copy bandwidth {(bandwidth or 0) / 1e12:.2f} TB/s")
    print(f"{'L':>6} {'impl':14} {'fwd ms':>8} {'x assoc':>7} {'BW':>5} {'fwd+bwd ms':>10} {'x assoc':>7} "
          f"{'temp GB fwd':>11}")
    for r in result["results"]:
        b = base.get(r["length"], {})
        speed = (b.get("fwd_s", float("nan")) / r["fwd_s"]) if "fwd_s" in r else float("nan")
        speed_b = (b.get("fwd_bwd_s", float("nan")) / r["fwd_bwd_s"]) if "fwd_bwd_s" in r else float("nan")
        print(f"{r['length']:6d} {r['implementation']:14} {r.get('fwd_s', float('nan')) * 1e3:8.2f} {speed:7.1f} "
              f"{r.get('fwd_bandwidth_fraction', float('nan')):5.0%} {r.get('fwd_bwd_s', float('nan')) * 1e3:10.2f} "
              f"{speed_b:7.1f} {(r.get('fwd_temp_bytes') or 0) / 1e9:11.2f}")
    return result


if __name__ == "__main__":
    main()
