"""Damaged data files: errors that name the file and the fix, embedded data sets and caches mended by themselves."""

import os
import pickle
import re
import shutil
import types

import numpy as np
import pytest

from jaxmodels.data import corpus, digits, integrity, lm
from jaxmodels.data.errors import DataError
from tests.data.test_corpus import fake_config, prepare_fake, read_split
from tests.data.test_lm import BYTE, DOCS, NAME

VERSION = "py_stdlib/fake/1.0.0"  # the prepared directory, under data_dir
TRAIN_SHARD = "py_stdlib-train.array_record-00000-of-00001"
VALIDATION_SHARD = "py_stdlib-validation.array_record-00000-of-00001"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The fake corpus of test_lm, prepared once, with its document-lengths cache written; never modified."""
    base = tmp_path_factory.mktemp("integrity")
    prepare_fake(base, DOCS)
    lm.TokenWindows(lm.text_source(NAME, "train", str(base / "data")), 8)
    return base


@pytest.fixture
def data_dir(prepared, tmp_path):
    """A copy of the prepared fake corpus to damage; the path of its data_dir."""
    shutil.copytree(prepared / "data", tmp_path / "data")
    shutil.copytree(prepared / "root", tmp_path / "root")
    return tmp_path / "data"


def truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def empty(path):
    path.write_bytes(b"")


def scramble(path, offset=3000):
    """64 random bytes at `offset`: inside the records, past what opening a shard reads."""
    data = bytearray(path.read_bytes())
    data[offset:offset + 64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def swap_for_validation(path):
    """A sound ArrayRecord file, but with another record count than dataset_info.json lists."""
    shutil.copy(path.parent / VALIDATION_SHARD, path)


def lm_batches(data_dir, **kwargs):
    data = {"name": NAME, "data_dir": str(data_dir), "seq_len": 8}
    return lm.lm_batches(data, BYTE, **(dict(split="train", global_batch_size=8, seed=0, prefetch=0) | kwargs))


def batches(data_dir, steps, **kwargs):
    it = lm_batches(data_dir, **kwargs)
    return np.stack([next(it)["tokens"] for _ in range(steps)])


def assert_names_file_and_fix(error, path, problem):
    """`error` is a DataError for `path` whose message holds the problem, the path and the tfds fix."""
    message = str(error)
    assert isinstance(error, DataError) and problem in message and str(path) in message
    assert f"delete {path.parent}" in message and "download_and_prepare()" in message


@pytest.mark.parametrize("damage,problem", [
    (truncate, "shard cannot be opened (truncated"), (empty, "shard is empty"), (os.remove, "shard is missing"),
    (swap_for_validation, "shard holds 5 records where dataset_info.json lists 55"),
])
def test_damaged_shard_of_a_user_data_set_is_named_when_opened(data_dir, damage, problem, no_network):
    shard = data_dir / VERSION / TRAIN_SHARD
    damage(shard)
    with pytest.raises(DataError) as caught:
        batches(data_dir, 1)
    assert_names_file_and_fix(caught.value, shard, problem)
    assert caught.value.files == (str(shard),) and caught.value.step is None
    lm.text_source(NAME, "validation", str(data_dir))  # the other split opens: only the split read is checked


def test_deleted_dataset_info_of_a_user_data_set_is_named(data_dir, no_network):
    (data_dir / VERSION / "dataset_info.json").unlink()
    with pytest.raises(DataError, match="dataset_info.json is missing or cannot be read") as caught:
        lm.text_source(NAME, "train", str(data_dir))
    message = str(caught.value)
    assert str(data_dir / VERSION / "dataset_info.json") in message and "download_and_prepare()" in message
    assert isinstance(caught.value.__cause__, OSError)  # tfds's DatasetInfoFileError


@pytest.mark.parametrize("prefetch", [0, 4])
def test_random_bytes_in_a_shard_name_the_shard_record_and_step(data_dir, prefetch):
    shard = data_dir / VERSION / TRAIN_SHARD
    good = batches(data_dir, 40)
    scramble(shard)
    lm.text_source(NAME, "train", str(data_dir))  # the cheap checks at open time cannot see it
    it = lm_batches(data_dir, prefetch=prefetch)
    read = []
    with pytest.raises(DataError) as caught:
        while len(read) < 40:
            read.append(next(it)["tokens"])
    error = caught.value
    assert 0 < error.step == len(read) < 40  # mid-run, after the good batches, which are unchanged
    np.testing.assert_array_equal(np.stack(read), good[:len(read)])
    assert_names_file_and_fix(error, shard, "of the shard cannot be read (corrupt bytes) while reading the batch of "
                                            f"step {error.step}")
    assert isinstance(error.__cause__, RuntimeError) and "Riegeli" in str(error.__cause__)
    with pytest.raises(DataError, match=f"step {error.step}:"):  # a resume fails at the same step, with the same fix
        next(lm_batches(data_dir, start_step=error.step, prefetch=prefetch))


def test_random_bytes_in_an_eval_shard_name_the_eval_batch(data_dir):
    scramble(data_dir / VERSION / TRAIN_SHARD)
    with pytest.raises(DataError, match="while reading the batch of step") as caught:
        lm.eval_batches({"name": NAME, "data_dir": str(data_dir), "seq_len": 8}, BYTE, split="train", batch_size=8,
                        num_batches=40)
    assert str(data_dir / VERSION / TRAIN_SHARD) in str(caught.value)


@pytest.mark.parametrize("damage", [
    lambda path: path.write_bytes(path.read_bytes()[:100]),  # truncated
    lambda path: path.write_bytes(b"not a npy file"),
    lambda path: path.write_bytes(b""),
    lambda path: np.save(path, np.arange(3)),  # a sound file with the wrong length
    lambda path: np.save(path, -np.ones(55, np.int64)),  # the right shape, impossible values
])
def test_a_bad_lengths_cache_is_rebuilt_with_a_warning(prepared, data_dir, damage):
    cache = data_dir / VERSION / "train-text-lengths.npy"
    expected = np.load(cache)
    good = batches(prepared / "data", 12)
    damage(cache)
    with pytest.warns(UserWarning, match=f"cache {re.escape(str(cache))} .*; computing it again"):
        rebuilt = batches(data_dir, 12)
    np.testing.assert_array_equal(rebuilt, good)
    np.testing.assert_array_equal(np.load(cache), expected)  # written again, atomically
    assert not [f for f in os.listdir(cache.parent) if f.startswith("tmp")]


@pytest.mark.parametrize("damage,file", [
    (truncate, TRAIN_SHARD), (empty, VALIDATION_SHARD), (os.remove, TRAIN_SHARD), (scramble, TRAIN_SHARD),
    (os.remove, "dataset_info.json"), (os.remove, "features.json"),
])
def test_a_damaged_embedded_corpus_is_prepared_again(data_dir, damage, file, no_network):
    expected = {s: read_split(prepare_fake(data_dir.parent, {}), s) for s in ("train", "validation")}
    damage(data_dir / VERSION / file)
    warning = re.escape(f"{data_dir / VERSION / file}; deleting {data_dir / VERSION} and preparing it again")
    with pytest.warns(UserWarning, match=warning):
        builder = prepare_fake(data_dir.parent, {})  # the sources are still there: same config
    assert {s: read_split(builder, s) for s in ("train", "validation")} == expected
    assert builder.data_path == data_dir / VERSION


def test_a_damaged_digits_data_set_is_prepared_again(tmp_path, no_network):
    expected = digits.load_split("train", str(tmp_path))
    version = tmp_path / "sklearn_digits/1.0.0"
    scramble(version / "sklearn_digits-train.array_record-00000-of-00001", 6000)
    with pytest.warns(UserWarning, match=re.escape(f"cannot be read (corrupt bytes): {version}")):
        source = digits.prepare(str(tmp_path)).as_data_source("train")
    np.testing.assert_array_equal(np.stack([x["image"] for x in source]), expected[0])
    np.testing.assert_array_equal([x["label"] for x in source], expected[1])


def test_an_embedded_data_set_that_fails_after_preparing_again_raises(tmp_path, monkeypatch, no_network):
    config = fake_config(tmp_path, DOCS)
    monkeypatch.setattr(integrity, "_prepare", lambda builder: None)  # preparing writes nothing
    with pytest.raises(DataError, match="missing its metadata.*To fix: delete .* and run again"):
        integrity.prepare_embedded(str(tmp_path / "data"), "py_stdlib",
                                   lambda: corpus.PyStdlib(data_dir=str(tmp_path / "data"), config=config,
                                                              file_format="array_record"))


def test_checked_source_names_the_shard_and_record_across_shards():
    instructions = [types.SimpleNamespace(filename="/d/a", skip=2, take=3),
                    types.SimpleNamespace(filename="/d/b", skip=0, take=4)]
    info = types.SimpleNamespace(splits={"train": types.SimpleNamespace(file_instructions=instructions)})

    class Broken:
        dataset_info, split = info, "train"

        def __len__(self):
            return 7

        def __getitem__(self, index):
            raise RuntimeError("Corrupted Riegeli/records file")

    source = integrity.CheckedSource(Broken(), "the fix")
    with pytest.raises(DataError, match=r"record 3 of the shard cannot be read .*: /d/a\. To fix: the fix"):
        source[1]
    with pytest.raises(DataError, match=r"record 1 of .*: /d/b\."):
        source[4]


def test_data_error_message_and_pickling():
    error = DataError("shard is empty", ["/d/x"], "delete /d and run again")
    assert str(error) == "shard is empty: /d/x. To fix: delete /d and run again"
    assert str(error.at_step(7)) == ("shard is empty while reading the batch of step 7: /d/x. "
                                     "To fix: delete /d and run again")
    again = pickle.loads(pickle.dumps(error.at_step(7)))
    assert (again.problem, again.files, again.fix, again.step) == ("shard is empty", ("/d/x",), error.fix, 7)
