"""scikit-learn's 8x8 handwritten digits as a tensorflow-datasets builder, and batches of it.

The 1797 digits of `sklearn.datasets.load_digits` (the test set of the UCI "Optical Recognition
of Handwritten Digits" data, shipped inside scikit-learn: no download) written to ArrayRecord on
first use and read back as a random-access data source (no TensorFlow).

Features: "image" uint8 (8, 8, 1) with the original values 0..16 (the count of set pixels of a
4x4 block of the 32x32 bitmap; `to_unit_range` maps them to [-1, 1] floats), "label" int64 in
[0, 10), "index" int64, the example's row in `load_digits()`.

Split: stratified and fixed, 1500 train / 297 test. Class c's examples, ordered by the SHA-1 of
their index, send their first n_c to "test", where n_c are the largest-remainder rounding of
297 * count_c / 1797 (so every class has the same share, to within one example); the rest go to
"train". The split depends on nothing but the data: no random generator, no library version.

Readers: `prepare(data_dir).as_data_source(split)` gives random access; `batch`/`batches` give
deterministic float batches as images `(B, 8, 8, 1)` (in [-1, 1], or the pixel values 0..16 themselves
for likelihoods) or, for sequential-digits classification, as pixel sequences `(B, 64, 1)` in row-major order.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
from collections.abc import Iterator

import grain
import numpy as np
import tensorflow_datasets as tfds

from jaxmodels.data import corpus, integrity
from jaxmodels.ops.checks import one_of

NAME = "sklearn_digits"
SPLITS = ("train", "test")
NUM_EXAMPLES = 1797
NUM_TEST = 297
NUM_CLASSES = 10
MAX_PIXEL = 16  # pixels are counts in 0..16
VIEWS = ("image", "sequence", "counts")


def _hash_order(indices: np.ndarray) -> np.ndarray:
    """`indices` sorted by the SHA-1 of their decimal string: a fixed shuffle that no library version changes."""
    return np.array(sorted(indices, key=lambda i: hashlib.sha1(str(int(i)).encode()).digest()), np.int64)


def held_out_indices(labels: np.ndarray, num_test: int = NUM_TEST) -> np.ndarray:
    """Sorted indices of the test split: a stratified, fixed choice of `num_test` of `labels` (int (N,)).

    Class c gets n_c test examples, the largest-remainder rounding of num_test * count_c / N (ties to
    the smaller class id), namely its first n_c indices in SHA-1 order.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not 0 <= num_test <= len(labels):
        raise ValueError(f"need 1-D labels and 0 <= num_test <= len(labels), got {labels.shape} and {num_test}")
    classes, counts = np.unique(labels, return_counts=True)
    quota = num_test * counts / len(labels)
    n = np.floor(quota).astype(np.int64)
    n[np.argsort(-(quota - n), kind="stable")[:num_test - n.sum()]] += 1
    chosen = [_hash_order(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, n)]
    return np.sort(np.concatenate(chosen))


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 digits; features: image uint8 (8, 8, 1) in 0..16, label int64, index int64."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # examples stay in index order
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        from sklearn.datasets import load_digits  # ships its data; imported only when preparing

        data = load_digits()
        images = data.images.astype(np.uint8)[..., None]
        if images.shape != (NUM_EXAMPLES, 8, 8, 1) or images.max() > MAX_PIXEL:
            raise ValueError(f"unexpected load_digits data: images {images.shape}, max {images.max()}")
        test = np.zeros(NUM_EXAMPLES, bool)
        test[held_out_indices(data.target)] = True
        return {"train": self._generate_examples(images, data.target, np.flatnonzero(~test)),
                "test": self._generate_examples(images, data.target, np.flatnonzero(test))}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i]), "index": int(i)}


def prepare(data_dir: str | None = None) -> SklearnDigits:
    """Returns the `SklearnDigits` builder, preparing it into `data_dir` on first use (never downloads).

    Needs scikit-learn only to prepare. Safe when several processes call it at once (an exclusive
    `fcntl.flock` on `data_dir/sklearn_digits.lock`). `data_dir` defaults to
    `corpus.default_data_dir()`. Every call reads the prepared files back (a few ms); damaged ones
    are prepared again after a warning (`integrity.prepare_embedded`). Read it with
    `builder.as_data_source(split)`, whose items are
    `{"image": uint8 (8, 8, 1), "label": int64, "index": int64}`.
    """
    data_dir = data_dir or corpus.default_data_dir()
    return integrity.prepare_embedded(data_dir, NAME, lambda: SklearnDigits(data_dir=data_dir,
                                                                            file_format="array_record"))


@functools.lru_cache(maxsize=8)
def _split_arrays(split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return integrity.image_label_arrays(prepare(data_dir), split)


def load_split(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole split in index order: (images uint8 (N, 8, 8, 1) in 0..16, labels int64 (N,), indices
    int64 (N,), rows of `load_digits()`). N is 1500 for "train", 297 for "test". Read-only arrays,
    cached in memory per (split, data_dir)."""
    return _split_arrays(split, os.path.abspath(data_dir or corpus.default_data_dir()))


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """Pixels 0..16 (any shape, integer or float) -> float32 in [-1, 1]: x / 8 - 1."""
    return np.asarray(images, np.float32) / (MAX_PIXEL / 2) - 1


def _view(images: np.ndarray, view: str) -> np.ndarray:
    if view == "image":
        return to_unit_range(images)
    if view == "counts":  # the pixel values themselves, for likelihoods of the discrete data (flows)
        return np.asarray(images, np.float32)
    return to_unit_range(images).reshape(len(images), 64, 1)  # "sequence": row-major pixel order


def check_batch_arguments(view: str, global_batch_size: int, seed: int, step: int, process_index: int,
                          process_count: int) -> None:
    """Raises ValueError for a view outside VIEWS or a bad batch, seed, step or process (shared with `mnist`)."""
    one_of("view", view, VIEWS)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}")
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got {seed} and {step}")


def index_batches(num_examples: int, global_batch_size: int, seed: int, process_index: int,
                   process_count: int) -> grain.MapDataset:
    """Infinite MapDataset whose item s is this process's int `(B // P,)` example indices of step s.

    The examples are shuffled afresh each epoch; process p takes rows [p*B_l, (p+1)*B_l) of each global batch.
    """
    shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])  # seed 1 must not replay seed 0's epoch 1
    ds = grain.MapDataset.range(num_examples).shuffle(seed=shuffle_seed).repeat()
    return ds.batch(global_batch_size // process_count, drop_remainder=True)[process_index::process_count]


def batch(split: str, seed: int, step: int, global_batch_size: int, process_index: int = 0, process_count: int = 1,
          *, view: str = "image", data_dir: str | None = None) -> dict[str, np.ndarray]:
    """This process's batch of `split` at `step`, the one `batches` yields there.

    Returns {"inputs": float32 in [-1, 1], (B_l, 8, 8, 1) for view="image" or (B_l, 64, 1) for
    view="sequence" (row-major pixels), or the pixel values 0..16 as float32 (B_l, 8, 8, 1) for view="counts",
    "labels": int32 (B_l,)}, B_l = global_batch_size // process_count.
    Process p gets rows [p*B_l, (p+1)*B_l) of the global batch; each epoch is a fresh permutation.
    """
    return next(batches(split, seed, global_batch_size, process_index, process_count, start_step=step, view=view,
                        data_dir=data_dir))


def batches(split: str, seed: int, global_batch_size: int, process_index: int = 0, process_count: int = 1, *,
            start_step: int = 0, view: str = "image", data_dir: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator of this process's batches (see `batch`) for steps start_step, start_step + 1, ...

    A batch is a pure function of (split, seed, step, process): resuming needs only the step.
    Raises ValueError on bad arguments, before the first batch is asked for.
    """
    check_batch_arguments(view, global_batch_size, seed, start_step, process_index, process_count)
    images, labels, _ = load_split(split, data_dir)
    ds = index_batches(len(labels), global_batch_size, seed, process_index, process_count)
    rows = map(ds.__getitem__, itertools.count(start_step))
    return ({"inputs": _view(images[r], view), "labels": labels[r].astype(np.int32)} for r in rows)
