"""Object detection as set prediction (DETR, Carion et al. 2020) on the generated shapes, evaluated with COCO mAP.

Loss. Each decoder output of the model ({"logits": (D, B, Q, C + 1), "boxes": (D, B, Q, 4) normalised cxcywh})
is matched to the image's objects by the Hungarian algorithm and scored by DETR's set loss
(`ops.losses.detr_set_loss`: weighted cross entropy with "no object" weight eos_coef, L1 and GIoU box losses,
weights 1, 5, 2); with config.detr.aux_loss the losses of the D - 1 earlier decoder outputs are added (DETR's
auxiliary decoding losses, §3.2), each matched on its own. Targets are the data's pixel xyxy boxes divided by
the image size, as cxcywh. Logged: loss (the sum), loss_ce, loss_bbox, loss_giou (the last decoder output's),
class_error (DETR's: 100 - accuracy of the matched predictions' classes, %) and cardinality_error (DETR's: the
mean |#predictions not "no object" - #objects| per image). loss_bbox and loss_giou are per-batch sums over
objects divided by the batch's objects, as DETR's, so a batch's metrics weigh images with more objects more.

Evaluation. COCO's detection metrics with pycocotools, the field's standard evaluator: DETR's post-processing
(every query a detection, with score max_c p(c) over the object classes and that class, its box scaled to pixels)
over a whole split, `COCOeval(iouType="bbox")`: mAP = AP averaged over IoU thresholds 0.50:0.05:0.95 and mAP50
= AP at IoU 0.5, areas "all", at most 100 detections per image.
"""

import contextlib
import functools
import io

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxmodels.data import shapes
from jaxmodels.ops.boxes import box_cxcywh_to_xyxy
from jaxmodels.ops.checks import one_of, positive_int, real_in_range
from jaxmodels.ops.losses import detr_set_loss
from jaxmodels.tasks.base import Task

DATA = ("shapes",)
COCO_STATS = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "AR1", "AR10", "AR100", "AR_small",
              "AR_medium", "AR_large")  # the order of COCOeval.stats


def postprocess(logits: jax.Array, boxes: jax.Array, image_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """DETR's `PostProcess`: (scores, labels, pixel boxes) of every query. logits (..., Q, C + 1) (the last logit
    "no object"), boxes (..., Q, 4) normalised cxcywh -> scores (..., Q) = max_c softmax(logits)[c] over the C
    object classes, labels (..., Q) int32 their argmax, boxes (..., Q, 4) xyxy in pixels of an image_size image."""
    prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :-1]
    return prob.max(-1), prob.argmax(-1).astype(jnp.int32), box_cxcywh_to_xyxy(boxes.astype(jnp.float32)) * image_size


def coco_ground_truth(boxes, labels, valid, image_size: int, num_classes: int) -> dict:
    """The COCO-format data set (a dict as `COCO().dataset`) of N images: boxes (N, M, 4) xyxy pixels, labels (N, M)
    int in [0, num_classes), valid (N, M) bool. Image ids 1..N, category ids label + 1, annotation ids from 1 (COCOeval
    treats id 0 as unmatched), area the box's, iscrowd 0."""
    boxes, labels, valid = np.asarray(boxes, np.float64), np.asarray(labels), np.asarray(valid, bool)
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:2] or valid.shape != labels.shape:
        raise ValueError(f"need boxes (N, M, 4), labels (N, M) and valid (N, M), got {boxes.shape}, {labels.shape} "
                         f"and {valid.shape}")
    annotations = []
    for i, j in zip(*np.nonzero(valid)):
        x0, y0, x1, y1 = boxes[i, j]
        annotations.append({"id": len(annotations) + 1, "image_id": int(i) + 1, "category_id": int(labels[i, j]) + 1,
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    return {"images": [{"id": i + 1, "width": image_size, "height": image_size} for i in range(len(boxes))],
            "annotations": annotations,
            "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}


def coco_detections(scores, labels, boxes) -> list[dict]:
    """COCO result entries of N images' detections: scores (N, K), labels (N, K) int (category label + 1), boxes
    (N, K, 4) xyxy pixels; image ids 1..N, boxes as [x, y, w, h]."""
    scores, labels, boxes = np.asarray(scores, np.float64), np.asarray(labels), np.asarray(boxes, np.float64)
    if boxes.shape != scores.shape + (4,) or labels.shape != scores.shape or scores.ndim != 2:
        raise ValueError(f"need scores (N, K), labels (N, K) and boxes (N, K, 4), got {scores.shape}, "
                         f"{labels.shape} and {boxes.shape}")
    return [{"image_id": i + 1, "category_id": int(labels[i, k]) + 1, "score": float(scores[i, k]),
             "bbox": [boxes[i, k, 0], boxes[i, k, 1], boxes[i, k, 2] - boxes[i, k, 0], boxes[i, k, 3] - boxes[i, k, 1]]}
            for i in range(scores.shape[0]) for k in range(scores.shape[1])]


def coco_evaluate(ground_truth: dict, detections: list[dict], *, use_categories: bool = True) -> dict[str, float]:
    """pycocotools' COCOeval (iouType "bbox") of `detections` against `ground_truth`: {name: value} for COCO_STATS
    (-1 where a statistic has no ground truth, e.g. no large objects). No detections give 0 for every AP and AR.
    `use_categories=False` ignores the classes (COCOeval's useCats = 0: class-agnostic AP, localisation alone).
    pycocotools' printing is swallowed."""
    from pycocotools.coco import COCO  # the evaluator of the COCO benchmark; imported on first use
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return dict.fromkeys(COCO_STATS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
        evaluator.params.useCats = int(use_categories)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(COCO_STATS, evaluator.stats)}


def to_targets(batch: dict, image_size: int) -> dict:
    """A batch of `data.shapes` -> the model's batch: {"inputs", "boxes" float32 (B, M, 4) normalised cxcywh,
    "labels" int32 (B, M), "valid" bool (B, M)} (masks dropped)."""
    xyxy = np.asarray(batch["boxes"], np.float32) / image_size
    cxcywh = np.concatenate([(xyxy[..., :2] + xyxy[..., 2:]) / 2, xyxy[..., 2:] - xyxy[..., :2]], axis=-1)
    return {"inputs": batch["inputs"], "boxes": cxcywh.astype(np.float32), "labels": batch["classes"].astype(np.int32),
            "valid": batch["valid"]}


class Detection(Task):
    """DETR training and COCO evaluation on the shapes (module docstring).

    Config sections: model (a detector returning {"logits", "boxes"} per decoder layer, e.g. "detr"; its
    image_size and num_classes must be the data's, in_channels 3), data (name "shapes"; shapes: the arguments of
    `data.shapes.make_config`; global_batch_size, seed, eval_seed, eval_batches, data_dir), detr (eos_coef,
    class_weight, bbox_weight, giou_weight, aux_loss), sample (coco_split: the split `sample` scores by COCO mAP).
    """

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        d, m = config.data, config.model
        one_of("config.data.name", d.name, DATA)
        self.shapes_config = shapes.config_from_section(d.shapes)
        if m.image_size != self.shapes_config.image_size:
            raise ValueError(f"config.model.image_size={m.image_size} must be config.data.shapes.image_size="
                             f"{self.shapes_config.image_size}")
        if m.num_classes != shapes.NUM_CLASSES or m.in_channels != 3:
            raise ValueError(f"config.model.num_classes must be {shapes.NUM_CLASSES} (the shapes' classes) and "
                             f"config.model.in_channels 3, got {m.num_classes} and {m.in_channels}")
        if m.num_queries < self.shapes_config.max_shapes:
            raise ValueError(f"config.model.num_queries={m.num_queries} must be at least config.data.shapes."
                             f"max_shapes={self.shapes_config.max_shapes}: each object needs its own query")
        for name in ("eos_coef", "class_weight", "bbox_weight", "giou_weight"):
            real_in_range(f"config.detr.{name}", config.detr[name], 0)
        if not isinstance(config.detr.aux_loss, bool):
            raise ValueError(f"config.detr.aux_loss must be True or False, got {config.detr.aux_loss!r}")
        one_of("config.sample.coco_split", config.sample.coco_split, shapes.SPLITS)
        if d.eval_seed == d.seed:
            raise ValueError(f"config.data.eval_seed must differ from config.data.seed={d.seed}")

    @property
    def image_size(self) -> int:
        return self.shapes_config.image_size

    def set_losses(self, outputs: dict, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss, metrics) of the model's outputs (module docstring); loss sums the decoder outputs' set losses."""
        c = self.config.detr
        weights = dict(eos_coef=c.eos_coef, class_weight=c.class_weight, bbox_weight=c.bbox_weight,
                       giou_weight=c.giou_weight)
        num_outputs = outputs["logits"].shape[0]
        total = 0.0
        for d in range(num_outputs) if c.aux_loss else (num_outputs - 1,):
            parts = detr_set_loss(outputs["logits"][d], outputs["boxes"][d], batch["labels"], batch["boxes"],
                                  batch["valid"], **weights)
            total = total + parts["loss"]
        logits, matching = outputs["logits"][-1], parts["col_for_row"]
        matched = matching >= 0
        target = jnp.take_along_axis(batch["labels"], jnp.maximum(matching, 0), axis=1)
        correct = jnp.sum(matched & (jnp.argmax(logits, -1) == target))
        class_error = 100.0 * (1.0 - correct / jnp.maximum(jnp.sum(matched), 1))
        predicted = jnp.sum(jnp.argmax(logits, -1) != logits.shape[-1] - 1, axis=-1)
        cardinality = jnp.mean(jnp.abs(predicted - jnp.sum(batch["valid"], axis=-1)).astype(jnp.float32))
        metrics = {"loss": total, "loss_ce": parts["loss_ce"], "loss_bbox": parts["loss_bbox"],
                   "loss_giou": parts["loss_giou"], "class_error": class_error.astype(jnp.float32),
                   "cardinality_error": cardinality}
        return total, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    def loss(self, model: nnx.Module, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
        """DETR's set loss of `model(batch["inputs"])` (module docstring). batch: see `abstract_batch`."""
        return self.set_losses(model(batch["inputs"]), batch)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """inputs float32 (B, S, S, 3) in [-1, 1]; boxes float32 (B, M, 4) normalised cxcywh; labels int32 (B, M);
        valid bool (B, M); M = data.shapes.max_shapes."""
        b, s, m = self.config.data.global_batch_size, self.image_size, self.shapes_config.max_shapes
        return {"inputs": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
                "boxes": jax.ShapeDtypeStruct((b, m, 4), jnp.float32),
                "labels": jax.ShapeDtypeStruct((b, m), jnp.int32), "valid": jax.ShapeDtypeStruct((b, m), jnp.bool_)}

    def train_batches(self, start_step: int, process_index: int, process_count: int):
        d = self.config.data
        source = shapes.batches("train", d.seed, d.global_batch_size, process_index, process_count,
                                start_step=start_step, data_dir=d.data_dir, config=self.shapes_config)
        return (to_targets(b, self.image_size) for b in source)

    def eval_batches(self) -> list[dict]:
        """data.eval_batches batches of the test split, shuffled by data.eval_seed."""
        d = self.config.data
        return [to_targets(shapes.batch("test", d.eval_seed, i, d.global_batch_size, data_dir=d.data_dir,
                                        config=self.shapes_config), self.image_size) for i in range(d.eval_batches)]

    def predict(self, model: nnx.Module, images: np.ndarray, batch_size: int = 250) -> tuple[np.ndarray, ...]:
        """DETR's detections of uint8 images (N, S, S, 3): (scores (N, Q), labels (N, Q), xyxy pixel boxes
        (N, Q, 4)) as NumPy, jitted, in batches of `batch_size`."""
        positive_int("batch_size", batch_size)
        run = _compiled_postprocess(nnx.graphdef(model), self.image_size)
        state = nnx.state(model)
        parts = [jax.device_get(run(state, jnp.asarray(shapes.to_unit_range(images[i:i + batch_size]))))
                 for i in range(0, len(images), batch_size)]
        return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))

    def coco_metrics(self, model: nnx.Module, split: str = "test", *, use_categories: bool = True) -> dict[str, float]:
        """COCO detection metrics (COCO_STATS) of `model` over every image of `split` (module docstring);
        class-agnostic with `use_categories=False` (`coco_evaluate`)."""
        arrays = shapes.load_split(one_of("split", split, shapes.SPLITS), self.config.data.data_dir,
                                   self.shapes_config)
        scores, labels, boxes = self.predict(model, arrays["images"])
        truth = coco_ground_truth(arrays["boxes"], arrays["classes"], arrays["valid"], self.image_size,
                                  shapes.NUM_CLASSES)
        return coco_evaluate(truth, coco_detections(scores, labels, boxes), use_categories=use_categories)

    def baseline(self) -> dict[str, float]:
        """The mean number of objects per test image (the cardinality error of predicting none)."""
        valid = shapes.load_split("test", self.config.data.data_dir, self.shapes_config)["valid"]
        return {"objects_per_image": float(valid.sum(1).mean())}

    def sample(self, model: nnx.Module, seed: int) -> str:
        """COCO mAP@[.5:.95] and mAP@.5 over every image of sample.coco_split."""
        del seed
        split = self.config.sample.coco_split
        m = self.coco_metrics(model, split)
        count = self.shapes_config.num_test if split == "test" else self.shapes_config.num_train
        return (f"COCO bbox on the {split} split ({count} images): mAP@[.5:.95] {m['mAP']:.3f}, mAP@.5 "
                f"{m['mAP50']:.3f}, mAP@.75 {m['mAP75']:.3f}, AR@100 {m['AR100']:.3f}")


@functools.lru_cache(maxsize=8)
def _compiled_postprocess(graphdef, image_size: int):
    def run(state, x):
        out = nnx.merge(graphdef, state)(x)
        return postprocess(out["logits"][-1], out["boxes"][-1], image_size)

    return jax.jit(run)
