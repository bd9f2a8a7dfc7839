"""Local text files as a tensorflow-datasets builder: `data.name = "text_files"`, `data.files` = {split: glob}.

Each split of `data.files` is a glob (`~` expanded, `**` recursive) of local files, read in sorted path order:

- `.txt`: one document per file (its bytes, as they are);
- `.jsonl`: one document per non-blank line, the line's `text_key` field (a string);
- `.parquet`: one document per row, the `text_key` column (strings; read with pyarrow).

They are written once to ArrayRecord in `data_dir` (never downloading anything) and read back as random-access
sources, like any prepared tfds data set; features: `text_key` (the document, bytes on reading) and `path` (its
file). The builder config is named after a hash of `text_key`, the splits and every file's path, size and
modification time, so that changed files are prepared again into a new directory and two file sets never share one.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping

import tensorflow_datasets as tfds

from jaxmodels.data import integrity

NAME = "text_files"
EXTENSIONS = (".txt", ".jsonl", ".parquet")


class _QuietCustomConfig(logging.Filter):
    """Drops tfds's "Using custom data configuration" warning for TextFiles, logged at every open: its config is
    always made on the fly (named by the files' hash), so the warning says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Using custom data configuration: TextFilesConfig(")


logging.getLogger("absl").addFilter(_QuietCustomConfig())


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    """Builder config: `files` = ((split, (path, ...)), ...) in sorted order; `text_key` the document's field."""

    files: tuple[tuple[str, tuple[str, ...]], ...] = dataclasses.field(default=(), repr=False)  # tfds logs the repr
    text_key: str = "text"


def unknown_split(split: str, splits) -> ValueError:
    """tfds's wording for a split that is not there, so that every data set says it the same way."""
    return ValueError(f"Unknown split {split!r}. Should be one of {sorted(splits)}.")


def expand(files, text_key: str = "text") -> dict[str, tuple[str, ...]]:
    """{split: sorted absolute paths} of `files` ({split: glob}, a dict or ConfigDict).

    Raises ValueError if `files` is not a non-empty mapping, a glob matches no file, a file has none of the
    extensions `.txt`, `.jsonl`, `.parquet`, or `text_key` is "path" (the feature naming each document's file).
    """
    if not (isinstance(files, Mapping) or hasattr(files, "items")) or not files:
        raise ValueError(f"data.files must be a non-empty mapping split -> glob, e.g. "
                         f"{{'train': '/data/train-*.jsonl', 'test': '/data/test/*.txt'}}; got {files!r}")
    if text_key == "path":
        raise ValueError("text_key 'path' is taken by the feature naming each document's file; choose another")
    expanded = {}
    for split, pattern in sorted(files.items()):
        if not isinstance(pattern, str):
            raise ValueError(f"data.files[{split!r}] must be a glob string, got {pattern!r}")
        paths = sorted(os.path.abspath(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                       if os.path.isfile(p))
        if not paths:
            raise ValueError(f"data.files[{split!r}] = {pattern!r} matches no file")
        unknown = [p for p in paths if not p.endswith(EXTENSIONS)]
        if unknown:
            raise ValueError(f"data.files[{split!r}] = {pattern!r} matches {unknown[0]!r}, of unknown type; "
                             f"expected one of {list(EXTENSIONS)}")
        expanded[split] = tuple(paths)
    return expanded


def make_config(files, text_key: str = "text") -> TextFilesConfig:
    """The builder config of `files` ({split: glob}): named `h` + 16 hex digits of a SHA-256 of `text_key`, the
    splits and each file's path, size and modification time (ns). Raises ValueError as `expand` does."""
    expanded = expand(files, text_key)
    stats = {split: [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
             for split, paths in expanded.items()}
    digest = hashlib.sha256(json.dumps([text_key, stats]).encode()).hexdigest()[:16]
    description = "; ".join(f"{split}: {len(paths)} files" for split, paths in expanded.items())
    return TextFilesConfig(name=f"h{digest}", description=f"{text_key!r} of local files ({description})",
                           files=tuple(expanded.items()), text_key=text_key)


def _check_text_key(path: str, text_key: str) -> None:
    """Raises ValueError naming the fields if the first record of a .jsonl / the schema of a .parquet file has no
    `text_key` (cheap: before preparing)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        if text_key not in names:
            raise ValueError(f"{path} has no column {text_key!r} (data.text_key); it has {names}")
    elif path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    _jsonl_text(path, number, line, text_key)
                    return


def _jsonl_text(path: str, number: int, line: bytes, text_key: str) -> str:
    """Field `text_key` of a JSON-object line; ValueError naming the file, line and fields when it is not there."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"line {number} of {path} is not JSON ({error})") from error
    if not isinstance(record, dict) or text_key not in record:
        fields = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"line {number} of {path} has no field {text_key!r} (data.text_key); it has {fields}")
    text = record[text_key]
    if not isinstance(text, str):
        raise ValueError(f"line {number} of {path}: field {text_key!r} is {type(text).__name__}, expected a string")
    return text


def read_documents(path: str, text_key: str) -> Iterator[str | bytes]:
    """The documents of one file, in order (see the module docstring). Raises ValueError naming the file (and
    line or row) when a document is missing or not a string."""
    if path.endswith(".txt"):
        with open(path, "rb") as f:
            yield f.read()
    elif path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield _jsonl_text(path, number, line, text_key)
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        _check_text_key(path, text_key)
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(columns=[text_key]):
            for text in batch.column(0).to_pylist():
                if not isinstance(text, str | bytes):
                    raise ValueError(f"row {row} of {path}: column {text_key!r} is {type(text).__name__}, "
                                     "expected a string")
                row += 1
                yield text
    else:
        raise ValueError(f"{path} is of unknown type; expected one of {list(EXTENSIONS)}")


class TextFiles(tfds.core.GeneratorBasedBuilder):
    """Documents of local .txt / .jsonl / .parquet files; features: `text_key` (document) and `path` (its file)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIG_CLASS = TextFilesConfig

    def _info(self) -> tfds.core.DatasetInfo:
        text_key = self.builder_config.text_key if isinstance(self.builder_config, TextFilesConfig) else "text"
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({text_key: tfds.features.Text(), "path": tfds.features.Text()}),
            disable_shuffling=True,  # documents stay in sorted path order, then file order
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        config = self.builder_config
        for _, paths in config.files:  # before writing anything
            for path in paths:
                _check_text_key(path, config.text_key)
        return {split: self._generate_examples(paths, config.text_key) for split, paths in config.files}

    def _generate_examples(self, paths: tuple[str, ...], text_key: str):
        for path in paths:
            for number, text in enumerate(read_documents(path, text_key)):
                yield f"{path}:{number}", {text_key: text, "path": path}


def fix(data_path) -> str:
    """The fix for a prepared copy of local files that preparing again did not mend."""
    return f"delete {data_path} and run again: jaxmodels prepares it afresh from data.files"


def prepare(data_dir: str, files, text_key: str = "text") -> TextFiles:
    """The `TextFiles` builder of `files` ({split: glob}), prepared into `data_dir` on first use (never downloads).

    Safe when several processes call it at once (`integrity.prepare_embedded`'s lock on
    `data_dir/text_files.lock`). A prepared copy is checked cheaply (metadata, shard record counts; not every
    record, the files may be large) and prepared again after a warning if damaged: its config name pins the source
    files' sizes and times, so the data do not change. Raises ValueError for an empty glob, a file of unknown type,
    or a `.jsonl`/`.parquet` file without `text_key` (naming the fields it has).
    """
    config = make_config(files, text_key)
    return integrity.prepare_embedded(data_dir, NAME, lambda: TextFiles(data_dir=data_dir, config=config,
                                                                        file_format="array_record"),
                                      deep=False, fix=fix)
