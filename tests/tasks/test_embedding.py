"""Embedding verification task: the class split and renumbering, batches, verification of embeddings whose answer
is known, and the config errors."""

import numpy as np
import pytest

from experiments.configs import arcface_mnist
from jaxmodels.data import digits
from jaxmodels.tasks import make_task
from jaxmodels.tasks.embedding import cosine_scores, verify
from tests.tiny import apply_overrides

DIGITS = {"data.name": "digits", "data.global_batch_size": 16, "data.train_classes": (2, 0, 5, 7, 9, 1),
          "model.num_classes": 6, "verification.num_pairs": 200}


def _task(**overrides):
    return make_task(apply_overrides(arcface_mnist.get_config(), {**DIGITS, **overrides}))


def test_split_renumbers_the_seen_classes_and_keeps_the_held_out_ones():
    task = _task()
    images, labels, _ = digits.load_split("test")
    seen_x, seen_y = task.split("test", seen=True)
    unseen_x, unseen_y = task.split("test", seen=False)
    classes = np.array([2, 0, 5, 7, 9, 1])
    np.testing.assert_array_equal(classes[seen_y], labels[np.isin(labels, classes)])
    assert set(unseen_y) == {3, 4, 6, 8} and len(seen_y) + len(unseen_y) == 297
    np.testing.assert_array_equal(unseen_x, digits.to_unit_range(images[~np.isin(labels, classes)]))
    batch = next(task.train_batches(3, 0, 1))
    assert batch["inputs"].shape == (16, 8, 8, 1) and batch["labels"].max() < 6
    np.testing.assert_array_equal(next(task.train_batches(3, 0, 1))["inputs"], batch["inputs"])
    eval_batches = task.eval_batches()
    assert sum(int((b["weights"] > 0).sum()) for b in eval_batches) == len(seen_y)


def test_verification_of_known_embeddings():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    perfect = np.eye(4)[labels] + 0.01 * rng.normal(size=(300, 4))  # one direction per class
    result = verify((perfect, labels), (perfect, labels), 500, seed=0)
    assert result["test_accuracy"] == result["validation_accuracy"] == result["test_auc"] == 1.0
    noise = rng.normal(size=(300, 16))  # unrelated to the labels: chance
    assert abs(verify((noise, labels), (noise, labels), 2000, seed=1)["test_auc"] - 0.5) < 0.05
    np.testing.assert_allclose(cosine_scores(np.array([[3.0, 4.0], [0.0, 2.0]]), np.array([[0, 1], [1, 1]])),
                               [0.8, 1.0])


def test_pixel_baseline_verifies_better_than_chance():
    result = _task().verification(None)
    assert 0.6 < result["unseen"]["test_accuracy"] < 1.0 and 0.6 < result["seen"]["test_auc"] <= 1.0


@pytest.mark.parametrize("overrides, message", [
    ({"data.train_classes": (0, 1, 2, 3, 4, 5, 6, 7, 8)}, r"leaving at least 2 classes held out"),
    ({"data.train_classes": (0, 0, 1)}, r"must be distinct class ids"),
    ({"model.num_classes": 7}, r"config.model.num_classes=7 must be the 6 classes"),
    ({"model.name": "convnet"}, r"the embedding task trains 'embedding_classifier'"),
    ({"data.name": "cifar10"}, r"config.data.name='cifar10' is not valid"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        _task(**overrides)
