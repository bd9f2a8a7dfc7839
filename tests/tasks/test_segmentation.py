"""The promptable-segmentation task: the SAM loss (focal + dice + IoU MSE) against float64 NumPy with its
least-loss selection and gradients, the prompts (centre point, uniform point, jittered box), the batches, and the
config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import sam_shapes
from jaxmodels.data import shapes
from jaxmodels.tasks import make_task
from jaxmodels.tasks.segmentation import (
    centre_point,
    jitter_box,
    predicted_mask_choice,
    prompt_points,
    sam_loss,
)
from tests.tiny import apply_overrides

TINY = {"data.shapes.image_size": 16, "data.shapes.num_train": 12, "data.shapes.num_test": 6,
        "data.shapes.min_visible": 2, "data.global_batch_size": 6, "data.eval_batches": 2, "model.image_size": 16,
        "model.patch_size": 4, "model.hidden_dim": 16, "model.depth": 1, "model.num_heads": 2, "model.mlp_dim": 16,
        "model.embed_dim": 16, "model.decoder_depth": 1, "model.decoder_num_heads": 2, "model.decoder_mlp_dim": 16,
        "model.iou_head_hidden_dim": 16}


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _reference(masks, iou_pred, targets, multimask):
    """Per example, float64: each mask's 20·focal (α = 0.25, γ = 2, mean over pixels) + dice (+1 smoothing), the
    least of the multimask ones (or mask 0), and the IoU MSE over the answering output(s)."""
    out = []
    for m, pred, t, multi in zip(masks.astype(np.float64), iou_pred, targets, multimask):
        losses, ious = [], []
        for logits in m:
            p = _sigmoid(logits)
            ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
            p_t = p * t + (1 - p) * (1 - t)
            focal = np.mean((0.25 * t + 0.75 * (1 - t)) * (1 - p_t) ** 2 * ce)
            dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
            losses.append(20 * focal + dice)
            union = ((logits > 0) | (t > 0)).sum()
            ious.append(((logits > 0) & (t > 0)).sum() / union if union else 1.0)
        losses, ious = np.array(losses), np.array(ious)
        chosen = 1 + int(np.argmin(losses[1:])) if multi else 0
        mse = np.mean((pred[1:] - ious[1:]) ** 2) if multi else (pred[0] - ious[0]) ** 2
        out.append((losses[chosen] + mse, chosen, ious[chosen]))
    return out


def test_sam_loss_matches_float64_reference_and_back_propagates_only_the_least_loss_mask():
    rng = np.random.default_rng(0)
    masks = rng.normal(size=(4, 4, 6, 7)) * 2
    targets = (rng.uniform(size=(4, 6, 7)) < 0.4).astype(np.float64)
    masks[0, 2] = 20 * (2 * targets[0] - 1)  # example 0's third multimask output is (almost) perfect
    iou_pred = rng.uniform(size=(4, 4))
    multimask = np.array([True, False, True, True])
    terms = jax.jit(sam_loss)(jnp.asarray(masks, jnp.float32), jnp.asarray(iou_pred, jnp.float32),
                              jnp.asarray(targets, jnp.float32), jnp.asarray(multimask))
    reference = _reference(masks, iou_pred, targets, multimask)
    np.testing.assert_allclose(terms["loss"], [r[0] for r in reference], rtol=1e-5)
    np.testing.assert_array_equal(terms["chosen"], [r[1] for r in reference])
    np.testing.assert_allclose(terms["iou"], [r[2] for r in reference], rtol=1e-6)
    assert int(terms["chosen"][0]) == 2 and int(terms["chosen"][1]) == 0 and float(terms["iou"][0]) == 1.0

    grads = jax.jit(jax.grad(lambda m, p: jnp.sum(sam_loss(m, p, jnp.asarray(targets, jnp.float32),
                                                   jnp.asarray(multimask))["loss"]), argnums=(0, 1)))(
        jnp.asarray(masks, jnp.float32), jnp.asarray(iou_pred, jnp.float32))
    reached = np.abs(np.asarray(grads[0])).sum((-2, -1)) > 0  # (B, 4): which masks get a gradient
    expected = np.zeros((4, 4), bool)
    expected[np.arange(4), [r[1] for r in reference]] = True
    np.testing.assert_array_equal(reached, expected)
    iou_reached = np.asarray(grads[1]) != 0  # the IoU head: every multimask output, or the single one
    np.testing.assert_array_equal(iou_reached, [[False, True, True, True], [True, False, False, False],
                                                [False, True, True, True], [False, True, True, True]])
    np.testing.assert_array_equal(predicted_mask_choice(jnp.asarray(iou_pred), jnp.asarray(multimask)),
                                  np.where(multimask, 1 + np.argmax(iou_pred[:, 1:], 1), 0))
    with pytest.raises(ValueError, match="need masks"):
        sam_loss(jnp.zeros((2, 1, 4, 4)), jnp.zeros((2, 1)), jnp.zeros((2, 4, 4)), jnp.zeros((2,), bool))


def test_centre_point_is_the_interior_maximum_of_the_distance_to_the_background():
    rng = np.random.default_rng(1)
    for _ in range(3):
        mask = np.zeros((12, 12), bool)
        mask[2:10, 1:5] = True
        mask[6:10, 1:11] = True  # an L
        mask &= rng.uniform(size=mask.shape) < 0.97
        x, y = centre_point(mask)
        padded = np.pad(mask, 1)
        background = np.argwhere(~padded)
        distance = lambda r, c: np.sqrt(((background - (r + 1, c + 1)) ** 2).sum(1)).min()
        best = max(distance(r, c) for r, c in np.argwhere(mask))
        assert mask[int(y), int(x)] and np.isclose(distance(int(y), int(x)), best)
    with pytest.raises(ValueError, match="at least one pixel"):
        centre_point(np.zeros((3, 3), bool))


def test_prompts_points_and_jittered_boxes():
    rng = np.random.default_rng(2)
    mask = np.zeros((16, 16), bool)
    mask[3:10, 5:12] = True  # 7 x 7: a unique centre
    box = np.array([5.0, 3.0, 12.0, 10.0], np.float32)
    for _ in range(20):
        points, labels = prompt_points("random_point", mask, box, rng)
        assert mask[int(points[0, 1]), int(points[0, 0])] and labels.tolist() == [1, -1]
        jittered = jitter_box(rng, box, 0.5, 3.0, 16)
        assert np.all(np.abs(jittered - box) <= 3.0 + 1e-6) and np.all(jittered[2:] >= jittered[:2])
        assert np.all((0 <= jittered) & (jittered <= 16))
    corners, labels = prompt_points("box", mask, box)
    np.testing.assert_array_equal(corners, [[5, 3], [12, 10]])
    assert labels.tolist() == [2, 3]
    np.testing.assert_array_equal(prompt_points("point", mask, box)[0][0], [8, 6])
    with pytest.raises(ValueError, match="kind"):
        prompt_points("scribble", mask, box)


def test_batches_are_deterministic_and_their_prompts_fit_their_masks(tmp_path):
    config = apply_overrides(sam_shapes.get_config(), {**TINY, "data.data_dir": str(tmp_path)})
    task = make_task(config)
    batch = next(task.train_batches(3, 0, 1))
    again = next(task.train_batches(3, 0, 1))
    jax.tree.map(np.testing.assert_array_equal, batch, again)
    abstract = task.abstract_batch()
    assert set(batch) == set(abstract)
    for k, v in batch.items():
        assert v.shape == abstract[k].shape and v.dtype == abstract[k].dtype, k
    for target, points, labels, multimask in zip(batch["targets"], batch["points"], batch["point_labels"],
                                                 batch["multimask"]):
        assert target.any()
        if labels[0] == 1:
            assert target[int(points[0, 1]), int(points[0, 0])] and multimask
        else:
            rows, cols = np.nonzero(target)
            exact = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
            assert labels.tolist() == [2, 3] and not multimask
            assert np.all(np.abs(points.reshape(4) - exact) <= 0.1 * 16 * 4)  # within a few jitter deviations
    evals = task.eval_batches()
    assert [b["point_labels"][:, 0].tolist() for b in evals] == [[1, 2] * 3] * 2  # alternating, fixed
    prompts = task.split_prompts("test", "box")
    valid = shapes.load_split("test", str(tmp_path), task.shapes_config)["valid"]
    assert len(prompts["image_index"]) == int(valid.sum()) and not prompts["multimask"].any()
    assert 0 < task.baseline()["box_as_mask_miou"] <= 1


def test_config_errors_name_the_field(tmp_path):
    for change, message in [({"data.shapes.image_size": 4}, "config.data.shapes: image_size"),
                            ({"model.image_size": 32}, "config.model.image_size=32"),
                            ({"segmentation.box_fraction": 1.5}, "config.segmentation.box_fraction"),
                            ({"data.eval_seed": 0}, "config.data.eval_seed"),
                            ({"data.name": "digits"}, "config.data.name")]:
        config = apply_overrides(sam_shapes.get_config(), {**TINY, "data.data_dir": str(tmp_path), **change})
        with pytest.raises(ValueError, match=message):
            make_task(config)
