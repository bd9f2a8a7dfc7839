"""scikit-learn's digits builder: prepared offline, exact pixels back, fixed stratified split, pure batches."""

import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from sklearn.datasets import load_digits

from jaxmodels.data import digits


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Prepared once into a fresh directory, with any network access failing the test at once."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    path = str(tmp_path_factory.mktemp("digits"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", refuse)
        patch.setattr(socket.socket, "connect", refuse)
        digits.prepare(path)
    return path


@pytest.fixture(scope="module")
def sk():
    return load_digits()


def read_source(data_dir, split):
    source = digits.prepare(data_dir).as_data_source(split)
    return [source[i] for i in range(len(source))]


def test_split_sizes_disjoint_and_exact_pixels(data_dir, sk):
    train, test = read_source(data_dir, "train"), read_source(data_dir, "test")
    assert (len(train), len(test)) == (1500, 297)
    train_ids, test_ids = [x["index"] for x in train], [x["index"] for x in test]
    assert not set(train_ids) & set(test_ids) and sorted(train_ids + test_ids) == list(range(1797))
    assert train_ids == sorted(train_ids)  # index order
    for x in train[::37] + test[::11]:
        assert x["image"].dtype == np.uint8 and x["image"].shape == (8, 8, 1)
        np.testing.assert_array_equal(x["image"][..., 0], sk.images[x["index"]])
        assert x["label"] == sk.target[x["index"]]


def test_split_is_stratified_and_fixed(data_dir, sk):
    images, labels, indices = digits.load_split("test", data_dir)
    counts, test_counts = np.bincount(sk.target), np.bincount(labels, minlength=10)
    assert test_counts.sum() == 297 and (np.abs(test_counts - 297 * counts / 1797) < 1).all()
    np.testing.assert_array_equal(labels, sk.target[indices])
    # Pinned: the split depends on the data only, so these must never change.
    np.testing.assert_array_equal(test_counts, [29, 30, 29, 30, 30, 30, 30, 30, 29, 30])
    np.testing.assert_array_equal(indices[:8], [4, 9, 11, 16, 17, 22, 28, 30])
    train_images, train_labels, _ = digits.load_split("train", data_dir)
    assert train_images.dtype == np.uint8 and train_images.min() == 0 and train_images.max() == 16
    np.testing.assert_array_equal(np.bincount(train_labels) + test_counts, counts)


def test_held_out_indices_against_a_naive_count():
    rng = np.random.default_rng(0)
    labels = rng.choice(4, 103, p=[0.1, 0.2, 0.3, 0.4])
    held_out = digits.held_out_indices(labels, 17)
    assert len(held_out) == 17 and len(set(held_out)) == 17 and list(held_out) == sorted(held_out)
    counts, chosen = np.bincount(labels), np.bincount(labels[held_out], minlength=4)
    assert (np.abs(chosen - 17 * counts / 103) < 1).all()
    np.testing.assert_array_equal(held_out, digits.held_out_indices(labels[:], 17))  # deterministic
    with pytest.raises(ValueError, match="num_test"):
        digits.held_out_indices(labels, 104)


def test_prepare_again_and_concurrently_gives_the_same_data(data_dir, tmp_path, no_network):
    assert digits.prepare(data_dir).data_dir == digits.prepare(data_dir).data_dir
    with ThreadPoolExecutor(2) as pool:
        builders = list(pool.map(lambda _: digits.prepare(str(tmp_path)), range(2)))
    first = read_source(str(tmp_path), "test")
    assert [x["index"] for x in first] == [x["index"] for x in read_source(data_dir, "test")]
    assert builders[0].data_dir == builders[1].data_dir


def test_to_unit_range():
    np.testing.assert_array_equal(digits.to_unit_range(np.array([0, 8, 16], np.uint8)), [-1.0, 0.0, 1.0])
    assert digits.to_unit_range(np.zeros(3, np.uint8)).dtype == np.float32


def run(data_dir, steps, **kwargs):
    args = dict(split="train", seed=0, global_batch_size=100, data_dir=data_dir) | kwargs
    it = digits.batches(args.pop("split"), args.pop("seed"), args.pop("global_batch_size"), **args)
    return [next(it) for _ in range(steps)]


def test_batches_cover_an_epoch_and_are_scaled_images(data_dir):
    images, labels, _ = digits.load_split("train", data_dir)
    epoch = run(data_dir, 15)
    assert epoch[0]["inputs"].shape == (100, 8, 8, 1) and epoch[0]["inputs"].dtype == np.float32
    assert epoch[0]["labels"].shape == (100,) and epoch[0]["labels"].dtype == np.int32
    seen = np.concatenate([b["inputs"] for b in epoch])
    expected = digits.to_unit_range(images)  # each example exactly once: match them up by sorted bytes
    assert sorted(map(bytes, seen.reshape(1500, -1))) == sorted(map(bytes, expected.reshape(1500, -1)))
    np.testing.assert_array_equal(np.bincount(np.concatenate([b["labels"] for b in epoch])), np.bincount(labels))
    assert seen.min() == -1.0 and seen.max() == 1.0


def test_batches_are_pure_in_seed_and_step(data_dir):
    full = run(data_dir, 20, global_batch_size=128)  # crosses an epoch boundary (1500 / 128)
    resumed = run(data_dir, 4, global_batch_size=128, start_step=16)
    for a, b in zip(full[16:], resumed):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    single = digits.batch("train", 0, 17, 128, data_dir=data_dir)
    np.testing.assert_array_equal(single["inputs"], full[17]["inputs"])
    assert not np.array_equal(full[0]["inputs"], full[1]["inputs"])
    assert not np.array_equal(full[0]["inputs"], run(data_dir, 1, seed=1, global_batch_size=128)[0]["inputs"])
    assert not np.array_equal(full[0]["inputs"], full[12]["inputs"][:128])  # epoch 2 is a fresh permutation


def test_processes_stack_to_the_global_batch(data_dir):
    local = [run(data_dir, 3, split="test", process_index=p, process_count=4, global_batch_size=64) for p in range(4)]
    full = run(data_dir, 3, split="test", global_batch_size=64)
    for step in range(3):
        np.testing.assert_array_equal(np.concatenate([b[step]["inputs"] for b in local]), full[step]["inputs"])
        np.testing.assert_array_equal(np.concatenate([b[step]["labels"] for b in local]), full[step]["labels"])


def test_sequence_view_is_the_image_view_in_row_major_order(data_dir):
    image = digits.batch("test", 3, 5, 16, data_dir=data_dir)
    sequence = digits.batch("test", 3, 5, 16, view="sequence", data_dir=data_dir)
    assert sequence["inputs"].shape == (16, 64, 1)
    np.testing.assert_array_equal(sequence["inputs"], image["inputs"].reshape(16, 64, 1))
    np.testing.assert_array_equal(sequence["inputs"][:, 8:16, 0], image["inputs"][:, 1, :, 0])  # row 1 = pixels 8..15
    np.testing.assert_array_equal(sequence["labels"], image["labels"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(view="pixels"), "view='pixels' is not valid; choose one of"),
    (dict(global_batch_size=10, process_count=4), "multiple of process_count"),
    (dict(process_index=1), "process_index"),
    (dict(start_step=-1), "step"),
    (dict(split="validation"), "validation"),
])
def test_bad_arguments_raise(data_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(data_dir, 0, **kwargs)
