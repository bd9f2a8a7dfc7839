"""Experiment: the attention scale and initialisation through depth (float32 / bfloat16 / float16 training is
experiments/precision.py).

    python -m experiments.init_scale [--steps 150] [--out experiments/results/init]

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
The runs are single-device loops over `make_train_step` with an eagerly built model: the trainer's jitted,
sharded initialiser takes ~30 s to compile for 24 layers on a CPU, eager construction a few seconds.
Writes OUT/results.json, OUT/depth.png and OUT/training.png. 6 min wall time (2.6 min of
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
from jaxmodels.ops.position import apply_rope
from jaxmodels.train.config import validate_config
from jaxmodels.train.loop import init_rngs
from jaxmodels.train.optimizer import learning_rate_schedule, make_optimizer
from jaxmodels.train.step import make_eval_step, make_train_step

SETTINGS = {"scaled": dict(logit_divisor="sqrt_head_dim", query_init="lecun"),
            "unscaled": dict(logit_divisor="none", query_init="lecun"),
            "t5": dict(logit_divisor="none", query_init="t5")}


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


def train(c, *, stats: bool = False) -> dict:
    """Train config `c` for c.train.num_steps steps on one device; the per-step train loss, the final eval
    metrics, and with `stats` the depth statistics at init."""
    task = validate_config(c, num_devices=1)
    model = task.build_model(init_rngs(c))
    graphdef, params = nnx.graphdef(model), nnx.state(model, nnx.Param).to_pure_dict()
    steps = c.train.num_steps
    optimizer = make_optimizer(c.optimizer, steps, lr_multipliers=model.lr_multipliers())  # muP's, or None
    step = jax.jit(make_train_step(graphdef, task.loss, optimizer, learning_rate_schedule(c.optimizer, steps)),
                   donate_argnums=0)
    out = {"depth": depth_statistics(model, jnp.asarray(task.eval_batches()[0]["tokens"][:, :-1]))} if stats else {}
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}
    batches, rows, start = task.train_batches(0, 0, 1), [], time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, next(batches))
        rows.append(metrics)
    rows = jax.device_get(rows)
    eval_step = jax.jit(make_eval_step(graphdef, task.loss))
    evaluation = task.combine_metrics([{k: float(v) for k, v in jax.device_get(eval_step(state["params"], b)).items()}
                                       for b in task.eval_batches()])
    out.update(loss=[float(r["loss"]) for r in rows], nonfinite=[int(r["nonfinite"]) for r in rows],
               eval_loss=evaluation["loss"], eval_bits_per_byte=evaluation["bits_per_byte"],
               wall_s=time.perf_counter() - start)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps of each 24-layer model")
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
    results = {"depth_and_training": {"config": {"num_layers": 24, "embed_dim": 64, "num_heads": 2, "head_dim": 32,
                                                 "seq_len": c.data.seq_len, "batch": c.data.global_batch_size,
                                                 "steps": args.steps, "settings": SETTINGS},
                                      "runs": deep},
               "wall_s": time.perf_counter() - start, "device": jax.devices()[0].device_kind}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}/results.json, depth.png, training.png in {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
