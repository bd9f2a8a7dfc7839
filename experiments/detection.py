"""DETR and Deformable DETR on the generated shapes, on a CPU budget: COCO mAP (pycocotools) and training curves.

    python -m experiments.detection [--detr-steps 2400] [--deformable-steps 800] [--detr-8x8-steps 800]
                                    [--variants detr deformable detr_8x8] [--merge] [--evals 6]
                                    [--out experiments/results/detection] [--small]

Trains experiments/configs/detr_shapes.py as DETR (model.deformable=False: the stride-8 map, 4x4 tokens), as
Deformable DETR (model.deformable=True, num_feature_levels=2: the stride-4 and stride-8 maps, 8x8 + 4x4
tokens) and as DETR on the stride-4 map ("detr_8x8": the backbone without its last stage, so the encoder reads
8x8 tokens, the deformable run's finest map: is Deformable DETR's lead per step its resolution?), each for its
number of steps (chosen so that each run takes about 10 minutes of a shared 2-core CPU: a deformable step costs
about 3 DETR steps there, the backward pass of the bilinear gathers), checkpointing --evals times.
--variants picks the runs; --merge keeps the other runs of an existing results.json in --out (and the hand-written
"## Reading" section of its results.md), so a run can be added without re-running the others. Then scores every
checkpoint by COCO mAP@[.5:.95], mAP@.5 and mAP@.75 over the whole test split
(`Detection.coco_metrics`), and draws test images with their objects and the final models' detections.
Writes results.json, results.md, curves.png (train and eval set loss, mAP and mAP@.5 against step) and
predictions.png (with --merge, predictions_<variants>.png of the runs trained now). --small: a tiny model and
data set for a few steps (a smoke test), written to a temporary folder unless --out is given.
"""

import argparse
import json
import os
import tempfile
import time

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.patches as patches
import matplotlib.pyplot as plt

from experiments.configs import detr_shapes
from jaxmodels.data import shapes
from jaxmodels.train.checkpoint import restore_params
from jaxmodels.train.loop import Trainer, train_and_evaluate
from jaxmodels.train.plot import read_metrics, series

VARIANTS = ("detr", "deformable", "detr_8x8")
SMALL = {"image_size": 16, "hidden_dim": 16, "num_heads": 2, "mlp_dim": 16, "num_encoder_layers": 1,
         "num_decoder_layers": 2, "num_queries": 4, "backbone_channels": (8, 8)}
COLOURS = ("tab:red", "tab:green", "tab:blue")  # per class: rectangle, ellipse, triangle
RUN_COLOURS = ("tab:blue", "tab:orange", "tab:purple")  # per run in the curves


def variant_config(variant: str, steps: int, evals: int, small: bool):
    """detr_shapes's config as DETR, Deformable DETR or DETR on the stride-4 map (the backbone without its last
    stage), checkpointed `evals` times over `steps` steps."""
    c = detr_shapes.get_config()
    c.model.deformable = variant == "deformable"
    c.model.num_feature_levels = 2
    every = max(-(-steps // evals), 1)  # ceil: `evals` checkpoints, the last at `steps`
    c.train.update(num_steps=steps, log_every=max(min(50, steps // 10), 1), eval_every=every, checkpoint_every=every,
                   keep_checkpoints=evals + 1)
    if small:
        c.model.update(SMALL)
        c.data.shapes.update(image_size=16, num_train=64, num_test=16, min_visible=4)
        c.data.update(global_batch_size=8, eval_batches=1)
        c.optimizer.warmup_steps = 1
    if variant == "detr_8x8":
        c.model.backbone_channels = tuple(c.model.backbone_channels)[:-1]
    return c


def train_and_score(config, workdir: str) -> dict:
    """Trains `config` in `workdir`, then scores each of its checkpoints by COCO metrics on the test split."""
    start = time.time()
    summary = train_and_evaluate(config, workdir)
    wall = time.time() - start
    trainer = Trainer(config, workdir)
    abstract = trainer.abstract_state["params"]
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    curve = []
    for step in steps:
        model = trainer.model(restore_params(workdir, abstract, step=step))
        agnostic = trainer.task.coco_metrics(model, use_categories=False)
        curve.append({"step": step, **trainer.task.coco_metrics(model), "agnostic_mAP": agnostic["mAP"],
                      "agnostic_mAP50": agnostic["mAP50"]})
    rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return {"model": model, "task": trainer.task, "wall_s": wall, "coco": curve, "summary": summary,
            "parameters": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract)),
            "train_loss": series(rows, "train/loss"), "eval_loss": series(rows, "eval/loss"),
            "train_step_s": float(np.median(series(rows, "train/step_time_s")[1] or [np.nan]))}


def plot_curves(results: dict, out: str) -> None:
    """Set loss, COCO AP against step, and mAP@.5 against the run's wall time; one colour per model. `results`: the
    runs' results as saved in results.json."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for (name, r), colour in zip(results.items(), RUN_COLOURS):
        axes[0].plot(*r["train_loss"], lw=0.6, alpha=0.5, color=colour, label=f"{name} train")
        axes[0].plot(*r["eval_loss"], "o-", color=colour, label=f"{name} eval (4 test batches)")
        steps = [c["step"] for c in r["coco"]]
        for key, style, what in (("mAP", "o-", "mAP@[.5:.95]"), ("mAP50", "s--", "mAP@.5"),
                                 ("agnostic_mAP50", "^:", "class-agnostic mAP@.5")):
            axes[1].plot(steps, [c[key] for c in r["coco"]], style, color=colour, label=f"{name} {what}")
        minutes = [s * r["wall_s"] / 60 / steps[-1] for s in steps]  # the run's mean pace, compile included
        axes[2].plot(minutes, [c["mAP50"] for c in r["coco"]], "s--", color=colour, label=f"{name} mAP@.5")
    axes[0].set(xlabel="step", ylabel="set loss (sum over decoder layers)", yscale="log", title="loss")
    axes[1].set(xlabel="step", ylabel="COCO AP (test split)", title="COCO AP against step")
    axes[2].set(xlabel="minutes (mean pace of the run)", ylabel="COCO AP (test split)", title="against wall time")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axes[2].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_predictions(results: dict, out: str, num_images: int = 8, threshold: float = 0.5) -> None:
    """Test images with their objects (dashed, black) and each model's detections scoring above `threshold`
    (solid, coloured by predicted class, with the score)."""
    task = next(iter(results.values()))["task"]
    arrays = shapes.load_split("test", task.config.data.data_dir, task.shapes_config)
    images = arrays["images"][:num_images]
    fig, axes = plt.subplots(len(results), num_images, figsize=(2 * num_images, 2.2 * len(results)), squeeze=False)
    for row, (name, r) in enumerate(results.items()):
        scores, labels, boxes = r["task"].predict(r["model"], images)
        for i, ax in enumerate(axes[row]):
            ax.imshow(images[i], interpolation="nearest")
            for box, valid in zip(arrays["boxes"][i], arrays["valid"][i]):
                if valid:
                    ax.add_patch(patches.Rectangle(box[:2] - 0.5, *(box[2:] - box[:2]), fill=False, ls="--", lw=1,
                                                   ec="black"))
            for score, label, box in zip(scores[i], labels[i], boxes[i]):
                if score > threshold:
                    ax.add_patch(patches.Rectangle(box[:2] - 0.5, *(box[2:] - box[:2]), fill=False, lw=1.5,
                                                   ec=COLOURS[label]))
                    ax.text(box[0] - 0.5, box[1] - 0.5, f"{score:.2f}", color=COLOURS[label], fontsize=6, va="bottom")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(name)
    fig.suptitle(f"dashed: objects; solid: detections with score > {threshold} (red rectangle, green ellipse, "
                 "blue triangle)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def command(args) -> str:
    """The command line that `args` (main's parsed arguments) stand for."""
    flags = [f"--detr-steps {args.detr_steps}", f"--deformable-steps {args.deformable_steps}",
             f"--detr-8x8-steps {args.detr_8x8_steps}"]
    chosen = [flag for variant, flag in zip(VARIANTS, flags) if variant in args.variants]
    if tuple(args.variants) != VARIANTS:
        chosen.append("--variants " + " ".join(args.variants))
    return " ".join(["python -m experiments.detection", *chosen, f"--evals {args.evals}"]
                    + ["--merge"] * args.merge)


def reading_section(text: str) -> str:
    """The hand-written "## Reading" section of a results.md (up to the first image or the end), or ""."""
    start = text.find("## Reading")
    if start < 0:
        return ""
    end = text.find("![", start)
    return text[start:end if end >= 0 else len(text)].rstrip() + "\n"


def markdown(results: dict, config, commands: list[str], predictions: list[str], reading: str = "") -> str:
    """results.md from the runs' results (as saved in results.json), the DETR run's config, the commands that made
    them, the predictions figures' file names and the hand-written reading (kept as given)."""
    d = config.data.shapes
    ran = " then ".join(f"`{c}`" for c in commands)
    lines = [
        "# DETR and Deformable DETR on the generated shapes (CPU)", "",
        f"{ran} on a 2-core CPU shared with other jobs (`nice -n 10`).", "",
        f"Data: `jaxmodels.data.shapes`, {d.image_size}x{d.image_size} images of {d.min_shapes}-{d.max_shapes} "
        f"rectangles, ellipses and triangles (sides {d.min_size:g}-{d.max_size:g} of the image, at least "
        f"{d.min_visible} visible pixels), {d.num_train} train and {d.num_test} test images. Model: "
        f"experiments/configs/detr_shapes.py (CNN backbone {tuple(config.model.backbone_channels)}, hidden "
        f"{config.model.hidden_dim}, {config.model.num_encoder_layers} encoder and {config.model.num_decoder_layers}"
        f" decoder layers, {config.model.num_queries} queries; DETR on the stride-8 map (4x4 tokens), Deformable DETR"
        f" on 2 levels, strides 4 and 8 (8x8 + 4x4 tokens), {config.model.num_points} points; detr_8x8: DETR on the "
        f"stride-4 map (8x8 tokens), its backbone without the last stage), batch {config.data.global_batch_size}, "
        f"AdamW lr {config.optimizer.learning_rate:g} cosine, clip {config.optimizer.grad_clip_norm:g}, DETR's loss "
        "(eos_coef 0.1, weights 1/5/2, auxiliary losses).", "",
        "COCO metrics by pycocotools over all test images (DETR's post-processing: every query is a detection).",
        "Class-agnostic: the same with the classes ignored (COCOeval useCats=0), how well the boxes alone do.", "",
        "| model | parameters | steps | wall (min) | median step (s) | mAP@[.5:.95] | mAP@.5 | mAP@.75 | AR@100 "
        "| class-agnostic mAP / mAP@.5 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        final = r["coco"][-1]
        lines.append(f"| {name} | {r['parameters']:,} | {final['step']} | {r['wall_s'] / 60:.1f} | "
                     f"{r['train_step_s']:.2f} | {final['mAP']:.3f} | {final['mAP50']:.3f} | {final['mAP75']:.3f} | "
                     f"{final['AR100']:.3f} | {final['agnostic_mAP']:.3f} / {final['agnostic_mAP50']:.3f} |")
    lines += ["", "Each checkpoint (mAP@[.5:.95] / mAP@.5 / mAP@.75; class-agnostic mAP@.5):", ""]
    for name, r in results.items():
        lines += [f"| {name} step | " + " | ".join(str(c["step"]) for c in r["coco"]) + " |",
                  "|---|" + "---|" * len(r["coco"]),
                  "| COCO AP | " + " | ".join(f"{c['mAP']:.3f} / {c['mAP50']:.3f} / {c['mAP75']:.3f}"
                                            for c in r["coco"]) + " |",
                  "| class-agnostic AP@.5 | " + " | ".join(f"{c['agnostic_mAP50']:.3f}" for c in r["coco"]) + " |", ""]
    if reading:
        lines += [reading]
    lines += ["![curves](curves.png)", ""]
    for name in predictions:
        lines += [f"![{name.removesuffix('.png')}]({name})", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detr-steps", type=int, default=2400)
    p.add_argument("--deformable-steps", type=int, default=800)
    p.add_argument("--detr-8x8-steps", type=int, default=800)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="the runs to train")
    p.add_argument("--merge", action="store_true",
                   help="keep the other runs of --out's results.json and its results.md's '## Reading' section")
    p.add_argument("--evals", type=int, default=6, help="checkpoints scored by COCO mAP per run")
    p.add_argument("--out", default=None, help="default experiments/results/detection (--small: a temporary folder)")
    p.add_argument("--small", action="store_true", help="a tiny model and data set for a few steps (smoke test)")
    args = p.parse_args(argv)
    args.variants = [v for v in VARIANTS if v in args.variants]
    if args.small:
        args.detr_steps = args.deformable_steps = args.detr_8x8_steps = 4
        args.evals = 2
    out = args.out or (tempfile.mkdtemp() if args.small else "experiments/results/detection")
    os.makedirs(out, exist_ok=True)
    before = {"results": {}, "commands": [], "predictions": []}
    if args.merge and os.path.exists(os.path.join(out, "results.json")):
        with open(os.path.join(out, "results.json")) as f:
            before = json.load(f)
        old = before.get("args")  # written before "commands" existed: its args stand for the command
        if "commands" not in before and old:
            before["commands"] = [command(argparse.Namespace(**{"variants": list(VARIANTS[:2]), "merge": False,
                                                                 "detr_8x8_steps": 0} | old))]
            before["predictions"] = ["predictions.png"]
    reading = ""
    if args.merge and os.path.exists(os.path.join(out, "results.md")):
        with open(os.path.join(out, "results.md")) as f:
            reading = reading_section(f.read())
    steps = dict(zip(VARIANTS, (args.detr_steps, args.deformable_steps, args.detr_8x8_steps)))
    results = {}
    for variant in args.variants:
        with tempfile.TemporaryDirectory() as workdir:
            results[variant] = train_and_score(variant_config(variant, steps[variant], args.evals, args.small),
                                               workdir)
        final = results[variant]["coco"][-1]
        print(f"{variant}: {final['step']} steps in {results[variant]['wall_s'] / 60:.1f} min, mAP {final['mAP']:.3f}"
              f", mAP@.5 {final['mAP50']:.3f}", flush=True)
    saved = {name: {k: v for k, v in r.items() if k not in ("model", "task", "summary")} | {
        "eval_end": r["summary"].get("eval_end"), "sample": r["summary"].get("sample")} for name, r in results.items()}
    saved = {name: saved.get(name, before["results"].get(name)) for name in VARIANTS
             if name in saved or name in before["results"]}
    # One predictions figure of the runs trained here, beside those of the runs kept from before.
    drawn = "predictions.png" if set(results) == set(saved) else f"predictions_{'_'.join(results)}.png"
    predictions = ([p for p in before["predictions"] if p != drawn] if drawn != "predictions.png" else []) + [drawn]
    commands = before["commands"] + [command(args)]
    plot_curves(saved, os.path.join(out, "curves.png"))
    plot_predictions(results, os.path.join(out, drawn))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "commands": commands, "predictions": predictions, "results": saved}, f,
                  indent=1)
    config = variant_config("detr", args.detr_steps, args.evals, args.small)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(saved, config, commands, predictions, reading))
    print(f"wrote {out}/results.md, results.json, curves.png, {drawn}")


if __name__ == "__main__":
    main()
