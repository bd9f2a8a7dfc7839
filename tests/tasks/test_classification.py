"""Image classification task: eval metrics over the padded test split against a float64 NumPy reference, batches,
the synthetic data, FLOPs from the model, and the config errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import image_classification
from jaxmodels.data import digits
from jaxmodels.tasks import make_task
from jaxmodels.tasks.classification import largest_shape_class, padded_eval_batches, standardize_images
from tests.tiny import apply_overrides

DIGITS = {"data.name": "digits", "model.image_size": 8, "data.global_batch_size": 64, "model.vit.patch_size": 2,
          "model.swin.patch_size": 1, "model.swin.window_size": 4}


def _task(**overrides):
    return make_task(apply_overrides(image_classification.get_config(), {**DIGITS, **overrides}))


class LinearClassifier:
    """logits = flatten(x) W + b with fixed random weights: a model whose answers NumPy can recompute."""

    def __init__(self, seed):
        rng = np.random.default_rng(seed)
        self.w, self.b = rng.normal(size=(64, 10)).astype(np.float32), rng.normal(size=10).astype(np.float32)

    def __call__(self, x):
        return jnp.asarray(x).reshape(x.shape[0], -1) @ self.w + self.b


def test_eval_over_the_padded_test_split_is_the_exact_test_mean():
    task = _task()
    model = LinearClassifier(0)
    batches = task.eval_batches()
    assert len(batches) == 5 and sum(int((b["weights"] > 0).sum()) for b in batches) == 297  # 297 = 4·64 + 41
    metrics = task.combine_metrics([{k: float(v) for k, v in task.loss(model, b)[1].items()} for b in batches])
    images, labels, _ = digits.load_split("test")
    logits = (images.reshape(297, 64).astype(np.float64) / 8 - 1) @ model.w.astype(np.float64) + model.b
    shifted = logits - logits.max(1, keepdims=True)
    cross_entropy = np.log(np.exp(shifted).sum(1)) - shifted[np.arange(297), labels]
    np.testing.assert_allclose(metrics["loss"], cross_entropy.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(logits.argmax(1) == labels), rtol=1e-6)
    # data.eval_batches = k: the first k·B test examples only, still an exact mean over them.
    first = _task(**{"data.eval_batches": 2}).eval_batches()
    assert len(first) == 2 and np.all(first[1]["weights"] == 1.0)
    np.testing.assert_array_equal(first[1]["labels"], labels[64:128])


def test_padded_eval_batches_weights_and_errors():
    batches = padded_eval_batches(np.ones((5, 2)), np.arange(5), 4)
    np.testing.assert_allclose(np.concatenate([b["weights"] for b in batches]), [1.6] * 5 + [0.0] * 3)
    assert batches[1]["inputs"].shape == (4, 2) and batches[1]["inputs"][1:].sum() == 0
    with pytest.raises(ValueError, match="at least one"):
        padded_eval_batches(np.ones((0, 2)), np.arange(0), 4)


def test_train_batches_are_pure_functions_of_seed_step_and_process():
    task = _task(**{"data.global_batch_size": 8})
    a, b = next(task.train_batches(5, 0, 1)), next(task.train_batches(5, 0, 1))
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert a["inputs"].shape == (8, 8, 8, 1) and -1 <= a["inputs"].min() and a["inputs"].max() <= 1
    assert a["labels"].dtype == np.int32 and np.all(a["weights"] == 1)
    halves = [next(task.train_batches(5, p, 2)) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["labels"] for h in halves]), a["labels"])
    assert task.baseline() == {"majority_accuracy": pytest.approx(30 / 297)}  # the test split's largest class


def test_synthetic_images_have_the_model_shape_and_flops_come_from_the_model():
    task = _task(**{"data.name": "synthetic_images", "model.image_size": 16, "model.in_channels": 3,
                    "model.num_classes": 7, "data.global_batch_size": 4})
    batch = next(task.train_batches(0, 0, 1))
    assert batch["inputs"].shape == (4, 16, 16, 3) and batch["labels"].max() < 7
    assert task.abstract_batch()["inputs"].shape == (4, 16, 16, 3)
    model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    assert task.flops_per_example(model) == model.train_flops_per_example() > 0


def test_shapes_are_labelled_with_the_largest_visible_shape(tmp_path):
    task = _task(**{"data.name": "shapes", "data.data_dir": str(tmp_path), "model.image_size": 16,
                    "model.in_channels": 3, "model.num_classes": 3, "data.global_batch_size": 4,
                    "data.shapes": {"image_size": 16, "min_visible": 1, "num_train": 12, "num_test": 6}})
    batch = next(task.train_batches(0, 0, 1))
    assert batch["inputs"].shape == (4, 16, 16, 3) and task.abstract_batch()["inputs"].shape == (4, 16, 16, 3)
    images, labels = task.test_split()
    assert images.shape == (6, 16, 16, 3) and set(labels) <= {0, 1, 2}
    np.testing.assert_allclose(images.mean(axis=(1, 2)), 0, atol=1e-5)  # standardised: no background colour
    np.testing.assert_allclose(images.std(axis=(1, 2, 3)), 1, rtol=1e-2)
    np.testing.assert_allclose(standardize_images(2 * images + 5), images, rtol=5e-3, atol=1e-3)  # eps aside
    rng = np.random.default_rng(0)
    masks, classes = rng.random((20, 3, 5, 5)) < 0.4, rng.integers(0, 3, (20, 3))
    valid = rng.random((20, 3)) < 0.7
    valid[:, 0] = True
    expected = []
    for m, c, v in zip(masks, classes, valid):  # the first of the largest valid objects
        areas = [m[k].sum() if v[k] else -1 for k in range(3)]
        expected.append(c[areas.index(max(areas))])
    np.testing.assert_array_equal(largest_shape_class(masks, classes, valid), expected)


@pytest.mark.parametrize("overrides, message", [
    ({"data.name": "cifar10"}, r"config.data.name='cifar10' is not valid"),
    ({"model.image_size": 28}, r"config.model.image_size=28 must be the side of 'digits'"),
    ({"model.in_channels": 3}, r"config.model.in_channels=3 must be the 1 channels of 'digits'"),
    ({"model.num_classes": 5}, r"config.model.num_classes=5 must be the 10 classes of 'digits'"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        _task(**overrides)
