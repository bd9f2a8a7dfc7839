"""The running interpreter's standard-library source as a tensorflow-datasets builder.

An embedded text corpus that needs no download: one example per `.py` file of
`sysconfig.get_paths()["stdlib"]`, written to ArrayRecord on first use and read back as a
random-access data source (no TensorFlow). Left out: `site-packages`/`dist-packages`,
`__pycache__`, unreadable files, and the test suites (`test`, `tests`, `idle_test`
directories), which would more than double the corpus (about 19 MB on top of 12 MB for
CPython 3.11) with mostly machine-like test code.

The files differ between Python versions, so the builder config is named after
`major.minor` (e.g. `py3.11`): two interpreters never share a cache entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import sysconfig

import tensorflow_datasets as tfds

from jaxmodels.data import integrity

NAME = "py_stdlib"
SPLITS = ("train", "validation")
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
_VALIDATION_EVERY = 20  # about 1 file in 20 goes to validation


@dataclasses.dataclass
class PyStdlibConfig(tfds.core.BuilderConfig):
    """Builder config; `root` is the directory of `.py` files (None: this interpreter's stdlib)."""

    root: str | None = None


def default_data_dir() -> str:
    """`$JAXMODELS_DATA_DIR`, else `~/.cache/jaxmodels/tensorflow_datasets`."""
    return os.environ.get("JAXMODELS_DATA_DIR") or os.path.expanduser("~/.cache/jaxmodels/tensorflow_datasets")


def split_of(relative_path: str) -> str:
    """The split of a file: "validation" for about 1 path in 20 (by SHA-1 of the path), else "train"."""
    digest = int(hashlib.sha1(relative_path.encode("utf-8")).hexdigest(), 16)
    return "validation" if digest % _VALIDATION_EVERY == 0 else "train"


def source_files(root: str) -> list[str]:
    """Sorted '/'-separated paths, relative to `root`, of the `.py` files the corpus takes."""
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIPPED_DIRS]
        rel_dir = os.path.relpath(directory, root)
        paths += [os.path.normpath(os.path.join(rel_dir, f)).replace(os.sep, "/") for f in files if f.endswith(".py")]
    return sorted(paths)


class PyStdlib(tfds.core.GeneratorBasedBuilder):
    """Standard-library `.py` files; features: text (bytes of the file), path (bytes, relative path)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [PyStdlibConfig(name="py{}.{}".format(*sys.version_info[:2]), description="this Python's stdlib")]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
            disable_shuffling=True,  # examples stay in sorted path order
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        root = self.builder_config.root or sysconfig.get_paths()["stdlib"]
        paths = source_files(root)
        return {split: self._generate_examples(root, [p for p in paths if split_of(p) == split]) for split in SPLITS}

    def _generate_examples(self, root: str, paths: list[str]):
        for path in paths:
            try:
                with open(os.path.join(root, path), "rb") as f:
                    text = f.read()
            except OSError:  # unreadable: permissions, dangling link
                continue
            yield path, {"text": text, "path": path}


def prepare(data_dir: str | None = None, *, config: PyStdlibConfig | None = None) -> PyStdlib:
    """Returns the `PyStdlib` builder, preparing it into `data_dir` on first use (never downloads).

    Safe when several processes call it at once: preparation holds an exclusive `fcntl.flock`
    on `data_dir/py_stdlib.lock`. `data_dir` defaults to `default_data_dir()`; `config` to the
    running interpreter's `py{major}.{minor}` (tests pass a `PyStdlibConfig` with a small
    `root`). Every call reads the prepared files back (tens of ms); damaged ones are prepared
    again after a warning (`integrity.prepare_embedded`). Read the result with
    `builder.as_data_source(split)`, whose items are `{"text": bytes, "path": bytes}`.
    """
    data_dir = data_dir or default_data_dir()
    return integrity.prepare_embedded(data_dir, NAME, lambda: PyStdlib(data_dir=data_dir, config=config,
                                                                       file_format="array_record"))
