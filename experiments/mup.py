"""Experiment: maximal update parametrisation (muP; Yang et al. 2021, "Tensor Programs V: Tuning Large Neural Networks
via Zero-Shot Hyperparameter Transfer") against standard parametrisation on the decoder LM.

    python -m experiments.mup [--widths 64 128 256] [--base_width 64] [--steps 200] [--out experiments/results/mup]

Models: lm_tiny's blocks (RMSNorm, RoPE, SwiGLU, GQA) at width w: embed_dim w, 4 query heads and 2 key/value heads of
head_dim w / 4, mlp_dim 3 w (`model_fields`; lm_tiny is w = 128), --num_layers blocks, trained on the embedded
byte corpus (batch 8 x 64 bytes, AdamW with lm_tiny's betas, weight decay 0.1, clipping at 1, 20 warmup steps then
cosine decay; `experiments.init_scale.config`). muP (`model.parametrization="mup"`, `model.mup_base_width`
--base_width): attention logits q·k / head_dim, the logits times base_width / w with the readout's init variance
1 / base_width, hidden matrices' Adam learning rate times base_width / w (DecoderLM, `lr_multipliers`).

Part 1, coordinate check (TP-V sec. 3 / the `mup` package's coord check): for widths --coord_widths, the mean
absolute value of a coordinate of the embedding output, of each block's output (residual stream) and of the logits
on a fixed batch, at steps 0..--coord_steps of AdamW at the constant learning rate --coord_lr (no warmup, no
decay). Under standard parametrisation the activations after a few steps grow with width; under muP they stay put.
Part 2, learning-rate transfer (TP-V Fig. 1): final eval loss after --steps steps against the peak learning rate
(--lrs) for each width, standard vs muP: muP's best learning rate should stay where the base width has it, while
standard parametrisation's moves (usually down) as the model widens.
Writes OUT/results.json, OUT/results.md, OUT/coord_check.png and OUT/lr_transfer.png.
Measured (experiments/results/mup/, defaults): coordinate check, block 2 at step 5 grows 2.5 -> 43 from width 32 to
256 in standard parametrisation and stays 2.2-2.5 under muP; best learning rate for widths 64/128/256: standard
1e-2/3e-3/3e-3, muP 1e-2/1e-2/3e-2 (at 256 within 0.012 nats of 1e-2). 23 min wall (581 s of CPU time) on the 2-core
CPU development machine shared with other jobs (load ~12).
"""

import argparse
import functools
import json
import math
import os
import time

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from experiments.init_scale import config, train
from jaxmodels.train.config import validate_config
from jaxmodels.train.loop import init_rngs
from jaxmodels.train.optimizer import learning_rate_schedule, make_optimizer
from jaxmodels.train.step import make_train_step

PARAMETRIZATIONS = ("standard", "mup")


def model_fields(width: int) -> dict:
    """The `model` overrides of lm_tiny's shape at `width` (a multiple of 4): 4 heads (2 for keys and values) of
    width / 4, MLP 3 width."""
    if width % 4:
        raise ValueError(f"width must be a multiple of 4 (4 heads of width / 4), got {width}")
    return {"model.embed_dim": width, "model.num_heads": 4, "model.num_kv_heads": 2, "model.head_dim": width // 4,
            "model.mlp_dim": 3 * width}


def width_config(parametrization: str, width: int, *, base_width: int, learning_rate: float, steps: int,
                 num_layers: int, **fields):
    """`experiments.init_scale.config` (lm_tiny, batch 8 x 64) at `width` in `parametrization`, trained `steps`
    steps at peak `learning_rate`; `fields`: further dotted overrides."""
    return config(**model_fields(width), **{
        "model.num_layers": num_layers, "model.parametrization": parametrization, "model.mup_base_width": base_width,
        "optimizer.learning_rate": learning_rate, "train.num_steps": steps, **fields})


def activation_scales(model, tokens) -> dict[str, jax.Array]:
    """Mean |coordinate| of a DecoderLM's (RoPE or no positions) embedding output, each block's output ("block_1",
    ...) and logits on tokens (B, T): the `mup` package's coordinate-check statistic."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = model.embed(tokens)
    out = {"embedding": jnp.mean(jnp.abs(x))}
    for i, block in enumerate(model.blocks):
        x = block(x, positions)[0]
        out[f"block_{i + 1}"] = jnp.mean(jnp.abs(x))
    out["logits"] = jnp.mean(jnp.abs(model(tokens)))
    return out


def _scales_of_params(graphdef, tokens, params):
    return activation_scales(nnx.merge(graphdef, params), tokens)


def coordinate_check(parametrization: str, widths, *, base_width: int, steps: int, learning_rate: float,
                     num_layers: int) -> dict[int, dict[str, list[float]]]:
    """For each width: {layer: [mean |coordinate| at steps 0..steps]} (`activation_scales` on the first eval batch)
    while training with AdamW at a constant `learning_rate` (no warmup), batches of the corpus."""
    out = {}
    for width in widths:
        c = width_config(parametrization, width, base_width=base_width, learning_rate=learning_rate, steps=steps,
                         num_layers=num_layers, **{"optimizer.warmup_steps": 0, "optimizer.schedule": "constant"})
        task = validate_config(c, num_devices=1)
        model = task.build_model(init_rngs(c))
        graphdef, params = nnx.graphdef(model), nnx.state(model, nnx.Param).to_pure_dict()
        optimizer = make_optimizer(c.optimizer, steps, lr_multipliers=model.lr_multipliers())
        step = jax.jit(make_train_step(graphdef, task.loss, optimizer, learning_rate_schedule(c.optimizer, steps)))
        tokens = jnp.asarray(task.eval_batches()[0]["tokens"][:, :-1])
        scales = jax.jit(functools.partial(_scales_of_params, graphdef, tokens))
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}
        batches, rows = task.train_batches(0, 0, 1), [scales(params)]
        for _ in range(steps):
            state, _ = step(state, next(batches))
            rows.append(scales(state["params"]))
        rows = jax.device_get(rows)
        names = ["embedding", *(f"block_{i + 1}" for i in range(len(model.blocks))), "logits"]
        out[width] = {name: [float(r[name]) for r in rows] for name in names}
    return out


def lr_sweep(parametrization: str, widths, lrs, *, base_width: int, steps: int, num_layers: int) -> dict:
    """{width: {"eval_loss": [per lr], "train_loss": [mean of the last 10 steps, per lr]}} after `steps` steps at
    each peak learning rate of `lrs` (`experiments.init_scale.train`); a diverged run's losses are NaN or inf."""
    out = {}
    for width in widths:
        runs = [train(width_config(parametrization, width, base_width=base_width, learning_rate=lr, steps=steps,
                                   num_layers=num_layers)) for lr in lrs]
        out[width] = {"eval_loss": [r["eval_loss"] for r in runs],
                      "train_loss": [float(np.mean(r["loss"][-10:])) for r in runs],
                      "wall_s": [r["wall_s"] for r in runs]}
        print(f"{parametrization:8s} width {width:4d} eval loss " +
              " ".join(f"{lr:.0e}:{loss:.3f}" for lr, loss in zip(lrs, out[width]["eval_loss"])), flush=True)
    return out


def best_lr(lrs, losses) -> float | None:
    """The learning rate of the lowest finite loss (None when every run diverged)."""
    finite = [(loss, lr) for lr, loss in zip(lrs, losses) if math.isfinite(loss)]
    return min(finite)[1] if finite else None


def plot_coordinate_check(coord: dict, path: str, learning_rate: float) -> None:
    layers = list(next(iter(coord["standard"].values())))
    shown = [layers[0], layers[-2], layers[-1]]  # embedding, last block, logits
    fig, axes = plt.subplots(2, len(shown), figsize=(5 * len(shown), 8), squeeze=False)
    for row, parametrization in enumerate(PARAMETRIZATIONS):
        by_width = coord[parametrization]
        widths = sorted(by_width)
        steps = len(by_width[widths[0]][shown[0]])
        for ax, layer in zip(axes[row], shown):
            for t in range(steps):
                ax.plot(widths, [by_width[w][layer][t] for w in widths], marker="o",
                        color=plt.cm.viridis(t / max(steps - 1, 1)), label=f"t={t}")
            ax.set(xscale="log", yscale="log", xlabel="width (embed_dim)", ylabel="mean |coordinate|",
                   title=f"{parametrization}: {layer}")
            ax.set_xticks(widths, [str(w) for w in widths])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.suptitle(f"Coordinate check: activation size vs width at AdamW steps t (lr {learning_rate:g}); flat = "
                 "width-independent")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lr_transfer(sweep: dict, lrs, path: str, steps: int) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    finite = [v for p in sweep.values() for w in p.values() for v in w["eval_loss"] if math.isfinite(v)]
    for ax, parametrization in zip(axes, PARAMETRIZATIONS):
        for width, r in sorted(sweep[parametrization].items()):
            losses = [v if math.isfinite(v) else np.nan for v in r["eval_loss"]]
            line, = ax.plot(lrs, losses, marker="o", label=f"width {width}")
            best = best_lr(lrs, r["eval_loss"])
            if best is not None:
                ax.plot([best], [min(v for v in r["eval_loss"] if math.isfinite(v))], "*", ms=14,
                        color=line.get_color())
        ax.set(xscale="log", xlabel="peak learning rate", title=f"{parametrization} (star: best)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    axes[0].set_ylabel(f"eval loss after {steps} steps (nats/byte)")
    if finite:
        low = min(finite)
        axes[0].set_ylim(low - 0.05, min(max(finite), low + 1.5) + 0.05)
    fig.suptitle("Learning-rate transfer across width")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def results_markdown(results: dict) -> str:
    """results.md: the setting, the coordinate check at the last step and the learning-rate sweep as tables."""
    s, coord, sweep, lrs = results["settings"], results["coordinate_check"], results["lr_transfer"], results["lrs"]
    lines = ["# muP vs standard parametrisation on the decoder LM", "",
             "Written by `python -m experiments.mup` (experiments/mup.py; its docstring has the setting). "
             f"Device: {results['device']}; wall time {results['wall_s']:.0f} s.", "",
             f"Models: lm_tiny's blocks, {s['num_layers']} layers, embed_dim w, 4 heads of w/4, mlp 3w; muP base "
             f"width {s['base_width']}.", "",
             f"## Coordinate check (AdamW, constant lr {s['coord_lr']:g}, mean |coordinate| on one eval batch)", ""]
    last = s["coord_steps"]
    layers = list(next(iter(coord["standard"].values())))
    lines += ["| parametrization | width | " + " | ".join(f"{k} t=0 | {k} t={last}" for k in layers) + " |",
              "|---|---|" + "---|---|" * len(layers)]
    for parametrization in PARAMETRIZATIONS:
        for width, r in coord[parametrization].items():
            lines.append(f"| {parametrization} | {width} | " +
                         " | ".join(f"{r[k][0]:.3f} | {r[k][last]:.3f}" for k in layers) + " |")
    lines += ["", f"## Learning-rate transfer: eval loss (nats/byte) after {s['steps']} steps", "",
              "| parametrization | width | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |",
              "|---|---|" + "---|" * len(lrs) + "---|"]
    for parametrization in PARAMETRIZATIONS:
        for width, r in sweep[parametrization].items():
            lines.append(f"| {parametrization} | {width} | " + " | ".join(f"{v:.3f}" for v in r["eval_loss"]) +
                         f" | {best_lr(lrs, r['eval_loss'])} |")
    return "\n".join(lines) + "\n"


def run(out: str, *, widths=(64, 128, 256), base_width: int = 64, lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
        steps: int = 200, num_layers: int = 2, coord_widths=(32, 64, 128, 256), coord_steps: int = 5,
        coord_lr: float = 1e-2) -> dict:
    """Both parts; writes OUT/results.json, results.md, coord_check.png, lr_transfer.png and returns the results."""
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    coord = {p: coordinate_check(p, coord_widths, base_width=coord_widths[0], steps=coord_steps,
                                 learning_rate=coord_lr, num_layers=num_layers) for p in PARAMETRIZATIONS}
    sweep = {p: lr_sweep(p, widths, lrs, base_width=base_width, steps=steps, num_layers=num_layers)
             for p in PARAMETRIZATIONS}
    results = {"settings": {"widths": list(widths), "base_width": base_width, "steps": steps, "num_layers": num_layers,
                            "coord_widths": list(coord_widths), "coord_base_width": coord_widths[0],
                            "coord_steps": coord_steps, "coord_lr": coord_lr},
               "lrs": list(lrs), "coordinate_check": coord, "lr_transfer": sweep,
               "best_lr": {p: {w: best_lr(lrs, r["eval_loss"]) for w, r in sweep[p].items()} for p in sweep},
               "wall_s": time.perf_counter() - start, "device": jax.devices()[0].device_kind}
    plot_coordinate_check(coord, os.path.join(out, "coord_check.png"), coord_lr)
    plot_lr_transfer(sweep, list(lrs), os.path.join(out, "lr_transfer.png"), steps)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(results_markdown(results))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--base_width", type=int, default=64, help="muP's base width of the learning-rate sweep")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    parser.add_argument("--steps", type=int, default=200, help="training steps of each sweep run")
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--coord_widths", type=int, nargs="+", default=[32, 64, 128, 256],
                        help="coordinate-check widths; the first is muP's base there")
    parser.add_argument("--coord_steps", type=int, default=5)
    parser.add_argument("--coord_lr", type=float, default=1e-2)
    parser.add_argument("--out", default="experiments/results/mup")
    args = parser.parse_args()
    results = run(args.out, widths=tuple(args.widths), base_width=args.base_width, lrs=tuple(args.lrs),
                  steps=args.steps, num_layers=args.num_layers, coord_widths=tuple(args.coord_widths),
                  coord_steps=args.coord_steps, coord_lr=args.coord_lr)
    print(f"best lr per width: {results['best_lr']}")
    print(f"wrote {args.out}/results.json, results.md, coord_check.png, lr_transfer.png in {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
