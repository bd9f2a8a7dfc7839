"""The detection task: COCO evaluation on hand-made cases, DETR's post-processing, targets, and the set loss with
auxiliary outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import detr_shapes
from jaxmodels.ops.losses import detr_set_loss
from jaxmodels.tasks import make_task
from jaxmodels.tasks.detection import coco_detections, coco_evaluate, coco_ground_truth, postprocess, to_targets
from tests.tiny import apply_overrides

# Two 32x32 images: image 1 has a 10x10 box of class 0 and a 8x12 box of class 2, image 2 a 6x6 box of class 1.
BOXES = np.array([[[0, 0, 10, 10], [20, 10, 28, 22]], [[5, 5, 11, 11], [0, 0, 0, 0]]], np.float32)
LABELS = np.array([[0, 2], [1, 0]])
VALID = np.array([[True, True], [True, False]])


def evaluate(scores, labels, boxes):
    truth = coco_ground_truth(BOXES, LABELS, VALID, 32, 3)
    return coco_evaluate(truth, coco_detections(np.asarray(scores), np.asarray(labels), np.asarray(boxes)))


def test_perfect_detections_score_one():
    m = evaluate([[0.9, 0.8], [0.7, 0.0]], LABELS, BOXES)
    np.testing.assert_allclose([m["mAP"], m["mAP50"], m["mAP75"], m["AR100"]], 1.0, rtol=1e-12)
    # An extra false positive ranked below every true one does not lower AP; ranked above, it halves AP of its class.
    low = evaluate([[0.9, 0.8], [0.7, 0.05]], [[0, 2], [1, 1]], [BOXES[0], [[5, 5, 11, 11], [20, 20, 26, 26]]])
    np.testing.assert_allclose(low["mAP"], 1.0, rtol=1e-12)
    high = evaluate([[0.9, 0.8], [0.7, 0.95]], [[0, 2], [1, 1]], [BOXES[0], [[5, 5, 11, 11], [20, 20, 26, 26]]])
    np.testing.assert_allclose(high["mAP"], (1 + 1 + 0.5) / 3)


def test_a_shifted_box_passes_the_iou_thresholds_below_its_iou():
    """The 10x10 box shifted 2 pixels right: IoU = 8·10 / (12·10) = 2/3, above the thresholds 0.5 .. 0.65 (4 of 10)
    and below 0.7 .. 0.95; the other classes are perfect. So class 0 has AP 0.4, the mean over classes (1 + 1 +
    0.4) / 3; at IoU 0.5 every class has AP 1 and at 0.75 class 0 has 0."""
    shifted = BOXES.copy()
    shifted[0, 0] = [2, 0, 12, 10]
    m = evaluate([[0.9, 0.8], [0.7, 0.0]], LABELS, shifted)
    np.testing.assert_allclose(m["mAP"], (1 + 1 + 0.4) / 3, rtol=1e-6)
    np.testing.assert_allclose(m["mAP50"], 1.0, rtol=1e-12)
    np.testing.assert_allclose(m["mAP75"], 2 / 3, rtol=1e-6)
    assert evaluate(np.zeros((2, 0)), np.zeros((2, 0), int), np.zeros((2, 0, 4)))["mAP"] == 0.0  # no detections


def test_wrong_classes_score_zero_but_class_agnostic_one():
    wrong = (LABELS + 1) % 3
    assert evaluate([[0.9, 0.8], [0.7, 0.0]], wrong, BOXES)["mAP"] == 0.0
    truth = coco_ground_truth(BOXES, LABELS, VALID, 32, 3)
    agnostic = coco_evaluate(truth, coco_detections(np.asarray([[0.9, 0.8], [0.7, 0.0]]), wrong, BOXES),
                             use_categories=False)
    np.testing.assert_allclose(agnostic["mAP"], 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="valid"):
        coco_ground_truth(BOXES, LABELS, VALID[:, :1], 32, 3)


def test_postprocess_and_targets():
    rng = np.random.default_rng(0)
    logits, boxes = rng.normal(size=(2, 5, 4)).astype(np.float32), rng.uniform(0.2, 0.6, (2, 5, 4)).astype(np.float32)
    scores, labels, xyxy = jax.jit(postprocess, static_argnums=2)(logits, boxes, 32)
    prob = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(scores, prob[..., :3].max(-1), rtol=1e-5)
    np.testing.assert_array_equal(labels, prob[..., :3].argmax(-1))
    np.testing.assert_allclose(xyxy, 32 * np.concatenate([boxes[..., :2] - boxes[..., 2:] / 2,
                                                          boxes[..., :2] + boxes[..., 2:] / 2], -1), rtol=1e-5)
    targets = to_targets({"inputs": np.zeros((2, 32, 32, 3)), "boxes": BOXES, "classes": LABELS, "valid": VALID}, 32)
    np.testing.assert_allclose(targets["boxes"][0, 1], [24 / 32, 16 / 32, 8 / 32, 12 / 32])
    assert targets["labels"].dtype == np.int32 and targets["valid"] is VALID


def small_config(data_dir, **overrides):
    return apply_overrides(detr_shapes.get_config(), {
        "model.image_size": 16, "model.hidden_dim": 16, "model.num_heads": 2, "model.mlp_dim": 16,
        "model.num_encoder_layers": 1, "model.num_decoder_layers": 2, "model.num_queries": 4,
        "model.backbone_channels": (8, 8), "data.shapes.image_size": 16, "data.shapes.num_train": 16,
        "data.shapes.num_test": 8, "data.shapes.min_visible": 4, "data.global_batch_size": 4, "data.data_dir": data_dir,
        **overrides})


def test_loss_sums_the_decoder_outputs_set_losses_and_has_finite_gradients(tmp_path):
    task = make_task(small_config(str(tmp_path)))
    batch = jax.tree.map(jnp.asarray, next(task.train_batches(0, 0, 1)))
    assert batch["inputs"].shape == (4, 16, 16, 3) and batch["boxes"].shape == (4, 3, 4)
    assert batch["valid"].any(1).all() and batch["labels"].dtype == jnp.int32
    rng = np.random.default_rng(0)  # two decoder outputs of 4 queries, as a model gives them
    logits, raw_boxes = jnp.asarray(rng.normal(size=(2, 4, 4, 4)), jnp.float32), jnp.asarray(
        rng.normal(size=(2, 4, 4, 4)), jnp.float32)

    def loss(logits, raw_boxes):
        out = {"logits": logits, "boxes": jax.nn.sigmoid(raw_boxes)}
        total, metrics = task.set_losses(out, batch)
        per_layer = [detr_set_loss(out["logits"][d], out["boxes"][d], batch["labels"], batch["boxes"], batch["valid"])
                     for d in range(2)]
        return total, (metrics, per_layer)

    (total, (metrics, per_layer)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(logits, raw_boxes)
    np.testing.assert_allclose(total, per_layer[0]["loss"] + per_layer[1]["loss"], rtol=1e-5)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        np.testing.assert_allclose(metrics[name], per_layer[1][name], rtol=1e-5)
    assert 0 <= metrics["class_error"] <= 100 and metrics["cardinality_error"] >= 0
    assert all(np.isfinite(g).all() and np.abs(g[d]).sum() > 0 for g in grads for d in range(2))  # aux layers too
    task.config.detr.aux_loss = False
    np.testing.assert_allclose(jax.jit(loss)(logits, raw_boxes)[0], per_layer[1]["loss"], rtol=1e-5)


@pytest.mark.parametrize("overrides,match", [
    ({"model.image_size": 32}, "config.model.image_size=32 must be config.data.shapes.image_size=16"),
    ({"model.num_queries": 2}, "num_queries=2 must be at least"),
    ({"data.shapes.max_size": 2.0}, "config.data.shapes: max_size"),
    ({"detr.eos_coef": -0.1}, "config.detr.eos_coef"),
    ({"data.eval_seed": 0}, "eval_seed"),
])
def test_bad_configs_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_task(small_config(None, **overrides))
