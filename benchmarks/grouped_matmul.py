"""Grouped matmul of dropless MoE on the GPU: jax.lax.ragged_dot vs the Pallas kernels vs a dense einsum.

    python -m benchmarks.grouped_matmul [--cases 1024:2048:8,1024:2048:64,2048:2048:8,2048:2048:64]
        [--groups equal,routed] [--configs 128,128,64,4,4;...] [--out benchmarks/results/grouped_matmul.json]
        [--smoke]

One expert matmul of a dropless MoE layer (MegaBlocks, Gale et al. 2022): M = T * k = 16384 * 2 = 32768
token-assignments sorted by expert, x (M, d) times w (E, d, f), bf16 in and out, float32 accumulation.
Each case is d:f:E. Group sizes are "equal" (M / E each) or "routed" (the counts of a top-2 choice
from random router logits: uneven, the load a real layer sees). For each case and implementation: median
time (jitted, synchronised, after warm-up) of the forward and of forward+backward (y, dx and dw from
`jax.vjp`), and the achieved TFLOP/s on the useful FLOPs: 2 M d f forward, 3x that forward+backward.

Implementations: "ragged_dot" (XLA's jax.lax.ragged_dot; the speed-up column's baseline), "pallas_..."
(`jaxmodels.ops.kernels.grouped_matmul.pallas_grouped_matmul` with the `Blocks` of each --configs entry
block_m,block_n,block_k,num_warps,num_stages, dw kernel with the same blocks), "einsum" (a batched
"ecd,edf->ecf" on (E, M / E, d): the dense capacity-form baseline, equal groups only) and "dense" (one
(M, d) x (d, f) matmul with w[0]: the same FLOPs without groups, the device's practical bf16 ceiling). Each row
has rel_err, the relative Frobenius error of y (and of dw when timed) against ragged_dot's.
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import median_time
from jaxmodels.ops.kernels.grouped_matmul import Blocks, pallas_grouped_matmul

DEFAULT_CONFIGS = "128,128,64,4,4;128,128,64,8,3;128,256,64,8,3;64,128,64,4,4;128,128,32,4,4;256,128,64,8,3"


def group_sizes(kind, num_tokens, k, num_experts, seed=0):
    """(E,) int32: "equal" M / E each, or "routed": counts of the top-k of random router logits."""
    if kind == "equal":
        return jnp.full((num_experts,), num_tokens * k // num_experts, jnp.int32)
    logits = jax.random.normal(jax.random.key(seed), (num_tokens, num_experts))
    experts = jax.lax.top_k(logits, k)[1]
    return jnp.bincount(experts.reshape(-1), length=num_experts).astype(jnp.int32)


def implementations(configs, num_experts, equal):
    impls = {"ragged_dot": lambda x, w, gs: jax.lax.ragged_dot(x, w, gs)}
    for c in configs:
        b = Blocks(*c)
        name = "pallas_m{}n{}k{}w{}s{}".format(*b)
        impls[name] = lambda x, w, gs, b=b: pallas_grouped_matmul(x, w, gs, blocks=b)
    if equal:
        impls["einsum"] = lambda x, w, gs: jnp.einsum(
            "ecd,edf->ecf", x.reshape(num_experts, -1, x.shape[1]), w).reshape(x.shape[0], -1)
    impls["dense"] = lambda x, w, gs: x @ w[0]
    return impls


def bench_case(fn, x, w, gs, dy, iters):
    fwd = jax.jit(fn)

    def fwd_bwd(x, w, gs, dy):
        y, vjp = jax.vjp(lambda x, w: fn(x, w, gs), x, w)
        return (y, *vjp(dy))

    fwd_bwd = jax.jit(fwd_bwd)
    row, outputs = {}, {}
    for label, f, args in (("fwd", fwd, (x, w, gs)), ("fwd_bwd", fwd_bwd, (x, w, gs, dy))):
        try:
            compiled = f.lower(*args).compile()
            row[f"{label}_s"] = median_time(compiled, *args, iters=iters)
            outputs[label] = compiled(*args)
        except Exception as e:  # a config that does not fit (shared memory, registers) is a result
            row[f"{label}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row, outputs


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="1024:2048:8,1024:2048:64,2048:2048:8,2048:2048:64", help="d:f:E,...")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--groups", default="equal,routed")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="block_m,block_n,block_k,num_warps,num_stages;...")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, Pallas interpreted (checks the script runs)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "grouped_matmul.json"))
    args = p.parse_args()
    if args.smoke:
        args.cases, args.tokens, args.iters, args.configs = "32:64:4", 32, 2, "16,16,16,4,2;32,32,16,4,2"
    configs = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")]
    M = args.tokens * args.k
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "baseline": "ragged_dot",
              "tokens": args.tokens, "k": args.k, "M": M, "dtype": "bfloat16, float32 accumulation",
              "flops": "useful: 2 M d f forward, 6 M d f forward+backward", "results": []}
    for case in args.cases.split(","):
        d, f, E = (int(v) for v in case.split(":"))
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (M, d), jnp.bfloat16)
        w = (jax.random.normal(keys[1], (E, d, f)) / np.sqrt(d)).astype(jnp.bfloat16)
        dy = jax.random.normal(keys[2], (M, f), jnp.bfloat16)
        flops = 2 * M * d * f
        for kind in args.groups.split(","):
            gs = group_sizes(kind, args.tokens, args.k, E)
            baseline, ref = None, None
            for name, fn in implementations(configs, E, kind == "equal").items():
                row, outputs = bench_case(fn, x, w[:1] if name == "dense" else w, gs, dy, args.iters)
                row.update(implementation=name, d=d, f=f, E=E, groups=kind, max_group=int(gs.max()),
                           min_group=int(gs.min()))
                for label, mult in (("fwd", 1), ("fwd_bwd", 3)):
                    if f"{label}_s" in row:
                        row[f"{label}_tflops"] = mult * flops / row[f"{label}_s"] / 1e12
                if name == "ragged_dot":
                    baseline, ref = row, outputs
                elif baseline is not None and name != "dense":
                    for label in ("fwd", "fwd_bwd"):
                        if f"{label}_s" in row and f"{label}_s" in baseline:
                            row[f"{label}_speedup"] = baseline[f"{label}_s"] / row[f"{label}_s"]
                    if "fwd" in outputs and "fwd" in ref:
                        row["rel_err_y"] = rel_err(outputs["fwd"], ref["fwd"])
                    if "fwd_bwd" in outputs and "fwd_bwd" in ref:
                        row["rel_err_dx"] = rel_err(outputs["fwd_bwd"][1], ref["fwd_bwd"][1])
                        row["rel_err_dw"] = rel_err(outputs["fwd_bwd"][2], ref["fwd_bwd"][2])
                result["results"].append(row)
                print({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                os.makedirs(os.path.dirname(args.out), exist_ok=True)
                with open(args.out, "w") as fh:  # after each case, so a cut-off run keeps what it measured
                    json.dump(result, fh, indent=1)
    print(f"{'case':<22}{'implementation':<26}{'fwd ms':>9}{'TFLOP/s':>9}{'f+b ms':>9}{'TFLOP/s':>9}{'x base':>8}")
    for r in result["results"]:
        case = f"d{r['d']} f{r['f']} E{r['E']} {r['groups']}"
        cols = [r.get("fwd_s", float("nan")) * 1e3, r.get("fwd_tflops", float("nan")),
                r.get("fwd_bwd_s", float("nan")) * 1e3, r.get("fwd_bwd_tflops", float("nan")),
                r.get("fwd_bwd_speedup", float("nan"))]
        print(f"{case:<22}{r['implementation']:<26}" + "".join(f"{c:>9.3g}" for c in cols[:4]) + f"{cols[4]:>8.3g}")


if __name__ == "__main__":
    main()
