"""Experiment: train short, test long (Press et al. 2022) with training-free RoPE extensions.

    python -m experiments.length_extrapolation [--train_length 256] [--steps 400] \
        [--out experiments/results/length_extrapolation]

1. Trains two byte-level LMs at context `--train_length` on the embedded corpus: softmax attention
   with RoPE (experiments/configs/lm_softmax.py) and with ALiBi (lm_alibi.py); each run resumes
   from its checkpoint under OUT/runs/.
2. Evaluates both on validation sequences of every length in `--eval_lengths`, with no further
   training. The RoPE model is evaluated with each context-extension method, factor
   s = eval length / train length: plain RoPE, position interpolation ("linear"), NTK-aware,
   dynamic NTK, YaRN (with its attention temperature), log-n scaling on plain RoPE and on YaRN,
   and ReRoPE / Leaky ReRoPE (window `--rerope_window`). The ALiBi model is evaluated as is.
3. Writes OUT/results.json (mean eval bits/byte per method and length, and the per-position
   curve at the longest length), OUT/results.md (table) and OUT/length_extrapolation.png.
"""

import argparse
import importlib
import json
import os

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
from flax import nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from jaxmodels.data import lm as lm_data
from jaxmodels.data.tokenizers import ByteTokenizer
from jaxmodels.models import make_model
from jaxmodels.ops.losses import softmax_cross_entropy
from jaxmodels.train.loop import Trainer, train_and_evaluate

# method -> (model, attention overrides at eval time; "factor" is replaced by s = length / train length)
METHODS = {
    "rope": ("rope", {}),
    "pi (linear)": ("rope", dict(rope_scaling="linear", rope_factor="factor")),
    "ntk": ("rope", dict(rope_scaling="ntk", rope_factor="factor")),
    "dynamic_ntk": ("rope", dict(rope_scaling="dynamic_ntk", rope_factor=1.0)),
    "yarn": ("rope", dict(rope_scaling="yarn", rope_factor="factor")),
    "rope + log-n": ("rope", dict(log_n=True)),
    "yarn + log-n": ("rope", dict(rope_scaling="yarn", rope_factor="factor", log_n=True)),
    "rerope": ("rope", dict(position="rerope")),
    "leaky rerope": ("rope", dict(position="rerope", rerope_leaky=16.0)),
    "alibi": ("alibi", {}),
}


def train(name: str, train_length: int, steps: int, tokens_per_step: int, workdir: str):
    config = importlib.import_module(f"experiments.configs.lm_{name}").get_config()
    config.data.update(seq_len=train_length, global_batch_size=tokens_per_step // train_length)
    config.train.update(num_steps=steps, eval_every=0, checkpoint_every=100)
    config.model.attention.train_length = train_length
    train_and_evaluate(config, workdir)
    return config


def trained_params(config, workdir: str):
    step, state = Trainer(config, workdir).restore_or_init()
    if step != config.train.num_steps:
        raise RuntimeError(f"{workdir} holds step {step}, expected the finished run ({config.train.num_steps})")
    return state["params"]


def per_position_bits(config, params, overrides: dict, batches: list[np.ndarray]) -> np.ndarray:
    """Mean bits/byte at each position (L,) of the validation batches (B, L + 1), with the model's
    attention section updated by `overrides`."""
    variant = config.model.copy_and_resolve_references()
    variant.attention.update(overrides)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_model(variant, nnx.Rngs(0))))

    @jax.jit
    def bits(params, batch):
        logits = nnx.merge(graphdef, nnx.State(params))(batch[:, :-1])
        return jnp.mean(softmax_cross_entropy(logits, batch[:, 1:]), axis=0) / jnp.log(2.0)

    return np.mean([np.asarray(bits(params, b)) for b in batches], axis=0)


def evaluate(configs, params, args) -> dict:
    longest = max(args.eval_lengths)
    results = {"train_length": args.train_length, "steps": args.steps, "mean_bits_per_byte": {}, "per_position": {}}
    for length in args.eval_lengths:
        data = ml_collections.ConfigDict({**configs["rope"].data.to_dict(), "seq_len": length})
        batches = [lm_data.lm_batch(data, ByteTokenizer(), split="validation", global_batch_size=args.eval_batch_size,
                                    seed=1, step=step)["tokens"] for step in range(args.eval_batches)]
        for method, (model, overrides) in METHODS.items():
            overrides = {k: (length / args.train_length if v == "factor" else v) for k, v in overrides.items()}
            if "rerope" in method:
                overrides["rerope_window"] = args.rerope_window
            curve = per_position_bits(configs[model], params[model], overrides, batches)
            results["mean_bits_per_byte"].setdefault(method, {})[length] = float(curve.mean())
            if length == longest:
                results["per_position"][method] = [round(float(x), 4) for x in curve]
            print(f"{method:14} length {length:5d}: {curve.mean():.3f} bits/byte", flush=True)
    return results


def table(results: dict) -> str:
    lengths = sorted({int(n) for v in results["mean_bits_per_byte"].values() for n in v})
    lines = ["| method | " + " | ".join(f"@{n}" for n in lengths) + " |", "|" + " --- |" * (1 + len(lengths))]
    for method, by_length in results["mean_bits_per_byte"].items():
        by_length = {int(k): v for k, v in by_length.items()}
        lines.append(f"| {method} | " + " | ".join(f"{by_length[n]:.3f}" for n in lengths) + " |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for method, by_length in results["mean_bits_per_byte"].items():
        lengths = sorted(int(n) for n in by_length)
        left.plot(lengths, [by_length[n] if n in by_length else by_length[str(n)] for n in lengths], "o-",
                  label=method)
        curve = np.asarray(results["per_position"][method])
        window = 64
        smooth = np.convolve(curve, np.ones(window) / window, mode="valid")
        right.plot(np.arange(len(smooth)) + window // 2, smooth, label=method)
    for ax in (left, right):
        ax.axvline(results["train_length"], color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
    left.set(xlabel="eval length", ylabel="mean eval bits/byte", title="mean over all positions")
    right.set(xlabel="position", ylabel="bits/byte (64-position average)",
              title=f"per position at length {len(results['per_position']['rope'])}")
    left.legend(fontsize=8)
    fig.suptitle(f"Trained at {results['train_length']} bytes; evaluated longer without training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_length", type=int, default=256)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--tokens_per_step", type=int, default=4096)
    p.add_argument("--eval_lengths", default="256,512,1024,2048,4096")
    p.add_argument("--eval_batch_size", type=int, default=2)
    p.add_argument("--eval_batches", type=int, default=2)
    p.add_argument("--rerope_window", type=int, default=64)
    p.add_argument("--out", default="experiments/results/length_extrapolation")
    args = p.parse_args()
    args.eval_lengths = [int(n) for n in args.eval_lengths.split(",")]
    configs, params = {}, {}
    for name in ("rope", "alibi"):
        workdir = os.path.join(args.out, "runs", name)
        configs[name] = train("softmax" if name == "rope" else name, args.train_length, args.steps,
                              args.tokens_per_step, workdir)
        params[name] = trained_params(configs[name], workdir)
    results = evaluate(configs, params, args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table(results) + "\n")
    plot(results, os.path.join(args.out, "length_extrapolation.png"))
    print(table(results))


if __name__ == "__main__":
    main()
