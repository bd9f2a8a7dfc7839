"""Attention benchmarks on the GPU: forward + backward time of every attention path.

    python benchmarks/attention.py --section softmax|long|kinds [--out benchmarks/results/attention.jsonl]

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
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxmodels.ops.attention import dot_product_attention  # noqa: E402
from jaxmodels.ops.gau import mixed_chunk_attention  # noqa: E402
from jaxmodels.ops.linear_attention import (  # noqa: E402
    linear_attention, orthogonal_random_features, performer_attention)

TOKENS = int(os.environ.get("ATTN_TOKENS", 32 * 1024))  # B·T per case
WIDTH = 2048  # N·H


def median_time(fn, args, *, warmup: int = 2, iters: int = 10) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


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
        row["time_s"] = median_time(compiled, args, iters=10 if info["T"] <= 8192 else 5)
        if flops:
            row["tflops_per_s"] = flops / row["time_s"] / 1e12
    except Exception as e:  # noqa: BLE001 -- out of memory is a result here, recorded as such
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
    fold = lambda x: jnp.moveaxis(x, 2, 1).reshape(B * N, T, x.shape[-1])  # noqa: E731
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", choices=("softmax", "long", "kinds"), required=True)
    p.add_argument("--lengths", default="1024,4096,16384,32768")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "attention.jsonl"))
    args = p.parse_args()
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
