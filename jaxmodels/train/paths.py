"""A run's paths: local folders and object-store URLs (gs://, s3://, ...) alike, through etils.epath.

epath picks the backend from the URL: local files for a plain path, fsspec (gcsfs for gs://, s3fs
for s3://) for a bucket URL. Orbax writes its arrays through TensorStore, which speaks gs:// and
s3:// itself. Object stores have no append, so `open_append` keeps a remote file's contents in memory
and uploads them whole (`ObjectFile`); TensorBoard's event files are written the same way
(`register_tensorboard_scheme`).
"""

import io
import os
import time

from etils import epath

# What to install for each URL scheme's epath backend (fsspec's implementations).
BACKEND_PACKAGES = {"gs": "gcsfs (pip install 'jaxmodels[gcs]')", "s3": "s3fs", "az": "adlfs",
                    "hf": "huggingface_hub"}


class WorkdirError(ValueError):
    """The workdir cannot be written: the message names it and what to install or fix."""


def scheme(path) -> str | None:
    """The URL scheme of `path` ("gs" for gs://bucket/run), None for a local path."""
    text = os.fspath(path)
    return text.split("://", 1)[0] if "://" in text else None


def is_local(path) -> bool:
    return scheme(path) is None


def workdir_path(workdir) -> epath.Path:
    """The workdir as an epath.Path: a URL as it is, a local path made absolute (orbax wants that)."""
    text = os.fspath(workdir)
    return epath.Path(text if scheme(text) else os.path.abspath(text))


def check_writable(workdir: epath.Path, process_index: int = 0) -> None:
    """Create `workdir` and write and delete a small file in it; raise WorkdirError naming the workdir and
    what to install (no backend for its URL scheme) or fix (permissions, a file in the way, credentials)."""
    probe = workdir / f".write_test.{process_index}"
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except ImportError as e:
        package = BACKEND_PACKAGES.get(scheme(workdir), "the fsspec implementation for it")
        raise WorkdirError(f"workdir {workdir}: no file-system backend for {scheme(workdir)}:// URLs is installed "
                           f"({e}); install {package}") from None
    except Exception as e:  # OSError locally; object-store clients raise their own HTTP/auth errors
        raise WorkdirError(f"cannot write to workdir {workdir} ({type(e).__name__}: {e}); choose a --workdir "
                           "this run can write, or fix its permissions or credentials") from None


class ObjectFile:
    """A file on an object store that is written by appending. Object stores cannot append to an object,
    so the whole contents stay in memory and are uploaded again on `flush` (at most every
    `min_interval_s` seconds, to bound the traffic) and on `close`."""

    def __init__(self, path: epath.Path, initial: bytes = b"", min_interval_s: float = 30.0):
        self.path, self.min_interval_s = path, min_interval_s
        self.buffer = io.BytesIO(initial)
        self.buffer.seek(0, io.SEEK_END)
        self.uploaded_at, self.dirty = time.monotonic(), False

    def write(self, data: bytes | str) -> None:
        self.buffer.write(data.encode() if isinstance(data, str) else data)
        self.dirty = True

    def flush(self, force: bool = False) -> None:
        if self.dirty and (force or time.monotonic() - self.uploaded_at >= self.min_interval_s):
            self.path.write_bytes(self.buffer.getvalue())
            self.uploaded_at, self.dirty = time.monotonic(), False

    def close(self) -> None:
        self.flush(force=True)


def open_append(path: epath.Path):
    """A file to append text to: an ordinary file locally, an `ObjectFile` on an object store."""
    if is_local(path):
        return open(path, "a")
    return ObjectFile(path, path.read_bytes() if path.exists() else b"")


class _TensorBoardObjectFiles:
    """tensorboardX's writer factory for a URL scheme: event files written through epath (`ObjectFile`)."""

    def open(self, path: str) -> ObjectFile:
        return ObjectFile(epath.Path(path))

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def register_tensorboard_scheme(url_scheme: str) -> None:
    """Make tensorboardX write event files for `url_scheme`:// logdirs through epath, so that they go
    where (and with the backend and credentials with which) every other file of the run goes. This
    replaces tensorboardX's own gs:// writer, which needs google-cloud-storage."""
    from tensorboardX import record_writer

    record_writer.register_writer_factory(url_scheme, _TensorBoardObjectFiles())


def copy_tree(source: str, destination: epath.Path) -> None:
    """Copy the local folder `source` into `destination` (a local path or a URL), file by file."""
    for root, _, files in os.walk(source):
        for name in files:
            target = destination / os.path.relpath(os.path.join(root, name), source)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(epath.Path(root, name).read_bytes())
