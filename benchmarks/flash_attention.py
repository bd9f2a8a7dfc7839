"""The Pallas FlashAttention-2 kernels on the GPU against cuDNN (jax.nn), our pure-JAX flash and PyTorch SDPA.

    python -m benchmarks.flash_attention [--sections sweep,dense,window,sparse]
        [--out benchmarks/results/flash_attention_h200.json]
    python -m benchmarks.flash_attention --small     # seconds on a CPU (kernels interpreted): checks that it runs

Every case is forward + backward (jit of grad of <out, dO> w.r.t. q, k, v; PyTorch: out.backward(dO)) in
bfloat16, the median of synchronised calls after warm-up. Sections (the JSON is rewritten after every case, so
an interrupted run keeps what it measured; within a section the slow baselines come last):

  sweep   blocks of the three kernels per head dim (64, 128) at T = 4096, B = 8, N·H = 2048, causal: forward
          time of each forward `Blocks` candidate; then forward + backward of (dQ, dK/dV) candidates with the
          best forward (dQ swept with the first dK/dV, then dK/dV with the best dQ). Run first, the best become
          the "pallas" configs of the other sections; run last (e.g. --sections dense,window,sparse,sweep), those
          use `DEFAULT_CONFIGS`.
  dense   causal, B·T = 32k tokens, N·H = 2048 (as benchmarks/attention.py), T in {4096, 16384}, H in
          {64, 128}: "pallas", "cudnn" (jax.nn's cuDNN flash attention), "flash" (pure JAX), "torch" (SDPA,
          whatever backend PyTorch picks), and the forward alone of "pallas" and "cudnn" (where the time goes).
  window  T = 32768, B = 1, N = 16, H = 128, causal with a sliding window of 4096 keys: "pallas" and "flash"
          (both skip the blocks outside the band), "cudnn" (local_window_size), "torch" (SDPA with the window
          as a dense boolean mask).
  sparse  T = 16384, B = 2, N = 16, H = 128, Sparse Transformer layouts at block 128 as block-sparse masks
          (Child et al. 2019: strided with stride 1024, fixed with block 1024 and 128 summary positions;
          Longformer-style local + global: 8 window blocks, 2 global blocks; all causal at block level):
          "pallas" (the layout's blocks only), "gather" (`block_sparse_attention`'s jnp path), "cudnn" and
          "flash" given the same mask as a dense (T, S) bias / boolean mask.

FLOPs are useful FLOPs: 4·B·N·H per allowed (query, key) pair forward (a causal T x T mask allows T(T+1)/2),
and forward + backward 3.5x that (FlashAttention's count, as benchmarks/attention.py); TFLOP/s = FLOPs / time.
"""

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import median_time
from jaxmodels.ops import sparse_attention
from jaxmodels.ops.attention import dot_product_attention, pallas_attention
from jaxmodels.ops.kernels import flash_attention as fa

WIDTH = 2048  # N·H of the sweep and dense sections
TOKENS = 32 * 1024  # their B·T

# Candidates of the sweep, per head dim: (forward, dQ, dK/dV) Blocks (block_q, block_k, num_warps, num_stages).
CANDIDATES = {
    64: dict(forward=[(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
             dq=[(128, 32, 4, 3), (64, 64, 4, 3)],
             dkv=[(32, 128, 4, 3), (64, 64, 4, 3)]),
    128: dict(forward=[(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
              dq=[(64, 32, 4, 3), (64, 64, 4, 3)],
              dkv=[(32, 64, 4, 3), (64, 128, 8, 2)]),
}
SMALL_CANDIDATES = {16: dict(forward=[(16, 16, 4, 2)], dq=[(16, 16, 4, 2)], dkv=[(16, 16, 4, 2)])}


def attention_flops(B, N, H, allowed_pairs) -> float:
    """Forward + backward FLOPs: 3.5 x 4·B·N·H per allowed (query, key) pair."""
    return 3.5 * 4 * B * N * H * allowed_pairs


def causal_pairs(T) -> int:
    return T * (T + 1) // 2


def window_pairs(T, window) -> int:
    """Pairs with 0 <= i - j < window."""
    return sum(min(i + 1, window) for i in range(T))


def _inputs(shape, count=4, seed=0):
    keys = jax.random.split(jax.random.key(seed), count)
    return [jax.random.normal(k, shape, jnp.bfloat16) for k in keys]


def fwd_bwd(attention):
    """jit(grad of <attention(q, k, v, *extra), dO>) w.r.t. (q, k, v); extra operands not differentiated."""
    def loss(q, k, v, d_out, *extra):
        return jnp.vdot(attention(q, k, v, *extra).astype(jnp.float32), d_out.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def time_jax(attention, args, iters, *, backward=True, warmup=2) -> dict:
    """{"time_s"} of fwd+bwd (or the forward alone) of attention(q, k, v, *extra) on args = (q, k, v, dO, *extra),
    or {"error"}."""
    try:
        if backward:
            fn = fwd_bwd(attention)
            call = (lambda: fn(*args))
        else:
            fn = jax.jit(attention)
            call = (lambda: fn(*args[:3], *args[4:]))
        start = time.perf_counter()
        jax.block_until_ready(call())
        compile_s = time.perf_counter() - start
        return {"time_s": median_time(lambda: call(), warmup=max(warmup - 1, 0), iters=iters),
                "first_call_s": compile_s}
    except Exception as e:  # a config the GPU cannot compile (shared memory), or out of memory
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


def time_torch(B, T, N, H, iters, *, causal=True, mask=None, warmup=2) -> dict:
    """PyTorch scaled_dot_product_attention fwd+bwd, (B, N, T, H) bf16 on CUDA, CUDA-event timed."""
    try:
        import torch
        import torch.nn.functional as F
        if not torch.cuda.is_available():
            return {"error": "no CUDA for PyTorch"}
        q, k, v = (torch.randn(B, N, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        d_out = torch.randn(B, N, T, H, device="cuda", dtype=torch.bfloat16)
        attn_mask = None if mask is None else torch.as_tensor(np.asarray(mask), device="cuda")

        def step():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and mask is None)
            out.backward(d_out)

        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return {"time_s": statistics.median(times), "torch": torch.__version__}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


def _row(result, flops=None, **info):
    row = dict(info, **result)
    if flops and "time_s" in row:
        row["tflops_per_s"] = flops / row["time_s"] / 1e12
    name = "/".join(str(info[k]) for k in ("impl", "config") if k in info)
    shown = row.get("error") or f"{row['time_s'] * 1e3:9.3f} ms {row.get('tflops_per_s', 0):7.1f} TFLOP/s"
    print(f"  {info.get('section', ''):7} {name:40} {str({k: info[k] for k in ('T', 'H', 'layout') if k in info}):32} "
          f"{shown}", flush=True)
    return row


def _config(forward, dq, dkv) -> fa.Config:
    return fa.Config(fa.Blocks(*forward), fa.Blocks(*dq), fa.Blocks(*dkv))


def _pallas(config, **options):
    return lambda q, k, v, *extra: pallas_attention(q, k, v, config=config, **options)


def sweep(head_dims, T, candidates, iters, rows, *, width=WIDTH, tokens=TOKENS) -> dict:
    """Best Config per head dim (see the module docstring); rows appended to `rows`."""
    best = {}
    for H in head_dims:
        N, B = width // H, max(1, tokens // T)
        args = _inputs((B, T, N, H))
        flops = attention_flops(B, N, H, causal_pairs(T))
        c = candidates[H]
        default_bwd = (c["dq"][0], c["dkv"][0])
        forward_times = {}
        for forward in c["forward"]:
            config = _config(forward, *default_bwd)
            r = _row(time_jax(_pallas(config, is_causal=True), args, iters, backward=False), flops / 3.5,
                     section="sweep", kernel="forward", impl="pallas", config=list(forward), T=T, H=H, B=B, N=N)
            rows.append(r)
            if "time_s" in r:
                forward_times[forward] = r["time_s"]
        if not forward_times:
            continue
        best_forward = min(forward_times, key=forward_times.get)
        total = {}
        info = dict(section="sweep", kernel="backward", impl="pallas", T=T, H=H, B=B, N=N)
        for dq in c["dq"]:
            total[(dq, c["dkv"][0])] = _time_backward(_config(best_forward, dq, c["dkv"][0]), args, flops, iters,
                                                      rows, info)
        done = {pair: t for pair, t in total.items() if t is not None}
        best_dq = min(done, key=done.get)[0] if done else c["dq"][0]
        for dkv in c["dkv"][1:]:
            total[(best_dq, dkv)] = _time_backward(_config(best_forward, best_dq, dkv), args, flops, iters, rows, info)
        total = {pair: t for pair, t in total.items() if t is not None}
        if total:
            best[H] = _config(best_forward, *min(total, key=total.get))
    return best


def _time_backward(config, args, flops, iters, rows, info):
    """Forward + backward time of `config` (appended to rows), or None if it failed."""
    r = _row(time_jax(_pallas(config, is_causal=True), args, iters), flops, config=[list(b) for b in config], **info)
    rows.append(r)
    return r.get("time_s")


def dense(configs, lengths, head_dims, iters, rows, *, with_torch=True, with_cudnn=True, forward_alone=True,
          width=WIDTH, tokens=TOKENS):
    """Every shape's "pallas", "cudnn" and "torch" first, then the forwards alone, then "flash" (the slowest)."""
    shapes = [(T, H) for H in head_dims for T in lengths]

    def case(T, H):
        N, B = width // H, max(1, tokens // T)
        return N, B, _inputs((B, T, N, H)), attention_flops(B, N, H, causal_pairs(T)), dict(
            section="dense", T=T, H=H, B=B, N=N, causal=True)

    def impls(H):
        fns = {"pallas": _pallas(configs.get(H), is_causal=True)}
        if with_cudnn:
            fns["cudnn"] = lambda q, k, v: dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        return fns

    for T, H in shapes:
        N, B, args, flops, info = case(T, H)
        for name, fn in impls(H).items():
            config = {"config": [list(b) for b in configs[H]]} if name == "pallas" and H in configs else {}
            rows.append(_row(time_jax(fn, args, iters), flops, impl=name, **info, **config))
        if with_torch:
            rows.append(_row(time_torch(B, T, N, H, iters), flops, impl="torch", **info))
    for T, H in shapes if forward_alone else ():
        N, B, args, flops, info = case(T, H)
        for name, fn in impls(H).items():
            rows.append(_row(time_jax(fn, args, iters, backward=False), flops / 3.5, impl=name + "_forward", **info))
    for T, H in shapes:
        N, B, args, flops, info = case(T, H)
        fn = lambda q, k, v: dot_product_attention(q, k, v, is_causal=True, implementation="flash")
        rows.append(_row(time_jax(fn, args, iters if T <= 4096 else 2, warmup=1), flops, impl="flash", **info))


def window(configs, T, size, iters, rows, *, B=1, N=16, H=128, with_torch=True, with_cudnn=True):
    args = _inputs((B, T, N, H))
    flops = attention_flops(B, N, H, window_pairs(T, size))
    info = dict(section="window", T=T, H=H, B=B, N=N, window=size, causal=True)
    band = (size - 1, 0)
    impls = {"pallas": _pallas(configs.get(H), is_causal=True, local_window_size=band)}
    if with_cudnn:
        impls["cudnn"] = lambda q, k, v: dot_product_attention(q, k, v, is_causal=True, local_window_size=band,
                                                               implementation="cudnn")
    for name, fn in impls.items():
        rows.append(_row(time_jax(fn, args, iters), flops, impl=name, **info))
    if with_torch:
        i, j = np.arange(T)[:, None], np.arange(T)[None, :]
        rows.append(_row(time_torch(B, T, N, H, iters, mask=(j <= i) & (i - j < size)), flops, impl="torch", **info))
    flash = lambda q, k, v: dot_product_attention(q, k, v, is_causal=True, local_window_size=band,
                                                  implementation="flash")
    rows.append(_row(time_jax(flash, args, max(2, iters // 2), warmup=1), flops, impl="flash", **info))


def layouts(T, block, names=("strided", "fixed", "local_global")):
    """Sparse Transformer layouts (Child et al. 2019) and Longformer-style local + global, causal at block level."""
    return {name: layout for name, layout in {
        "strided": sparse_attention.strided_layout(T, 8 * block, block, causal=True),
        "fixed": sparse_attention.fixed_layout(T, 8 * block, block, block, causal=True),
        "local_global": sparse_attention.local_global_layout(T, block, block, window_blocks=8, global_blocks=2,
                                                             causal=True),
    }.items() if name in names}


def sparse(configs, T, block, iters, rows, *, B=2, N=16, H=128, with_cudnn=True,
           names=("strided", "fixed", "local_global")):
    """Every layout's "pallas", then "cudnn" with the dense bias, "gather", and "flash" with the dense mask (the
    dense-operand ones compiled once, the layout's mask an argument)."""
    q, k, v, d_out = _inputs((B, T, N, H))
    cases = []
    for name, layout in layouts(T, block, names).items():
        info = dict(section="sparse", T=T, H=H, B=B, N=N, layout=name, block=block,
                    density=float(layout.sum() / layout.size))
        cases.append((layout, attention_flops(B, N, H, int(layout.sum()) * block * block), info))
    for layout, flops, info in cases:
        fn = _pallas(configs.get(H), layout=layout, layout_block_size=block)
        rows.append(_row(time_jax(fn, (q, k, v, d_out), iters), flops, impl="pallas", **info))

    def dense_operand(name, layout):
        element = jnp.repeat(jnp.repeat(jnp.asarray(layout), block, 0), block, 1)[None, None]
        return element if name == "flash" else jnp.where(element, 0.0, -1e9).astype(jnp.bfloat16)

    dense_impls = {"cudnn": lambda q, k, v, bias: dot_product_attention(q, k, v, bias, implementation="cudnn")}
    if not with_cudnn:
        dense_impls = {}
    for impl in [*dense_impls, "gather", "flash"]:
        if impl == "flash":
            dense_impls["flash"] = lambda q, k, v, mask: dot_product_attention(q, k, v, mask=mask,
                                                                               implementation="flash")
        compiled = fwd_bwd(dense_impls[impl]) if impl != "gather" else None
        for layout, flops, info in cases:
            if impl == "gather":
                fn = lambda q, k, v, layout=layout: sparse_attention.block_sparse_attention(q, k, v, layout,
                                                                                            block_size=block)
                rows.append(_row(time_jax(fn, (q, k, v, d_out), iters), flops, impl="gather", **info))
                continue
            try:
                operand = dense_operand(impl, layout)
                call = lambda operand=operand, compiled=compiled: compiled(q, k, v, d_out, operand)
                jax.block_until_ready(call())
                result = {"time_s": median_time(call, warmup=0, iters=max(2, iters // 2))}
            except Exception as e:
                result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            rows.append(_row(result, flops, impl=impl + "_dense_mask", **info))


def summary(rows) -> list[dict]:
    """Ratios of "pallas" against each other implementation, per case."""
    out = []
    by_case = {}
    for r in rows:
        if r.get("section") in ("dense", "window", "sparse") and "time_s" in r:
            case = (r["section"], r["T"], r["H"], r.get("layout"))
            by_case.setdefault(case, {})[r["impl"]] = r["time_s"]
    for (section, T, H, layout), times in by_case.items():
        if "pallas" in times:
            entry = dict(section=section, T=T, H=H, pallas_ms=times["pallas"] * 1e3)
            if layout:
                entry["layout"] = layout
            entry.update({f"speedup_vs_{name}": t / times["pallas"] for name, t in times.items()
                          if name != "pallas" and not name.endswith("_forward")})
            if "pallas_forward" in times and "cudnn_forward" in times:
                entry["forward_speedup_vs_cudnn"] = times["cudnn_forward"] / times["pallas_forward"]
                entry["pallas_backward_ms"] = (times["pallas"] - times["pallas_forward"]) * 1e3
                if "cudnn" in times:
                    entry["cudnn_backward_ms"] = (times["cudnn"] - times["cudnn_forward"]) * 1e3
            out.append(entry)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="sweep,dense,window,sparse")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/flash_attention_h200.json; none with --small)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--small", action="store_true",
                   help="tiny shapes, kernels interpreted on the CPU, no cuDNN or torch: checks that it runs")
    args = p.parse_args(argv)
    if args.out is None and not args.small:
        args.out = os.path.join(os.path.dirname(__file__), "results", "flash_attention_h200.json")
    sections = args.sections.split(",")
    if args.small:
        sizes = dict(width=32, tokens=64, sweep_T=32, head_dims=(16,), lengths=(32,), window_T=64, window=16,
                     sparse_T=64, block=16, H=16, N=2, candidates=SMALL_CANDIDATES, iters=1)
    else:
        sizes = dict(width=WIDTH, tokens=TOKENS, sweep_T=4096, head_dims=(64, 128), lengths=(4096, 16384),
                     window_T=32768, window=4096, sparse_T=16384, block=128, H=128, N=16, candidates=CANDIDATES,
                     iters=args.iters)
    on_gpu = jax.default_backend() == "gpu"
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "small": args.small}

    def save():
        result["summary"] = summary(rows)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    rows = result["rows"] = _SavingList(save)
    configs = {H: fa.default_config(H) for H in sizes["head_dims"] + (sizes["H"],)}
    result["default_configs"] = {str(H): [list(b) for b in c] for H, c in configs.items()}
    for section in sections:
        if section not in SECTIONS:
            p.error(f"unknown section {section!r}; choose from {SECTIONS}")
    if sections[0] == "sweep":  # the best blocks then serve the other sections
        sweep_section(result, configs, sizes, rows)
    if "dense" in sections:
        dense(configs, sizes["lengths"], sizes["head_dims"], sizes["iters"], rows, with_torch=on_gpu,
              with_cudnn=on_gpu, forward_alone=not args.small, width=sizes["width"], tokens=sizes["tokens"])
        save()
    if "window" in sections:
        window(configs, sizes["window_T"], sizes["window"], sizes["iters"], rows, N=sizes["N"], H=sizes["H"],
               with_torch=on_gpu, with_cudnn=on_gpu)
        save()
    if "sparse" in sections:
        sparse(configs, sizes["sparse_T"], sizes["block"], sizes["iters"], rows, N=sizes["N"], H=sizes["H"],
               with_cudnn=on_gpu, names=("strided",) if args.small else ("strided", "fixed", "local_global"))
        save()
    if "sweep" in sections[1:]:
        sweep_section(result, configs, sizes, rows)
    save()
    for entry in result["summary"]:
        print(entry)
    return result


SECTIONS = ("sweep", "dense", "window", "sparse")


def sweep_section(result, configs, sizes, rows):
    best = sweep(sizes["head_dims"], sizes["sweep_T"], sizes["candidates"], sizes["iters"], rows,
                 width=sizes["width"], tokens=sizes["tokens"])
    configs.update(best)
    result["best_configs"] = {str(H): [list(b) for b in c] for H, c in best.items()}


class _SavingList(list):
    """A list that calls save() after each append: an interrupted run keeps every row it measured."""

    def __init__(self, save):
        super().__init__()
        self._save = save

    def append(self, row):
        super().append(row)
        self._save()


if __name__ == "__main__":
    main()
