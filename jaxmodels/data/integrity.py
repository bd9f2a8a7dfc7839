"""Checks of a prepared tfds data set's files, and reads that name the file when they fail.

`verify` checks a prepared data set's directory (`DATA_DIR/NAME[/CONFIG]/VERSION`): its
`dataset_info.json` and `features.json` are there, and every ArrayRecord shard a
split lists is there, non-empty, opens, and holds the number of records `dataset_info.json`
gives (read from the shard's footer: cheap). With `deep=True` it also reads every record, so
that Riegeli's chunk hashes catch corrupt bytes; that costs a read of the whole split and is
used for the small embedded data sets only. Failures raise `DataError` naming the file and the fix.

`prepare_embedded` prepares one of the library's own data sets (made from files installed on
this machine, in seconds) and, when `verify(deep=True)` finds it damaged, warns, deletes it and
prepares it again: nothing is lost, since the data are a pure function of the installed files,
and the batches do not change. A user's data set (lm1b, ...) is never touched: `open_split`
raises with the fix, to re-prepare it with tfds.

`CheckedSource` wraps a tfds data source so that a record that cannot be read (corrupt bytes
that the cheap checks cannot see) raises `DataError` naming its shard and its index there.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordReader
from etils import epath
from google.protobuf import json_format
from tensorflow_datasets.core.dataset_info import DatasetInfoFileError

from jaxmodels.data.errors import DataError

METADATA_FILES = ("dataset_info.json", "features.json")
_CHECK_THREADS = 16  # shards checked at once: opening one reads its footer, a round trip on remote storage


def embedded_fix(data_path) -> str:
    """The fix for a damaged embedded data set that re-preparing did not mend."""
    return f"delete {data_path} and run again: jaxmodels prepares it afresh from the installed files"


def tfds_fix(name: str, data_dir: str, data_path) -> str:
    """The fix for a damaged user data set `name` (a tfds name) prepared in `data_dir`."""
    return (f"re-prepare it: delete {data_path} and prepare {name!r} there again with tfds, e.g. "
            f"tfds.builder({name!r}, data_dir={data_dir!r}, file_format='array_record').download_and_prepare()")


def _check_metadata(builder: tfds.core.DatasetBuilder, fix: str) -> None:
    """Raises DataError unless the metadata files are in the builder's prepared directory."""
    missing = [builder.data_path / f for f in METADATA_FILES if not (builder.data_path / f).exists()]
    if missing:
        raise DataError("prepared data set is missing its metadata", missing, fix)


def _check_shard(path: str, num_records: int, fix: str, deep: bool) -> None:
    """Raises DataError unless the ArrayRecord shard `path` is there, opens and holds `num_records` records
    (all readable when `deep`)."""
    if not epath.Path(path).exists():
        raise DataError("shard is missing", [path], fix)
    if epath.Path(path).stat().length == 0:
        raise DataError("shard is empty", [path], fix)
    count, index = None, 0
    try:
        reader = ArrayRecordReader(path)
        if reader.ok():  # a reader that failed to open reports 0 records, and its error on close
            count = reader.num_records()
            while deep and count == num_records and index < count:
                reader.read()
                index += 1
        reader.close()
        if count is None:
            raise RuntimeError(f"ArrayRecordReader({path!r}) failed to open")
    except Exception as error:
        problem = ("shard cannot be opened (truncated, or not an ArrayRecord file)" if count is None
                   else f"record {index} of the shard cannot be read (corrupt bytes)")
        raise DataError(problem, [path], fix) from error
    if count != num_records:
        raise DataError(f"shard holds {count} records where dataset_info.json lists {num_records}", [path], fix)


def verify(builder: tfds.core.DatasetBuilder, fix: str, splits: Sequence[str] | None = None, *,
           deep: bool = False) -> None:
    """Raises DataError (naming the file and `fix`) unless `builder`'s prepared files are sound.

    Checks the metadata files and every shard of `splits` (default: all): there, non-empty, opens,
    and the record count of dataset_info.json; with `deep`, reads every record too.
    """
    _check_metadata(builder, fix)
    shards = {i.filename: i.examples_in_shard for split in (splits or builder.info.splits)
              for i in builder.info.splits[split].file_instructions}
    with ThreadPoolExecutor(min(_CHECK_THREADS, max(len(shards), 1))) as pool:
        list(pool.map(lambda item: _check_shard(*item, fix, deep), shards.items()))


class CheckedSource(Sequence):
    """A tfds data source whose failed reads raise DataError naming the shard, the record and `fix`.

    Exposes the wrapped source's `dataset_info` and `split`; items are the wrapped source's.
    """

    def __init__(self, source, fix: str):
        self._source, self.fix = source, fix
        self.dataset_info, self.split = source.dataset_info, source.split
        self._instructions = self.dataset_info.splits[self.split].file_instructions

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int):
        try:
            return self._source[index]
        except IndexError:
            raise
        except Exception as error:
            path, record = self._locate(index)
            raise DataError(f"record {record} of the shard cannot be read (corrupt bytes)", [path],
                            self.fix) from error

    def _locate(self, index: int) -> tuple[str, int]:
        """(shard path, record index in the shard) of the source's item `index`."""
        for instruction in self._instructions:
            if index < instruction.take:
                return instruction.filename, instruction.skip + index
            index -= instruction.take
        raise IndexError(index)


def open_split(builder: tfds.core.DatasetBuilder, split: str, fix: str) -> CheckedSource:
    """`builder.as_data_source(split)` as a CheckedSource, after `verify`'s cheap checks of that split.

    An unknown split raises ValueError naming the splits.
    """
    verify(builder, fix, [split])  # before as_data_source, which opens the shards and fails on a damaged one
    return CheckedSource(builder.as_data_source(split=split), fix)


def image_label_arrays(builder: tfds.core.DatasetBuilder, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A prepared embedded image set's whole split in index order, read through `CheckedSource` (a damaged file
    names its fix): (images (M, ...) as stored, labels int64 (M,), indices int64 (M,)) from the records'
    "image", "label" and "index" features, read-only (callers cache and share them)."""
    source = CheckedSource(builder.as_data_source(split), embedded_fix(builder.data_path))
    items = [source[i] for i in range(len(source))]
    arrays = (np.stack([x["image"] for x in items]), np.array([x["label"] for x in items], np.int64),
              np.array([x["index"] for x in items], np.int64))
    for a in arrays:
        a.flags.writeable = False
    return arrays


def tfds_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """`tfds.builder(name, data_dir=data_dir)` of a data set prepared there; never downloads.

    Raises ValueError if `name` is unknown (tfds's DatasetNotFoundError) or not prepared in
    `data_dir`; DataError if its `dataset_info.json` is missing or cannot be read.
    """
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except (DatasetInfoFileError, json_format.Error) as error:  # the directory is there, its metadata is not
        where = os.path.join(data_dir, *name.replace(":", "/").split("/"))
        raise DataError(f"the prepared data set's dataset_info.json is missing or cannot be read ({error})", [where],
                        tfds_fix(name, data_dir, where)) from error
    if not builder.data_path.exists():
        raise ValueError(f"data set {name!r} is not prepared in {builder.data_dir}; jaxmodels never downloads: "
                         "prepare it there first with tfds (file_format='array_record')")
    return builder


def _prepare(builder: tfds.core.DatasetBuilder) -> None:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def prepare_embedded(data_dir: str, lock_name: str, make_builder: Callable[[], tfds.core.DatasetBuilder], *,
                     deep: bool = True, fix: Callable[[epath.Path], str] = embedded_fix) -> tfds.core.DatasetBuilder:
    """`make_builder()`'s data set, prepared in `data_dir` on first use (never downloads) and verified.

    Holds an exclusive `fcntl.flock` on `data_dir/{lock_name}.lock` throughout, so that several
    processes may call it at once. A prepared copy that fails `verify(deep=deep)` is deleted, with a
    warning naming the file at fault, and prepared again; a fresh copy that fails raises DataError
    with `fix(builder.data_path)`. `deep=False` (cheap checks only) suits data sets too large to read
    at every start (local text files); their damaged records are named when read (`CheckedSource`).
    """
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f"{lock_name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = make_builder()
        if builder.data_path.exists():
            try:
                verify(builder, fix(builder.data_path), deep=deep)
                return builder
            except DataError as error:
                warnings.warn(f"{error.problem}: {', '.join(error.files)}; deleting {builder.data_path} and "
                              "preparing it again", stacklevel=3)
                shutil.rmtree(builder.data_path)
                builder = make_builder()  # forget the damaged copy's metadata
        _prepare(builder)
        verify(builder, fix(builder.data_path), deep=deep)
    return builder
