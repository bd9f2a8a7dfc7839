"""Promptable segmentation of the generated shapes by a small Segment-Anything model: mIoU from one point and
from one box.

    nice -n 10 python -m experiments.segmentation [--steps 1200] [--out experiments/results/segmentation]
                                                  [--set optimizer.learning_rate=2e-3 ...]

Trains experiments/configs/sam_shapes.py through `train_and_evaluate` (eval on 4 fixed test batches every
steps / 4), then evaluates every object of the 500 test images (`PromptableSegmentation.split_miou`) with one
prompt: the paper's single-point protocol (the point farthest from the mask boundary, the multimask output of
highest predicted IoU), a uniform point as in training, and the exact box (single-mask output); with the
best-of-three oracle for points and mIoU per shape class. Baselines over the same objects: the box itself as the
mask, and the whole image. Writes results.json, results.md, training_curves.png and predictions.png (test images
with the prompts, predicted and true masks).
"""

import argparse
import ast
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from flax import nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import patches

from experiments.configs import sam_shapes
from experiments.flows import train
from jaxmodels.data import shapes
from jaxmodels.ops.losses import mask_iou
from jaxmodels.ops.spatial import resize_bilinear
from jaxmodels.train.plot import read_metrics

KINDS = {"point": "one point (centre)", "random_point": "one point (uniform)", "box": "one box"}


def baselines(task) -> dict[str, dict]:
    """Over every test object, {"miou", "by_class"} of: answering a box with the box itself ("box_as_mask"), anything
    with the whole image ("whole_image"), and the true mask average-pooled to the decoder's resolution (4 x the
    embedding grid), upsampled bilinearly like the model's logits and thresholded at 1/2 ("resolution_ceiling": what
    the mask decoder's output resolution allows)."""
    arrays = shapes.load_split("test", task.config.data.data_dir, task.shapes_config)
    masks, boxes = arrays["masks"][arrays["valid"]], arrays["boxes"][arrays["valid"]]
    classes = arrays["classes"][arrays["valid"]]
    area = masks.sum((-2, -1))
    box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    size, low = masks.shape[-1], 4 * task.config.model.image_size // task.config.model.patch_size
    factor = size // low
    pooled = masks.reshape(len(masks), low, factor, low, factor).mean((2, 4))[..., None].astype(np.float32)
    restored = np.asarray(resize_bilinear(jnp.asarray(pooled), size))[..., 0] > 0.5
    ious = {"box_as_mask": area / box_area, "whole_image": area / masks[0].size,
            "resolution_ceiling": np.asarray(mask_iou(jnp.asarray(restored), jnp.asarray(masks)))}
    return {name: {"miou": float(v.mean()), "by_class": {c: float(v[classes == k].mean())
                                                         for k, c in enumerate(shapes.CLASSES)}}
            for name, v in ious.items()}


def plot_curves(rows, path):
    series = lambda key: ([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in ("loss", "mask_loss", "iou_mse"):
        axes[0].plot(*series(f"train/{key}"), lw=1, label=f"train {key}")
    axes[0].plot(*series("eval/loss"), "o-", label="eval loss")
    axes[0].set_yscale("log")
    axes[0].set_title("loss = 20 focal + dice + IoU MSE")
    for key in ("focal", "dice"):
        axes[1].plot(*series(f"train/{key}"), lw=1, label=f"train {key}")
    axes[1].set_yscale("log")
    axes[1].set_title("mask loss terms (chosen mask)")
    for key, label in (("miou_point", "point (uniform), best predicted IoU"), ("miou_box", "box, single mask"),
                       ("best_of_multimask_iou", "point, best of 3 (oracle)")):
        axes[2].plot(*series(f"train/{key}"), lw=1, alpha=0.5, label=f"train {label}")
        axes[2].plot(*series(f"eval/{key}"), "o-", label=f"eval {label}")
    axes[2].set_ylim(0, 1)
    axes[2].set_title("mIoU of the answering mask")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_predictions(task, model, path, num_images=8):
    """Rows: test images (the front-most object of each); columns: the centre point prompt (yellow star) and the
    box prompt (yellow box) with the predicted mask in red (its IoU and predicted IoU in the title), and the true
    mask."""
    arrays = shapes.load_split("test", task.config.data.data_dir, task.shapes_config)
    outputs = {}
    for kind in ("point", "box"):
        prompts = task.split_prompts("test", kind, num_images=num_images)
        outputs[kind] = (prompts, task.predict(model, "test", prompts))
    prompts = outputs["point"][0]
    first = [np.flatnonzero(prompts["image_index"] == i)[-1] for i in range(num_images)]  # the front-most object
    fig, axes = plt.subplots(num_images, 3, figsize=(7.5, 2.5 * num_images))
    for row, k in enumerate(first):
        image = arrays["images"][prompts["image_index"][k]]
        for col, kind in enumerate(("point", "box")):
            p, out = outputs[kind]
            ax = axes[row, col]
            ax.imshow(image)
            overlay = np.zeros((*image.shape[:2], 4))
            overlay[out["masks"][k]] = (1.0, 0.0, 0.0, 0.45)
            ax.imshow(overlay)
            if out["masks"][k].any():
                ax.contour(out["masks"][k], levels=[0.5], colors="red", linewidths=1.2)
            if kind == "point":
                ax.plot(p["points"][k, 0, 0] + 0.5, p["points"][k, 0, 1] + 0.5, "*", color="yellow", ms=12,
                        mec="black")
            else:
                x1, y1, x2, y2 = p["boxes"][k]
                ax.add_patch(patches.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, color="yellow",
                                               lw=1.5))
            ax.set_title(f"{kind}: IoU {out['iou'][k]:.2f} (pred {out['predicted_iou'][k]:.2f})", fontsize=8)
        axes[row, 2].imshow(prompts["targets"][k], cmap="gray")
        axes[row, 2].set_title(f"true mask ({shapes.CLASSES[prompts['classes'][k]]})", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_markdown(results, path):
    r, base, m = results["eval"], results["baselines"], results["config"]["model"]
    lines = [
        "# Promptable segmentation of the shapes (Segment Anything, small)", "",
        f"    nice -n 10 python -m experiments.segmentation --steps {results['train_steps']}"
        f"      # {results['train_seconds'] / 60:.1f} min training on the shared 2-core CPU", "",
        f"`experiments/configs/sam_shapes.py`: ViT encoder (patch {m['patch_size']}, {m['depth']} blocks of "
        f"{m['hidden_dim']}) + neck to {m['embed_dim']} channels, prompt",
        f"encoder with random Fourier features, two-way Transformer decoder ({m['decoder_depth']} blocks), 3 "
        "multimask outputs + 1",
        f"single-mask output + IoU head; {results['parameters']:,} parameters; batch "
        f"{results['config']['data']['global_batch_size']}, AdamW. Training prompts: a uniform",
        "point of a random object (multimask, least-loss mask back-propagated) or, half the time, its box jittered",
        "by 10% of its sides (single-mask output); loss 20·focal + dice + IoU MSE (`jaxmodels.tasks.segmentation`).",
        f"Evaluation: every object of the {results['test_images']} test images "
        f"({r['point']['num_objects']} objects), one prompt each, IoU of the",
        "answering mask (logits > 0) with the visible mask.", "",
        "| prompt | mIoU | best of 3 (oracle) | rectangle | ellipse | triangle |", "|---|---|---|---|---|---|"]
    for kind, label in KINDS.items():
        e = r[kind]
        oracle = f"{e['best_of_multimask_miou']:.3f}" if kind != "box" else "–"
        per = " | ".join(f"{e['miou_by_class'].get(c, float('nan')):.3f}" for c in shapes.CLASSES)
        lines.append(f"| {label} | **{e['miou']:.3f}** | {oracle} | {per} |")
    low = 4 * m["image_size"] // m["patch_size"]
    for name, label in (("box_as_mask", "baseline: the box as the mask"), ("whole_image", "baseline: the whole image"),
                        ("resolution_ceiling", f"ceiling: the true mask at the decoder's {low}x{low}")):
        per = " | ".join(f"{base[name]['by_class'][c]:.3f}" for c in shapes.CLASSES)
        lines.append(f"| {label} | {base[name]['miou']:.3f} | | {per} |")
    lines.append("")
    lines += results.get("notes", [])
    lines += ["", "![training curves](training_curves.png)", "", "![predictions](predictions.png)", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--out", default="experiments/results/segmentation")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config overrides, e.g. optimizer.learning_rate=2e-3 (values parsed as Python literals)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    config = sam_shapes.get_config()
    config.data.data_dir = args.data_dir
    for item in args.set:
        path, value = item.split("=", 1)
        *parents, leaf = path.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = ast.literal_eval(value)
    config.train.update(num_steps=args.steps, checkpoint_every=args.steps, eval_every=max(args.steps // 4, 1),
                        log_every=25)
    with tempfile.TemporaryDirectory() as workdir:
        trainer, model, summary, seconds = train(config, workdir)
        rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    task = trainer.task
    print(f"trained {args.steps} steps in {seconds:.0f} s", flush=True)
    start = time.time()
    evaluation = {kind: task.split_miou(model, "test", kind) for kind in KINDS}
    print({k: v["miou"] for k, v in evaluation.items()}, f"eval {time.time() - start:.0f} s", flush=True)
    parameters = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    results = {"train_steps": args.steps, "train_seconds": seconds, "parameters": parameters,
               "test_images": task.shapes_config.num_test, "eval": evaluation, "baselines": baselines(task),
               "eval_batches_end": summary["eval_end"], "config": config.to_dict()}
    path = os.path.join(args.out, "results.json")
    if os.path.exists(path):  # keep notes written by hand
        results["notes"] = json.load(open(path)).get("notes", [])
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    plot_curves(rows, os.path.join(args.out, "training_curves.png"))
    plot_predictions(task, model, os.path.join(args.out, "predictions.png"))
    write_markdown(results, os.path.join(args.out, "results.md"))


if __name__ == "__main__":
    main()
