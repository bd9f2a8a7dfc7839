"""Experiment: the attention scale and initialisation through depth, and float32 / bfloat16 / float16 training.

    python -m experiments.init_scale [--steps 150] [--precision_steps 300] [--out experiments/results/init]

Part 1, depth at initialisation. A 24-layer pre-norm LM (lm_tiny's blocks: RMSNorm, RoPE, SwiGLU; embed_dim 64,
2 heads of head_dim 32, GPT-2's 1/sqrt(2 num_layers) on the residual outputs) in three settings (SETTINGS):
  scaled    logits q·k / sqrt(head_dim), LeCun q (Vaswani et al. 2017; the default);
  unscaled  logits q·k, LeCun q: unit-variance q and k give logits of variance head_dim;
  t5        logits q·k, T5's query init of variance 1 / (embed_dim head_dim) (Raffel et al. 2020), which makes
            up for the missing 1/sqrt(head_dim) (`attention.logit_divisor`, `attention.query_init`).
On a batch of real text it records, per layer, the std of the residual stream after the block, the std of the
causal attention logits, the mean entropy of the attention rows (nats; a uniform row over n keys has log n) and
the mean largest attention weight (1 = a one-hot, saturated softmax).
Part 2, training: the same model trained --steps steps in each setting (batch 8 x 64 bytes, AdamW 3e-3): train
loss curves and the final eval loss.
Part 3, precision: lm_tiny at a tiny size (2 layers, embed_dim 64) trained --precision_steps steps with
model.dtype float32, bfloat16 and float16 + dynamic loss scaling (precision.growth_interval 50, so that the
scale grows until it overflows; at step --inject_step the scale is set to 2^24, an injected overflow the
schedule must recover from): loss curves and the float16 run's loss-scale trace with its skipped steps.

The runs are single-device loops over `make_train_step` with an eagerly built model: the trainer's jitted,
sharded initialiser takes ~30 s to compile for 24 layers on a CPU, eager construction a few seconds.
Writes OUT/results.json, OUT/depth.png, OUT/training.png and OUT/precision.png. 6 min wall time (2.6 min of
CPU time) on the 2-core CPU development machine shared with other jobs.
"""

import argparse
import json
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from experiments.configs import lm_tiny
from jaxmodels.nn.attention import LOGIT_DIVISORS
from jaxmodels.nn.layers import dense
from jaxmodels.ops import precision
from jaxmodels.ops.position import apply_rope
from jaxmodels.train.config import validate_config
from jaxmodels.train.loop import init_rngs
from jaxmodels.train.loss_scaling import loss_scaling_from_config
from jaxmodels.train.optimizer import learning_rate_schedule, make_optimizer
from jaxmodels.train.step import make_eval_step, make_train_step

SETTINGS = {"scaled": dict(logit_divisor="sqrt_head_dim", query_init="lecun"),
            "unscaled": dict(logit_divisor="none", query_init="lecun"),
            "t5": dict(logit_divisor="none", query_init="t5")}
DTYPES = ("float32", "bfloat16", "float16")
INJECTED_SCALE = 2.0**24


def config(**fields):
    """lm_tiny with dotted overrides ("model.num_layers": 24), small batches and no sample."""
    c = lm_tiny.get_config()
    for path, value in {"data.seq_len": 64, "data.global_batch_size": 8, "data.eval_batches": 4,
                        "optimizer.warmup_steps": 20, **fields}.items():
        *parents, leaf = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def deep_config(setting: str, steps: int):
    attention = {f"model.attention.{k}": v for k, v in SETTINGS[setting].items()}
    return config(**{"model.num_layers": 24, "model.embed_dim": 64, "model.num_heads": 2, "model.num_kv_heads": 2,
                     "model.head_dim": 32, "model.mlp_dim": 128, "train.num_steps": steps}, **attention)


def tiny_config(dtype: str, steps: int):
    fields = {"model.num_layers": 2, "model.embed_dim": 64, "model.num_heads": 2, "model.num_kv_heads": 2,
              "model.head_dim": 32, "model.mlp_dim": 192, "model.dtype": dtype, "train.num_steps": steps}
    if dtype == "float16":
        fields.update({"precision.loss_scale": "dynamic", "precision.growth_interval": 50})
    return config(**fields)


def depth_statistics(model, tokens) -> dict[str, list[float]]:
    """Per block of a DecoderLM (softmax attention, RoPE, num_kv_heads = num_heads) on tokens (B, T): the std of
    the residual stream after it, and of its attention logits over the causal pairs, the attention rows' mean
    entropy and mean largest weight."""
    length = tokens.shape[1]
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    causal = jnp.tril(jnp.ones((length, length), bool))
    x, stats = model.embed(tokens), {"residual_std": [], "logit_std": [], "entropy": [], "max_weight": []}
    for block in model.blocks:
        attn, h = block.attn, block.attn_norm(x)
        q, k = (apply_rope(dense(h, w[...], attn.dtype, "bld,dnh->blnh"), positions, base=attn.spec.rope_base)
                for w in (attn.w_q, attn.w_k))
        logits = jnp.einsum("bqnh,bknh->bnqk", q, k) / LOGIT_DIVISORS[attn.spec.logit_divisor](attn.head_dim)
        weights = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
        entropy = -jnp.sum(jnp.where(causal, weights * jnp.log(jnp.where(causal, weights, 1.0)), 0.0), axis=-1)
        x = block(x, positions)[0]
        stats["logit_std"].append(float(jnp.std(logits[..., causal])))
        stats["entropy"].append(float(jnp.mean(entropy)))
        stats["max_weight"].append(float(jnp.mean(jnp.max(weights, axis=-1))))
        stats["residual_std"].append(float(jnp.std(x)))
    return stats


def train(c, *, inject_step: int | None = None, stats: bool = False) -> dict:
    """Train config `c` for c.train.num_steps steps on one device; the per-step train loss (and loss scale and
    skips when it scales the loss), the final eval metrics, and with `stats` the depth statistics at init."""
    task = validate_config(c, num_devices=1)
    model = task.build_model(init_rngs(c))
    graphdef, params = nnx.graphdef(model), nnx.state(model, nnx.Param).to_pure_dict()
    steps, scaling = c.train.num_steps, loss_scaling_from_config(c)
    optimizer = make_optimizer(c.optimizer, steps)
    step = jax.jit(make_train_step(graphdef, task.loss, optimizer, learning_rate_schedule(c.optimizer, steps),
                                   loss_scaling=scaling), donate_argnums=0)
    out = {"depth": depth_statistics(model, jnp.asarray(task.eval_batches()[0]["tokens"][:, :-1]))} if stats else {}
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params),
             **scaling.state()}
    batches, rows, start = task.train_batches(0, 0, 1), [], time.perf_counter()
    for i in range(steps):
        if i == inject_step:
            state["loss_scale"] = precision.DynamicLossScale(jnp.float32(INJECTED_SCALE), jnp.int32(0))
        state, metrics = step(state, next(batches))
        rows.append(metrics)
    rows = jax.device_get(rows)
    eval_step = jax.jit(make_eval_step(graphdef, task.loss))
    evaluation = task.combine_metrics([{k: float(v) for k, v in jax.device_get(eval_step(state["params"], b)).items()}
                                       for b in task.eval_batches()])
    out.update(loss=[float(r["loss"]) for r in rows], nonfinite=[int(r["nonfinite"]) for r in rows],
               eval_loss=evaluation["loss"], eval_bits_per_byte=evaluation["bits_per_byte"],
               wall_s=time.perf_counter() - start)
    if scaling.enabled:
        out["loss_scale"] = [float(r["loss_scale"]) for r in rows]
    return out


def smooth(values, width: int = 10) -> np.ndarray:
    """Moving average over `width` steps (shorter at the start); NaN-free input."""
    values = np.asarray(values, float)
    cumsum = np.concatenate([[0.0], np.cumsum(values)])
    lo = np.maximum(np.arange(1, len(values) + 1) - width, 0)
    return (cumsum[1:] - cumsum[lo]) / (np.arange(1, len(values) + 1) - lo)


def plot_depth(results: dict, path: str, head_dim: int, length: int) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    panels = (("residual_std", "residual stream std after the block", False),
              ("logit_std", "attention logit std", True),
              ("entropy", f"attention entropy (nats; uniform over {length} keys = {math.log(length):.2f})", False),
              ("max_weight", "mean largest attention weight", False))
    for ax, (key, title, log) in zip(axes, panels):
        for name, r in results.items():  # t5 coincides with scaled at init: scaled drawn wide underneath
            ax.plot(np.arange(1, len(r["depth"][key]) + 1), r["depth"][key], "--" if name == "t5" else "-",
                    lw=4 if name == "scaled" else 1.5, alpha=0.5 if name == "scaled" else 1.0, marker=".", label=name)
        if key == "logit_std":
            ax.axhline(1.0, color="gray", ls=":", lw=1)
            ax.axhline(math.sqrt(head_dim), color="gray", ls="--", lw=1, label=f"sqrt(head_dim) = {head_dim**0.5:.1f}")
            ax.set_yscale("log")
        ax.set(xlabel="layer", title=title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both" if log else "major")
    fig.suptitle("24-layer LM at initialisation: q·k / sqrt(d) (scaled), q·k (unscaled), q·k with T5's query init "
                 "(t5: the same function as scaled at init, its q drawn from the same normals / sqrt(d))")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(results: dict, path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        ax.plot(smooth(r["loss"]), label=f"{name} (eval {r['eval_loss']:.3f})")
    ax.set(xlabel="step", ylabel="train loss (nats/byte, 10-step mean)", title="24-layer LM, embed_dim 64")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_precision(results: dict, path: str, inject_step: int) -> None:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, r in results.items():
        ax.plot(smooth(r["loss"]), label=f"{name} (eval {r['eval_loss']:.4f})")
    ax.set(xlabel="step", ylabel="train loss (nats/byte, 10-step mean)", title="lm_tiny (2 layers, d=64) on CPU")
    ax.legend()
    ax.grid(alpha=0.3)
    half = results["float16"]
    scale, skipped = np.asarray(half["loss_scale"]), np.flatnonzero(half["nonfinite"])
    bx.step(np.arange(len(scale)), np.log2(scale), where="post", label="log2 loss scale used by the step")
    bx.scatter(skipped, np.log2(scale[skipped]), color="red", marker="x", zorder=3,
               label=f"skipped (overflow): {len(skipped)} steps")
    bx.axvline(inject_step, color="gray", ls=":", label=f"scale set to 2^{int(math.log2(INJECTED_SCALE))} (injected)")
    bx.set(xlabel="step", ylabel="log2 S", title="float16: dynamic loss scale (growth_interval 50)")
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps of each 24-layer model")
    parser.add_argument("--precision_steps", type=int, default=300, help="training steps of each precision run")
    parser.add_argument("--inject_step", type=int, default=200, help="step at which the float16 scale is set high")
    parser.add_argument("--out", default="experiments/results/init")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    deep = {name: train(deep_config(name, args.steps), stats=True) for name in SETTINGS}
    for name, r in deep.items():
        d = r["depth"]
        print(f"{name:9s} logit std layer 1/24: {d['logit_std'][0]:.2f}/{d['logit_std'][-1]:.2f}  max weight "
              f"{np.mean(d['max_weight']):.2f}  residual std 24: {d['residual_std'][-1]:.2f}  loss "
              f"{r['loss'][0]:.3f} -> {np.mean(r['loss'][-10:]):.3f}  eval {r['eval_loss']:.3f}", flush=True)
    c = deep_config("scaled", args.steps)
    plot_depth(deep, os.path.join(args.out, "depth.png"), c.model.head_dim, c.data.seq_len)
    plot_training(deep, os.path.join(args.out, "training.png"))
    mixed = {dtype: train(tiny_config(dtype, args.precision_steps),
                          inject_step=args.inject_step if dtype == "float16" else None) for dtype in DTYPES}
    reference = smooth(mixed["float32"]["loss"])
    agreement = {dtype: float(np.max(np.abs(smooth(r["loss"]) - reference)[len(reference) // 10:]))
                 for dtype, r in mixed.items() if dtype != "float32"}
    for dtype, r in mixed.items():
        print(f"{dtype:9s} eval loss {r['eval_loss']:.4f}  skipped {sum(r['nonfinite'])}  "
              f"max |smoothed loss - float32's| {agreement.get(dtype, 0.0):.4f}", flush=True)
    plot_precision(mixed, os.path.join(args.out, "precision.png"), args.inject_step)
    results = {"depth_and_training": {"config": {"num_layers": 24, "embed_dim": 64, "num_heads": 2, "head_dim": 32,
                                                 "seq_len": c.data.seq_len, "batch": c.data.global_batch_size,
                                                 "steps": args.steps, "settings": SETTINGS},
                                      "runs": deep},
               "precision": {"config": {"num_layers": 2, "embed_dim": 64, "steps": args.precision_steps,
                                        "growth_interval": 50, "inject_step": args.inject_step,
                                        "injected_scale": INJECTED_SCALE},
                             "max_abs_smoothed_loss_difference_vs_float32": agreement, "runs": mixed},
               "wall_s": time.perf_counter() - start, "device": jax.devices()[0].device_kind}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}/results.json, depth.png, training.png, precision.png in {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
