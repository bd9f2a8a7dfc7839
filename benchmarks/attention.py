"""Attention benchmarks on the GPU: forward + backward time of every attention path.

    python -m benchmarks.attention --section softmax|long|kinds [--out benchmarks/results/attention.jsonl]
    python -m benchmarks.attention --report   # tables (attention.md) and plot (attention.png) from the JSONL

Sections (each appends one JSON row per case to --out, so an interrupted run keeps what it measured):
  softmax  bf16 (B, T, N, H) with B·T = 32k tokens and N·H = 2048, T in 1k..32k, H in {64, 128},
           causal and not, through `dot_product_attention` with implementation None (the default
           path), "cudnn" (jax.nn's cuDNN kernel, the baseline), "xla" (naive: the T x S scores in
           memory) and "flash" (our pure-JAX blockwise kernel).
  long     T = 64k, B = 1, N = 16, H = 128, causal: "flash" and "xla" (naive is expected to run out of
           memory there).
  kinds    causal LM attention at T in 1k..32k (B·T = 32k, N = 16, H = 64, bf16): softmax (default
           path) vs linear (elu, chunked), Performer (256 features, chunked) and FLASH's mixed-chunk
           attention (GAU, chunk 256) — where the curves cross.

Each case is the median of synchronised fwd+bwd calls (jit of grad of <out, dO> w.r.t. q, k, v) on
random inputs, after a warm-up. Reported FLOP/s use the FlashAttention papers' count: forward
4·B·N·T·S·H (halved when causal), backward 2.5x forward. Memory is XLA's temp allocation for the
whole fwd+bwd program (`compiled.memory_analysis().temp_size_in_bytes`).
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp

from benchmarks.timing import median_time
from jaxmodels.ops.attention import dot_product_attention
from jaxmodels.ops.gau import mixed_chunk_attention
from jaxmodels.ops.linear_attention import linear_attention, orthogonal_random_features, performer_attention

TOKENS = int(os.environ.get("ATTN_TOKENS", 32 * 1024))  # B·T per case
WIDTH = 2048  # N·H


def fwd_bwd(attention):
    """jit(grad of <attention(q, k, v), dO>) w.r.t. (q, k, v)."""
    def loss(q, k, v, d_out):
        return jnp.vdot(attention(q, k, v).astype(jnp.float32), d_out.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure(attention, shapes, flops: float | None, **info) -> dict:
    keys = jax.random.split(jax.random.key(sum(map(sum, shapes))), len(shapes))
    args = [jax.random.normal(k, s, jnp.bfloat16) for k, s in zip(keys, shapes)]
    row = dict(info)
    try:
        compiled = fwd_bwd(attention).lower(*args).compile()
        row["temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
        row["time_s"] = median_time(compiled, *args, iters=10 if info["T"] <= 8192 else 5)
        if flops:
            row["tflops_per_s"] = flops / row["time_s"] / 1e12
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return row


def attention_flops(B, N, T, S, H, causal) -> float:
    forward = 4 * B * N * T * S * H * (0.5 if causal else 1.0)
    return 3.5 * forward


def softmax_rows(lengths, head_dims, implementations, causals=(False, True)):
    for H in head_dims:
        N = WIDTH // H
        for causal in causals:
            for T in lengths:
                B = max(1, TOKENS // T)
                shape = (B, T, N, H)
                for impl in implementations:
                    def attn(q, k, v, impl=impl, causal=causal):
                        return dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
                    yield measure(attn, [shape] * 4, attention_flops(B, N, T, T, H, causal), section="softmax",
                                  implementation=impl or "default", B=B, T=T, N=N, H=H, causal=causal)


def _per_head(attention, q, k, v):
    """(B, T, N, H) inputs through a single-head (B', T, H) attention with B' = B·N."""
    B, T, N, H = q.shape
    fold = lambda x: jnp.moveaxis(x, 2, 1).reshape(B * N, T, x.shape[-1])
    return jnp.moveaxis(attention(fold(q), fold(k), fold(v)).reshape(B, N, T, -1), 1, 2)


def kinds_rows(lengths):
    N, H, chunk, features = 16, 64, 256, 256
    projection = orthogonal_random_features(jax.random.key(0), features, H)
    kinds = {
        "softmax": lambda q, k, v: dot_product_attention(q, k, v, is_causal=True),
        "linear": lambda q, k, v: linear_attention(q, k, v, causal=True, chunk_size=chunk),
        "performer": lambda q, k, v: performer_attention(q, k, v, projection.astype(q.dtype), causal=True,
                                                         chunk_size=chunk),
        # FLASH's mixed-chunk attention (Hua et al. 2022) run per head: heads folded into the batch.
        "flash_gau": lambda q, k, v: _per_head(
            lambda q, k, v: mixed_chunk_attention(q, k, q, k, v, chunk_size=chunk, causal=True), q, k, v),
    }
    for T in lengths:
        B = max(1, TOKENS // T)
        for name, attn in kinds.items():
            flops = attention_flops(B, N, T, T, H, True) if name == "softmax" else None
            yield measure(attn, [(B, T, N, H)] * 4, flops, section="kinds", kind=name, B=B, T=T, N=N, H=H,
                          causal=True)


def report(rows: list[dict], out_dir: str) -> str:
    """Markdown tables (default vs cuDNN; flash vs naive XLA; kinds vs softmax) and a plot of the kinds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def cell(r):  # "—": not run; OOM: out of memory
        return "—" if r is None else "OOM" if "error" in r else f"{r['time_s'] * 1e3:.2f}"

    softmax = {(r["implementation"], r["T"], r["H"], r["causal"]): r for r in rows if r["section"] == "softmax"}
    cases = sorted({k[1:] for k in softmax}, key=lambda c: (c[1], c[2], c[0]))
    lines = ["| T | H | causal | default ms | cuDNN ms | default / cuDNN speed | naive XLA ms | XLA temp GiB | "
             "flash ms | flash temp GiB | flash speed vs XLA |", "|" + " --- |" * 11]
    for T, H, causal in cases:
        d, c, x, f = (softmax.get((impl, T, H, causal)) for impl in ("default", "cudnn", "xla", "flash"))
        ok = lambda r: r is not None and "error" not in r
        lines.append(" | ".join([
            f"| {T}", str(H), str(causal), cell(d), cell(c),
            f"{c['time_s'] / d['time_s']:.2f}x" if ok(c) and ok(d) else "",
            cell(x), f"{x['temp_bytes'] / 2**30:.2f}" if ok(x) else "",
            cell(f), f"{f['temp_bytes'] / 2**30:.2f}" if ok(f) else "",
            f"{x['time_s'] / f['time_s']:.2f}x" if ok(x) and ok(f) else ("runs, XLA OOM" if ok(f) else "")]) + " |")
    kinds = [r for r in rows if r["section"] == "kinds"]
    names = list(dict.fromkeys(r["kind"] for r in kinds))
    lengths = sorted({r["T"] for r in kinds})
    by = {(r["kind"], r["T"]): r for r in kinds}
    lines += ["", "| kind | " + " | ".join(f"T={n} ms" for n in lengths) + " |", "|" + " --- |" * (1 + len(lengths))]
    lines += [f"| {k} | " + " | ".join(cell(by.get((k, n))) for n in lengths) + " |" for k in names]
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in names:
        ax.plot(lengths, [by[(k, n)]["time_s"] * 1e3 for n in lengths], "o-", label=k)
    ax.set(xscale="log", yscale="log", xlabel="sequence length T (B·T = 32k tokens)", ylabel="fwd+bwd ms",
           title="causal attention kinds, N=16, H=64, bf16")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "attention.png"), dpi=120)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "attention.md"), "w") as f:
        f.write(text)
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", choices=("softmax", "long", "kinds"))
    p.add_argument("--report", action="store_true")
    p.add_argument("--lengths", default="1024,4096,16384,32768")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "attention.jsonl"))
    args = p.parse_args()
    if args.report:
        with open(args.out) as f:
            print(report([json.loads(line) for line in f], os.path.dirname(os.path.abspath(args.out))))
        return
    if args.section is None:
        p.error("give --section or --report")
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.section == "softmax":
        rows = softmax_rows(lengths, (64, 128), (None, "cudnn", "xla", "flash"))
    elif args.section == "long":
        rows = softmax_rows([65536], (128,), ("flash", "xla"), causals=(True,))
    else:
        rows = kinds_rows(lengths)
    device = jax.devices()[0].device_kind
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for row in rows:
        row.update(device=device, jax=jax.__version__)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        name = row.get("implementation") or row.get("kind")
        result = row.get("error") or (f"{row['time_s'] * 1e3:9.2f} ms  {row.get('tflops_per_s', 0):6.1f} TFLOP/s  "
                                      f"temp {row['temp_bytes'] / 2**30:6.2f} GiB")
        print(f"{row['section']:8} {name:10} T={row['T']:6d} H={row['H']:3d} causal={row['causal']!s:5}  {result}",
              flush=True)


if __name__ == "__main__":
    main()
