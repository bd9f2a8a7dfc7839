r"""Promptable segmentation (Segment Anything, Kirillov et al. 2023, §3 and App. A) on the generated shapes
(`jaxmodels.data.shapes`).

Each training example is one image, one of its objects drawn uniformly, and one prompt for it:
  - a point, uniform over the object's visible mask (the paper's first prompt: "a foreground point sampled
    uniformly from the ground truth mask"), labelled foreground, answered by the three multimask outputs;
  - or, with probability config.segmentation.box_fraction, its box (the box of the visible mask), each coordinate
    moved by Gaussian noise of standard deviation box_jitter x the box side (the paper: 10% of the side, at most
    20 pixels, here at most max_box_jitter pixels), answered by the single-mask output (box_multimask=False: a box
    is not ambiguous; True: the multimask outputs).
Points and boxes travel in one batch as two prompt points: [point, padding] with labels [1, -1], or the box
corners with labels [2, 3] (`jaxmodels.models.sam`).

Loss (§3, "Losses and training"): the mask loss 20·focal + 1·dice (`sigmoid_focal_loss` averaged over the
pixels, `dice_loss`), plus the mean-square error between each predicted IoU and the IoU of that mask (logits
> 0) with the object; with multimask output only the mask of lowest mask loss is back-propagated, and the IoU
head is regressed for all three (so that it can rank them at inference). No iterative point sampling, no mask
prompts (the paper's 11-round interactive training).

Evaluation (`split_miou`): every object of the test split with one prompt, the mean IoU of the predicted mask
(logits > 0) against the visible mask: "point" the paper's single-point protocol (§7.1: the point farthest
from the mask's boundary, its interior distance-transform maximum), "random_point" a uniform one as in
training, both taking the multimask output of highest predicted IoU; "box" the exact box with the single-mask
output. The eval metrics of a run are the same on data.eval_batches fixed test batches (half points, half
boxes).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from scipy import ndimage

from jaxmodels.data import shapes
from jaxmodels.models.sam import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, FOREGROUND, PADDING
from jaxmodels.ops.checks import non_negative_int, one_of, positive_int, real_in_range
from jaxmodels.ops.losses import dice_loss, mask_iou, sigmoid_focal_loss
from jaxmodels.tasks.base import Task

DATA = ("shapes",)
PROMPTS = ("point", "random_point", "box")


def sam_loss(masks: jax.Array, iou_predictions: jax.Array, targets: jax.Array, multimask: jax.Array, *,
             focal_weight: float = 20.0, dice_weight: float = 1.0, iou_weight: float = 1.0,
             focal_alpha: float | None = 0.25, focal_gamma: float = 2.0) -> dict[str, jax.Array]:
    """Segment Anything's training loss of one prompt per example (§3; module docstring), per example.

    masks: (B, M + 1, H, W) mask logits of every mask token (mask 0 the single-mask output, 1.. the multimask
    outputs, `SAM.decode`); iou_predictions: (B, M + 1); targets: (B, H, W) in {0, 1}; multimask: (B,) bool, which
    output answers each example. Returns per-example float32 (B,) arrays: "loss" = mask_loss + iou_weight·iou_mse,
    "mask_loss" (focal_weight·focal + dice_weight·dice of the chosen mask), "focal", "dice", "iou_mse" (over the
    multimask outputs, or the single one), and "chosen" int32 (B,) (the mask answering: 0, or the multimask
    output of least mask loss), "iou" (the chosen mask's actual IoU) and "predicted_iou" (its predicted IoU).
    Gradients reach only the chosen mask through the mask loss; the actual IoUs are constants.
    """
    if masks.ndim != 4 or targets.shape != (masks.shape[0], *masks.shape[2:]) or masks.shape[1] < 2 \
            or iou_predictions.shape != masks.shape[:2] or multimask.shape != masks.shape[:1]:
        raise ValueError(f"need masks (B, M + 1, H, W) with M >= 1, iou_predictions (B, M + 1), targets (B, H, W), "
                         f"multimask (B,); got {masks.shape}, {iou_predictions.shape}, {targets.shape}, "
                         f"{multimask.shape}")
    t = jnp.broadcast_to(targets[:, None].astype(jnp.float32), masks.shape)
    focal = jnp.mean(sigmoid_focal_loss(masks, t, alpha=focal_alpha, gamma=focal_gamma), axis=(-2, -1))  # (B, M+1)
    dice = dice_loss(masks, t)
    mask_loss = focal_weight * focal + dice_weight * dice
    actual_iou = jax.lax.stop_gradient(mask_iou(masks > 0, t > 0.5))
    squared = jnp.square(iou_predictions.astype(jnp.float32) - actual_iou)
    best_multi = 1 + jnp.argmin(jax.lax.stop_gradient(mask_loss[:, 1:]), axis=1)
    chosen = jnp.where(multimask, best_multi, 0).astype(jnp.int32)
    pick = lambda a: jnp.take_along_axis(a, chosen[:, None], axis=1)[:, 0]
    iou_mse = jnp.where(multimask, jnp.mean(squared[:, 1:], axis=1), squared[:, 0])
    return {"loss": pick(mask_loss) + iou_weight * iou_mse, "mask_loss": pick(mask_loss), "focal": pick(focal),
            "dice": pick(dice), "iou_mse": iou_mse, "chosen": chosen, "iou": pick(actual_iou),
            "predicted_iou": pick(iou_predictions.astype(jnp.float32))}


def predicted_mask_choice(iou_predictions: jax.Array, multimask: jax.Array) -> jax.Array:
    """The mask answering each example at inference: 0 (single-mask output) or 1 + the argmax of the predicted
    IoU over the multimask outputs. iou_predictions (B, M + 1), multimask (B,) bool -> (B,) int32."""
    return jnp.where(multimask, 1 + jnp.argmax(iou_predictions[:, 1:], axis=1), 0).astype(jnp.int32)


def centre_point(mask: np.ndarray) -> np.ndarray:
    """The (x, y) pixel of `mask` (bool (H, W), non-empty) farthest from its boundary: the maximum of the Euclidean
    distance transform of the mask padded with background (the image edge counts as boundary); the first in
    row-major order on ties. Segment Anything's single-point evaluation prompt (§7.1)."""
    if not mask.any():
        raise ValueError("mask must have at least one pixel")
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(np.argmax(distance), mask.shape)
    return np.array([col, row], np.float32)


def random_point(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A uniform (x, y) pixel of `mask` (bool (H, W), non-empty)."""
    rows, cols = np.nonzero(mask)
    k = rng.integers(len(rows))
    return np.array([cols[k], rows[k]], np.float32)


def jitter_box(rng: np.random.Generator, box: np.ndarray, fraction: float, max_pixels: float,
               image_size: int) -> np.ndarray:
    """box (4,) xyxy with each coordinate moved by N(0, (fraction · side)²) noise clipped to ±max_pixels (side: the
    box's width for x, height for y; Segment Anything App. A), then clipped to the image and ordered so that
    x2 >= x1 and y2 >= y1."""
    side = np.array([box[2] - box[0], box[3] - box[1]] * 2, np.float64)
    noise = np.clip(rng.normal(size=4) * fraction * side, -max_pixels, max_pixels)
    out = np.clip(box + noise, 0, image_size)
    return np.concatenate([np.minimum(out[:2], out[2:]), np.maximum(out[:2], out[2:])]).astype(np.float32)


def prompt_points(kind: str, mask: np.ndarray, box: np.ndarray, rng: np.random.Generator | None = None, *,
                  jitter: float = 0.0, max_jitter: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """One object's prompt as two prompt points (points (2, 2) float32, labels (2,) int32): "point" (`centre_point`)
    or "random_point" (`random_point`, needs `rng`) -> [point, padding], labels [1, -1]; "box" -> its corners,
    labels [2, 3], jittered (`jitter_box`) when jitter > 0."""
    one_of("kind", kind, PROMPTS)
    if kind == "box":
        if jitter > 0:
            box = jitter_box(rng, box, jitter, max_jitter, mask.shape[0])
        return np.asarray(box, np.float32).reshape(2, 2), np.array([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], np.int32)
    point = centre_point(mask) if kind == "point" else random_point(rng, mask)
    return np.stack([point, np.zeros(2, np.float32)]), np.array([FOREGROUND, PADDING], np.int32)


class PromptableSegmentation(Task):
    """Trains a promptable segmenter (`jaxmodels.models.sam.SAM`) on the shapes (module docstring).

    Config sections used: model ("sam"; image_size must be data.shapes.image_size, in_channels 3), data (name
    "shapes"; shapes: the arguments of `shapes.make_config`; global_batch_size, seed, eval_seed, eval_batches,
    data_dir), segmentation (box_fraction, box_jitter, max_box_jitter, box_multimask, focal_weight, dice_weight,
    iou_weight, focal_alpha, focal_gamma), sample (num_images: test images of the end-of-run summary).
    Batches: {"inputs" float32 (B, S, S, 3) in [-1, 1], "targets" float32 (B, S, S) in {0, 1}, "points" float32
    (B, 2, 2), "point_labels" int32 (B, 2), "multimask" bool (B,)}.
    Metrics: loss, mask_loss, focal, dice, iou_mse; miou_point and miou_box (the IoU of the mask answering at
    inference, weighted by num_point_prompts / num_box_prompts); best_of_multimask_iou (the oracle over the
    multimask outputs, point prompts).
    """

    metric_weights = {"miou_point": "num_point_prompts", "miou_box": "num_box_prompts",
                      "best_of_multimask_iou": "num_point_prompts"}

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        d, s = config.data, config.segmentation
        one_of("config.data.name", d.name, DATA)
        self.shapes_config = shapes.config_from_section(d.shapes)
        real_in_range("config.segmentation.box_fraction", s.box_fraction, 0, 1)
        real_in_range("config.segmentation.box_jitter", s.box_jitter, 0)
        real_in_range("config.segmentation.max_box_jitter", s.max_box_jitter, 0)
        for name in ("focal_weight", "dice_weight", "iou_weight", "focal_gamma"):
            real_in_range(f"config.segmentation.{name}", s[name], 0)
        if s.focal_alpha is not None:
            real_in_range("config.segmentation.focal_alpha", s.focal_alpha, 0, 1)
        if not isinstance(s.box_multimask, bool):
            raise TypeError(f"config.segmentation.box_multimask must be a bool, got {s.box_multimask!r}")
        positive_int("config.sample.num_images", config.sample.num_images)
        non_negative_int("config.data.seed", d.seed)
        if d.eval_seed == d.seed:
            raise ValueError(f"config.data.eval_seed must differ from config.data.seed={d.seed}")
        size = self.shapes_config.image_size
        if config.model.image_size != size or config.model.in_channels != 3:
            raise ValueError(f"config.model.image_size={config.model.image_size} and in_channels="
                             f"{config.model.in_channels} must be the shapes' {size} and 3 (RGB)")

    # ------------------------------------------------------------------------------------------
    # Batches
    # ------------------------------------------------------------------------------------------

    def _examples(self, images: dict, kinds: list[str], rng: np.random.Generator, *, jitter: bool) -> dict:
        """One random object per image and its prompt of the given kind."""
        s = self.config.segmentation
        out = {"targets": [], "points": [], "point_labels": []}
        for i, kind in enumerate(kinds):
            k = rng.choice(np.flatnonzero(images["valid"][i]))
            mask = images["masks"][i, k]
            points, labels = prompt_points(kind, mask, images["boxes"][i, k], rng,
                                           jitter=s.box_jitter if jitter else 0.0, max_jitter=s.max_box_jitter)
            out["targets"].append(mask)
            out["points"].append(points)
            out["point_labels"].append(labels)
        multimask = np.array([kind != "box" or s.box_multimask for kind in kinds])
        return {"inputs": images["inputs"], "targets": np.stack(out["targets"]).astype(np.float32),
                "points": np.stack(out["points"]), "point_labels": np.stack(out["point_labels"]),
                "multimask": multimask}

    def _batch(self, split: str, seed: int, step: int, process_index: int, process_count: int) -> dict:
        d = self.config.data
        images = shapes.batch(split, seed, step, d.global_batch_size, process_index, process_count,
                              data_dir=d.data_dir, config=self.shapes_config)
        n = len(images["inputs"])
        first = process_index * n  # this process's rows of the global batch
        rng = np.random.default_rng([seed, step, first, 0x5A])
        if split == "train":
            kinds = ["box" if rng.uniform() < self.config.segmentation.box_fraction else "random_point"
                     for _ in range(n)]
        else:  # fixed: alternate, so that every eval batch holds both kinds
            kinds = ["random_point" if (first + i) % 2 == 0 else "box" for i in range(n)]
        return self._examples(images, kinds, rng, jitter=split == "train")

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        b, size = self.config.data.global_batch_size, self.shapes_config.image_size
        return {"inputs": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32),
                "targets": jax.ShapeDtypeStruct((b, size, size), jnp.float32),
                "points": jax.ShapeDtypeStruct((b, 2, 2), jnp.float32),
                "point_labels": jax.ShapeDtypeStruct((b, 2), jnp.int32),
                "multimask": jax.ShapeDtypeStruct((b,), jnp.bool_)}

    def train_batches(self, start_step: int, process_index: int, process_count: int):
        seed = self.config.data.seed
        return (self._batch("train", seed, step, process_index, process_count)
                for step in itertools.count(start_step))

    def eval_batches(self) -> list[dict]:
        """data.eval_batches fixed batches of the test split (seed data.eval_seed), alternately a random point and
        an exact box."""
        d = self.config.data
        return [self._batch("test", d.eval_seed, i, 0, 1) for i in range(d.eval_batches)]

    # ------------------------------------------------------------------------------------------
    # Loss and metrics
    # ------------------------------------------------------------------------------------------

    def loss(self, model: nnx.Module, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`sam_loss` of the batch's prompts, averaged over the examples (module docstring)."""
        s = self.config.segmentation
        masks, iou = model.decode(model.encode(batch["inputs"]), batch["points"], batch["point_labels"])
        terms = sam_loss(masks, iou, batch["targets"], batch["multimask"], focal_weight=s.focal_weight,
                         dice_weight=s.dice_weight, iou_weight=s.iou_weight, focal_alpha=s.focal_alpha,
                         focal_gamma=s.focal_gamma)
        metrics = {k: jnp.mean(terms[k]) for k in ("loss", "mask_loss", "focal", "dice", "iou_mse")}
        answer = predicted_mask_choice(iou, batch["multimask"])
        answered = jnp.take_along_axis(mask_iou(masks > 0, jnp.broadcast_to(batch["targets"][:, None] > 0.5,
                                                                               masks.shape)), answer[:, None], 1)[:, 0]
        is_point = batch["point_labels"][:, 0] == FOREGROUND
        best = jnp.max(mask_iou(masks[:, 1:] > 0, jnp.broadcast_to(batch["targets"][:, None] > 0.5,
                                                                    masks[:, 1:].shape)), axis=1)
        num_point, num_box = jnp.sum(is_point, dtype=jnp.float32), jnp.sum(~is_point, dtype=jnp.float32)
        ratio = lambda values, where, count: jnp.sum(jnp.where(where, values, 0.0)) / jnp.maximum(count, 1.0)
        metrics.update(miou_point=ratio(answered, is_point, num_point), miou_box=ratio(answered, ~is_point, num_box),
                       best_of_multimask_iou=ratio(best, is_point, num_point), num_point_prompts=num_point,
                       num_box_prompts=num_box)
        return metrics["loss"], metrics

    # ------------------------------------------------------------------------------------------
    # Whole-split evaluation, baselines and samples
    # ------------------------------------------------------------------------------------------

    def split_prompts(self, split: str, kind: str, *, num_images: int | None = None, seed: int = 0) -> dict:
        """Every object of the first `num_images` images (default all) of `split` with one prompt of `kind`
        (PROMPTS; "random_point" draws from `seed`): {"image_index" int (K,), "targets" bool (K, S, S), "points"
        (K, 2, 2), "point_labels" (K, 2), "multimask" bool (K,), "boxes" (K, 4), "classes" (K,)}."""
        one_of("kind", kind, PROMPTS)
        arrays = shapes.load_split(split, self.config.data.data_dir, self.shapes_config)
        count = len(arrays["images"]) if num_images is None else min(num_images, len(arrays["images"]))
        image_index, k = np.nonzero(arrays["valid"][:count])
        rng = np.random.default_rng([seed, 0x5B])
        prompts = [prompt_points(kind, arrays["masks"][i, j], arrays["boxes"][i, j], rng)
                   for i, j in zip(image_index, k)]
        multimask = kind != "box" or self.config.segmentation.box_multimask
        return {"image_index": image_index, "targets": arrays["masks"][image_index, k],
                "points": np.stack([p for p, _ in prompts]), "point_labels": np.stack([lab for _, lab in prompts]),
                "multimask": np.full(len(k), multimask), "boxes": arrays["boxes"][image_index, k],
                "classes": arrays["classes"][image_index, k]}

    def predict(self, model: nnx.Module, split: str, prompts: dict, *, batch_size: int = 128) -> dict[str, np.ndarray]:
        """The answering masks of `prompts` (`split_prompts`): {"masks" bool (K, S, S), "logits" float32 (K, S, S),
        "predicted_iou" (K,), "iou" (K,) against the targets, "best_iou" (K,) the best of the multimask outputs}.
        Each image is encoded once per batch of its prompts; batches of `batch_size` prompts (the last padded)."""
        images = shapes.to_unit_range(shapes.load_split(split, self.config.data.data_dir, self.shapes_config)["images"])
        run = _compiled_predict(nnx.graphdef(model))
        state = nnx.state(model)
        total = len(prompts["image_index"])
        outputs = []
        for start in range(0, total, batch_size):
            rows = np.minimum(np.arange(start, start + batch_size), total - 1)  # pad with the last prompt
            batch = {k: prompts[k][rows] for k in ("points", "point_labels", "multimask", "targets")}
            out = run(state, jnp.asarray(images[prompts["image_index"][rows]]), batch)
            keep = min(batch_size, total - start)
            outputs.append({k: np.asarray(v)[:keep] for k, v in out.items()})
        return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}

    def split_miou(self, model: nnx.Module, split: str = "test", kind: str = "point", *,
                   num_images: int | None = None, seed: int = 0) -> dict[str, float]:
        """mIoU over every object of `split` (first `num_images` images) with one `kind` prompt (module docstring):
        {"miou", "best_of_multimask_miou" (the oracle, for multimask answers), "num_objects", "miou_by_class"
        (shape class name -> mIoU)}."""
        prompts = self.split_prompts(split, kind, num_images=num_images, seed=seed)
        out = self.predict(model, split, prompts)
        by_class = {name: float(np.mean(out["iou"][prompts["classes"] == c]))
                    for c, name in enumerate(shapes.CLASSES) if np.any(prompts["classes"] == c)}
        return {"miou": float(np.mean(out["iou"])), "best_of_multimask_miou": float(np.mean(out["best_iou"])),
                "num_objects": int(len(out["iou"])), "miou_by_class": by_class}

    def baseline(self) -> dict[str, float]:
        """mIoU on the first 100 test images of answering a box prompt with the box itself (1 for rectangles,
        about π/4 for ellipses and 1/2 for triangles) and of answering a point with the whole image."""
        arrays = shapes.load_split("test", self.config.data.data_dir, self.shapes_config)
        valid = arrays["valid"][:100]
        masks, boxes = arrays["masks"][:100][valid], arrays["boxes"][:100][valid]
        area = masks.sum((-2, -1))
        box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return {"box_as_mask_miou": float(np.mean(area / box_area)),
                "whole_image_miou": float(np.mean(area / masks[0].size))}

    def sample(self, model: nnx.Module, seed: int) -> str:
        """mIoU from one point (centre and random) and one box over every object of the first sample.num_images
        test images."""
        n = self.config.sample.num_images
        parts = []
        for kind in PROMPTS:
            r = self.split_miou(model, "test", kind, num_images=n, seed=seed)
            parts.append(f"{kind} {r['miou']:.3f}")
        return f"test mIoU over the objects of {n} images, one prompt each: " + ", ".join(parts)


@functools.lru_cache(maxsize=8)
def _compiled_predict(graphdef):
    def run(state, images, batch):
        model = nnx.merge(graphdef, state)
        masks, iou = model.decode(model.encode(images), batch["points"], batch["point_labels"])
        answer = predicted_mask_choice(iou, batch["multimask"])
        chosen = jnp.take_along_axis(masks, answer[:, None, None, None], axis=1)[:, 0]
        targets = batch["targets"]
        all_iou = mask_iou(masks > 0, jnp.broadcast_to(targets[:, None], masks.shape))
        predicted = jnp.take_along_axis(iou, answer[:, None], 1)[:, 0]
        return {"masks": chosen > 0, "logits": chosen, "predicted_iou": predicted,
                "iou": mask_iou(chosen > 0, targets), "best_iou": jnp.max(all_iou[:, 1:], axis=1)}

    return jax.jit(run)
