"""Mixture-of-experts layer on the GPU: capacity einsum vs dropless grouped matmul (ragged_dot, Pallas).

    python -m benchmarks.moe [--tokens 16384] [--mlp_dim 2048] [--experts 8,64] [--k 1,2]
                             [--d_model 1024,2048] [--out benchmarks/results/moe.json] [--smoke]

The layer is `jaxmodels.nn.moe.MoEFeedForward` (float32 router, SwiGLU experts of width mlp_dim, bf16
parameters and compute), timed forward + backward (gradients of the parameters and of x through the
output and the weighted Switch/ST-MoE auxiliary losses), jitted, synchronised, median of --iters runs
after 2 warm-up runs, on T = --tokens tokens (8 sequences of T/8). Implementations:
  einsum           dispatch "einsum", capacity factor 1.25 (GShard/Switch dispatch and combine
                   (T, E, C) tensors; cost grows with T * E * C)
  dropless_ragged  dispatch "dropless", `jax.lax.ragged_dot` grouped matmuls (MegaBlocks-style)
  dropless_pallas  dispatch "dropless", implementation "pallas" (skipped, with the reason recorded,
                   where that implementation does not exist or fails)
and the baseline `dense`: one SwiGLU MLP of width k * mlp_dim on all T tokens, the same useful FLOPs
with no routing (what the experts would cost if they were one dense matmul).
Useful TFLOP/s = 3 * `ops.moe.moe_flops_per_token`(d_model, mlp_dim, k) * T / time (forward +
backward = 3x forward; router, gating, capacity padding and dropped slots are not counted). Memory:
the compiled program's `memory_analysis().temp_size_in_bytes`. Writes JSON (after each case, so a
cut-off run keeps what it measured) and prints a table.
"""

import argparse
import itertools
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.timing import median_time
from jaxmodels.nn.layers import MLP
from jaxmodels.nn.moe import MoEFeedForward
from jaxmodels.ops.moe import moe_flops_per_token

IMPLEMENTATIONS = {
    "einsum": dict(dispatch="einsum", capacity_factor=1.25),
    "dropless_ragged": dict(dispatch="dropless", implementation="ragged_dot"),
    "dropless_pallas": dict(dispatch="dropless", implementation="pallas"),
}
AUX_WEIGHTS = {"load_balancing_loss": 1e-2, "router_z_loss": 1e-3}


def build(name: str, d_model: int, mlp_dim: int, num_experts: int, k: int, dtype) -> nnx.Module:
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    if name == "dense":
        return MLP(d_model, k * mlp_dim, kind="swiglu", **kw)
    return MoEFeedForward(d_model, mlp_dim, num_experts, k=k, **IMPLEMENTATIONS[name], **kw)


def fwd_bwd(graphdef):
    """(params, x) -> (grads of params and x, aux of the forward) through sum(y^2) + weighted aux losses."""
    def loss(params, x):
        out = nnx.merge(graphdef, params)(x)
        y, aux = out if isinstance(out, tuple) else (out, {})
        total = jnp.mean(jnp.square(y.astype(jnp.float32)))
        total += sum(w * aux[n] for n, w in AUX_WEIGHTS.items() if n in aux)
        return total, {n: v for n, v in aux.items() if n == "dropped_fraction"}

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


def measure(name, d_model, mlp_dim, num_experts, k, tokens, iters, dtype) -> dict:
    row = {"implementation": name, "d_model": d_model, "mlp_dim": mlp_dim, "num_experts": num_experts, "k": k,
           "tokens": tokens}
    try:
        model = build(name, d_model, mlp_dim, num_experts, k, dtype)
        graphdef, params = nnx.split(model)
        x = jax.random.normal(jax.random.key(1), (8, tokens // 8, d_model), dtype)
        compiled = fwd_bwd(graphdef).lower(params, x).compile()
        row["temp_bytes"] = getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)
        row["fwd_bwd_s"] = median_time(compiled, params, x, iters=iters)
        _, aux = compiled(params, x)
        if "dropped_fraction" in aux:
            row["dropped_fraction"] = float(aux["dropped_fraction"])
    except Exception as e:  # an implementation that does not exist here, or out of memory, is a result
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return row
    useful = 3 * moe_flops_per_token(d_model, mlp_dim, k) * tokens
    row.update(useful_flops=useful, useful_tflops_per_s=useful / row["fwd_bwd_s"] / 1e12,
               tokens_per_s=tokens / row["fwd_bwd_s"])
    return row


def print_table(rows: list[dict]) -> None:
    base = {(r["d_model"], r["num_experts"], r["k"]): r for r in rows if r["implementation"] == "dense"}
    print(f"{'d':>5} {'E':>3} {'k':>2} {'implementation':16} {'ms':>8} {'Mtok/s':>7} {'TFLOP/s':>8} "
          f"{'x dense':>7} {'temp GB':>8} {'dropped':>7}")
    for r in rows:
        key = (r["d_model"], r["num_experts"], r["k"])
        if "error" in r:
            print(f"{key[0]:5d} {key[1]:3d} {key[2]:2d} {r['implementation']:16} skipped: {r['error'][:90]}")
            continue
        ratio = base[key]["fwd_bwd_s"] / r["fwd_bwd_s"] if key in base and "fwd_bwd_s" in base[key] else float("nan")
        print(f"{key[0]:5d} {key[1]:3d} {key[2]:2d} {r['implementation']:16} {r['fwd_bwd_s'] * 1e3:8.2f} "
              f"{r['tokens_per_s'] / 1e6:7.2f} {r['useful_tflops_per_s']:8.1f} {ratio:7.2f} "
              f"{(r['temp_bytes'] or 0) / 1e9:8.2f} {r.get('dropped_fraction', 0.0):7.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--mlp_dim", type=int, default=2048)
    p.add_argument("--experts", default="8,64")
    p.add_argument("--k", default="1,2")
    p.add_argument("--d_model", default="1024,2048")
    p.add_argument("--implementations", default=",".join(["dense", *IMPLEMENTATIONS]))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny float32 sizes on any backend (checks the script runs)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "moe.json"))
    args = p.parse_args()
    dtype = jnp.bfloat16
    if args.smoke:
        args.tokens, args.mlp_dim, args.experts, args.d_model, args.iters = 256, 64, "4,8", "32", 2
        dtype = jnp.float32
    device = jax.devices()[0]
    result = {"device": device.device_kind, "jax": jax.__version__, "baseline": "dense SwiGLU of width k * mlp_dim",
              "dtype": jnp.dtype(dtype).name, "tokens": args.tokens, "mlp_dim": args.mlp_dim,
              "flops": "useful = 3 * 6 * d_model * mlp_dim * k per token (forward + backward)", "results": []}
    sizes = (map(int, getattr(args, name).split(",")) for name in ("d_model", "experts", "k"))
    for d_model, num_experts, k in itertools.product(*sizes):
        for name in args.implementations.split(","):
            row = measure(name, d_model, args.mlp_dim, num_experts, k, args.tokens, args.iters, dtype)
            result["results"].append(row)
            print({key: (f"{v:.4g}" if isinstance(v, float) else v) for key, v in row.items()}, flush=True)
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
    print(f"{device.device_kind}, {result['dtype']}, T = {args.tokens} tokens, expert width {args.mlp_dim}, "
          "forward + backward")
    print_table(result["results"])


if __name__ == "__main__":
    main()
