"""LoRA against full fine-tuning: train-step time and memory of a ~1B decoder LM, ours and Hugging Face's.

    python -m benchmarks.peft [--size 1b] [--steps 10] [--out benchmarks/results/peft.json]
    python -m benchmarks.peft --small            # CPU smoke: a tiny shape, 3 steps, nothing written

Cases (each in its own process, so that each peak memory is its own and JAX and torch do not share the GPU):
  full        our train step, every parameter trained (AdamW state for all), from the same base checkpoint;
  lora        LoRA r=16, alpha=32 on W_q and W_v (jaxmodels/nn/peft.py): AdamW state for the factors only;
  lora_all    LoRA r=16 on every attention and MLP projection;
  lora_bf16   `lora` with the frozen base stored in bfloat16 (peft.base_dtype, QLoRA-style);
  lora_folded, lora_all_folded   `lora`, `lora_all` with the update folded into the kernels in the step
              (peft.unfolded=False), the form before the unfolded one: what unfolding saves;
  hf_full, hf_lora   the same model as a transformers LlamaForCausalLM (bf16 autocast, float32 weights, sdpa
              attention, gradient checkpointing where we rematerialise), full AdamW or Hugging Face peft's LoRA
              with the same rank, alpha and targets; run when torch, transformers and peft import.
The JAX cases build the Trainer of experiments/configs/lm_tiny_lora.py with the size's shape (benchmarks/lm_step.py's
SIZES; bf16 compute, float32 params), start from a random base checkpoint written once (train.init_from), and time
`--steps` synchronised steps after warm-up (median). Memory: the device's peak bytes in use (GPU) and XLA's
analysis of the compiled step (arguments and temporaries); torch's max_memory_allocated. Our LoRA computes the
update unfolded inside the projections (x W + s (x A) B, `nn.peft.LoraKernel`), as Hugging Face's LoRA runs the
factors beside the frozen Linear: neither forms the frozen kernels' weight gradients. The *_folded cases fold it
into the kernels (W + s A B, then the usual matmuls), so their step computes the kernels' gradients as full
training does and then contracts them to A and B: they save the optimizer state and the update, not the backward
FLOPs.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from benchmarks.lm_step import SIZES
from benchmarks.timing import median_time
from experiments.configs import lm_tiny_lora
from jaxmodels.models import make_model
from jaxmodels.train.checkpoint import save_params
from jaxmodels.train.loop import Trainer

SMALL = dict(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=4, head_dim=16, mlp_dim=128, batch=8,
             remat="none")
LORA = dict(rank=16, alpha=32.0)
CASES = {
    "full": dict(method="none"),
    "lora": dict(method="lora", targets="attn/w_(q|v)", **LORA),
    "lora_all": dict(method="lora", targets="attn/w_|mlp/w_", **LORA),
    "lora_bf16": dict(method="lora", targets="attn/w_(q|v)", base_dtype="bfloat16", **LORA),
    "lora_folded": dict(method="lora", targets="attn/w_(q|v)", unfolded=False, **LORA),
    "lora_all_folded": dict(method="lora", targets="attn/w_|mlp/w_", unfolded=False, **LORA),
    "hf_full": None,
    "hf_lora": ["q_proj", "v_proj"],
}


def shape(args) -> dict:
    return dict(SMALL if args.small else SIZES[args.size])


def config_of(args, base: str, peft: dict):
    spec = shape(args)
    batch, remat = spec.pop("batch"), spec.pop("remat")
    c = lm_tiny_lora.get_config()
    c.model.update(spec, remat=remat, dtype="float32" if args.small else "bfloat16", param_dtype="float32")
    c.data.update(seq_len=args.seq_len, global_batch_size=batch)
    c.peft.update(peft)
    c.train.update(num_steps=10_000, init_from=base, trackers=("jsonl",))
    return c


def write_base(args, base: str) -> None:
    """A random base checkpoint of the size's model (what train.init_from reads): N(0, 0.02^2) tensors of the
    model's shapes drawn on the host, since compiling the model's initialiser takes minutes at 1B and the
    benchmark's timings do not depend on the values."""
    config = config_of(args, base, CASES["full"])
    shapes = nnx.state(nnx.eval_shape(lambda: make_model(config.model, nnx.Rngs(0))), nnx.Param).to_pure_dict()
    rng = np.random.default_rng(0)
    save_params(base, jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape, np.float32)).astype(s.dtype),
                                   shapes))


def jax_case(args, name: str, base: str) -> dict:
    config = config_of(args, base, CASES[name])
    trainer = Trainer(config, tempfile.mkdtemp())
    memory = trainer.compile_train_step()
    _, state = trainer.restore_or_init()
    batch = config.data.global_batch_size
    rng = np.random.default_rng(0)
    batches = [trainer.global_batch({"tokens": t, "segment_ids": np.ones_like(t)}) for t in
               (rng.integers(0, 256, (batch, args.seq_len + 1), dtype=np.int32) for _ in range(2))]
    holder = {"state": state, "i": 0}

    def one_step():
        holder["state"], metrics = trainer.train_step(holder["state"], batches[holder["i"] % 2])
        holder["i"] += 1
        return metrics["loss"]

    step_time = median_time(one_step, warmup=2, iters=args.steps)
    stats = jax.devices()[0].memory_stats() or {}
    return {"case": name, "framework": "jaxmodels", "trained_params": sum(
        x.size for x in jax.tree.leaves(holder["state"]["params"])), "step_time_s": step_time,
        "tokens_per_s": batch * args.seq_len / step_time,
        "peak_gib": stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
        "xla_arguments_gib": memory["arguments_gib"], "xla_temporaries_gib": memory["temporaries_gib"],
        "state_gib": {k.removesuffix("_gib"): v for k, v in memory.items() if k.removesuffix("_gib") in
                      ("params", "opt_state", "frozen")}}


def torch_case(args, name: str) -> dict:
    import peft  # torch and friends only in their own cases' processes
    import torch
    import transformers

    spec = shape(args)
    batch = spec["batch"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=spec["embed_dim"], intermediate_size=spec["mlp_dim"],
        num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"], head_dim=spec["head_dim"], max_position_embeddings=args.seq_len,
        tie_word_embeddings=False, attn_implementation="sdpa")).to(device)
    if spec["remat"] != "none":
        model.gradient_checkpointing_enable()
    if CASES[name] is not None:
        model = peft.get_peft_model(model, peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"],
                                                           target_modules=CASES[name], lora_dropout=0.0))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0, fused=device == "cuda")
    tokens = torch.randint(0, 256, (batch, args.seq_len), device=device)

    def one_step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=not args.small):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        one_step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - t)
    step_time = sorted(times)[len(times) // 2]
    return {"case": name, "framework": f"transformers {transformers.__version__} + peft {peft.__version__}",
            "trained_params": sum(p.numel() for p in trained), "step_time_s": step_time,
            "tokens_per_s": batch * args.seq_len / step_time,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}


def torch_available() -> bool:
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def run_case(args, name: str, base: str) -> dict:
    """One case in a fresh process; its result dict."""
    flags = ["--size", args.size, "--steps", str(args.steps), "--seq_len", str(args.seq_len)]
    flags += ["--small"] if args.small else []
    out = subprocess.run([sys.executable, "-m", "benchmarks.peft", "--case", name, "--base", base, *flags],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
        return {"case": name, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    full = {r["framework"].split()[0]: r for r in rows if r["case"] in ("full", "hf_full") and "error" not in r}
    lines = [f"{'case':10} {'framework':32} {'trained':>12} {'step ms':>8} {'vs full':>7} {'tok/s':>9} "
             f"{'peak GiB':>8} {'XLA args+temp GiB':>17}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:10} error: {r['error']}")
            continue
        ref = full.get(r["framework"].split()[0])
        ratio = r["step_time_s"] / ref["step_time_s"] if ref else float("nan")
        xla = (f"{r['xla_arguments_gib'] + r['xla_temporaries_gib']:17.2f}" if "xla_arguments_gib" in r
               else f"{'':17}")
        peak = f"{r['peak_gib']:8.2f}" if r.get("peak_gib") is not None else f"{'-':>8}"
        lines.append(f"{r['case']:10} {r['framework'][:32]:32} {r['trained_params']:12,} "
                     f"{r['step_time_s'] * 1e3:8.1f} {ratio:7.2f} {r['tokens_per_s']:9.0f} {peak} {xla}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1b", choices=sorted(s for s in SIZES if not s.startswith("mamba")))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--small", action="store_true", help="CPU smoke test: a tiny shape, seq 64, 3 steps")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "peft.json"))
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    p.add_argument("--base", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.small and args.case is None:
        args.steps, args.seq_len = 3, 64
    if args.case:
        if args.case == "base":
            write_base(args, args.base)
            print("{}")
        else:
            result = torch_case(args, args.case) if args.case.startswith("hf_") else jax_case(args, args.case,
                                                                                                args.base)
            print(json.dumps(result))
        return
    names = [n for n in args.cases.split(",") if not n.startswith("hf_") or torch_available()]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise SystemExit(f"--cases: unknown {unknown}; choose from {', '.join(CASES)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base")
        if "error" in run_case(args, "base", base):
            raise SystemExit("could not write the base checkpoint")
        for name in names:  # each row written as it comes: a run cut short keeps the cases it finished
            rows.append(run_case(args, name, base))
            print(table(rows[-1:]), flush=True)
            if not args.small:
                os.makedirs(os.path.dirname(args.out), exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump({"device": jax.devices()[0].device_kind, "size": args.size, "seq_len": args.seq_len,
                               "baseline": "full fine-tuning with the same framework (and Hugging Face transformers "
                                           "+ peft)", "results": rows}, f, indent=2)
    print(table(rows))


if __name__ == "__main__":
    main()
