"""Byte-level language-modelling batches from any tensorflow-datasets text data set.

Tokens are bytes (vocabulary 256, token = byte value). The documents of a split are
concatenated in source order, with no separator, into one stream cut into non-overlapping
windows of `seq_len + 1` tokens (inputs and shifted targets). Grain shuffles the windows
(a fresh permutation each epoch), repeats them forever and cuts global batches, of which
each process takes its own contiguous rows. A batch is thus a pure function of
(seed, step, process): resuming needs only the step.

The same code reads the embedded corpus (`name="py_stdlib"`, prepared on first use) and any
real data set already prepared as ArrayRecord in `data_dir` (e.g. lm1b). Nothing here downloads.
"""

from __future__ import annotations

import functools
import itertools
import operator
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence

import grain
import numpy as np

from jaxmodels.data import corpus, integrity
from jaxmodels.data.errors import DataError

VOCAB_SIZE = 256
_CACHED_DOCUMENTS = 1024  # per TokenWindows; reading a window from a cached document is ~40x faster


def text_source(name: str, split: str, data_dir: str | None = None) -> integrity.CheckedSource:
    """Random-access documents of a prepared tfds data set; never downloads.

    `name` is a tfds name (`"lm1b"`, `"py_stdlib/py3.11"`, ...); `"py_stdlib"` is prepared on
    first use (and again if damaged). `data_dir` defaults to `corpus.default_data_dir()`. Items are
    feature dicts, text features as `bytes`. Raises ValueError if the data set is unknown, not
    prepared in `data_dir`, or has no split `split`; DataError (naming the file and the fix) if its
    files fail `integrity.verify`'s cheap checks, or later when a record cannot be read.
    """
    data_dir = data_dir or corpus.default_data_dir()
    if name == corpus.NAME:
        builder = corpus.prepare(data_dir)
        fix = integrity.embedded_fix(builder.data_path)
    else:
        builder = integrity.tfds_builder(name, data_dir)
        fix = integrity.tfds_fix(name, data_dir, builder.data_path)
    return integrity.open_split(builder, split, fix)  # an unknown split raises ValueError naming the splits


def _text(source: Sequence[dict], text_feature: str, index: int) -> bytes:
    """Document `index`'s `text_feature` as bytes."""
    text = source[index][text_feature]
    return text.encode("utf-8") if isinstance(text, str) else text


def document_texts(source: Sequence[dict], text_feature: str) -> Iterator[bytes]:
    """All documents' `text_feature`s in source order, one `source[i]` at a time (tfds's batched
    `__getitems__` runs a thread pool per call and measured slower here, even over a whole split)."""
    return (_text(source, text_feature, i) for i in range(len(source)))


def _load_cache(path: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The int64 array of `shape` stored at `path`; None, with a warning naming the file, if it is not one."""
    try:
        value = np.load(path)
    except (OSError, ValueError, EOFError) as error:
        problem = f"cannot be read ({error})"
    else:
        if value.shape == shape and value.dtype == np.int64 and (value >= 0).all():
            return value
        problem = f"holds {value.dtype}{list(value.shape)}, not non-negative int64{list(shape)}"
    warnings.warn(f"cache {path} {problem}; computing it again", stacklevel=3)
    return None


def _cached(source: Sequence[dict], key: str, shape: tuple[int, ...], compute: Callable[[], np.ndarray]) -> np.ndarray:
    """`compute()`, a non-negative int64 array of `shape`, cached as `{split}-{key}.npy` in a tfds source's
    data directory when writable. A cache file that is not such an array is computed and written again."""
    info = getattr(source, "dataset_info", None)
    directory = None if info is None else os.fspath(info.data_dir)
    if directory is None or not os.access(directory, os.W_OK):  # in-memory source, or remote/read-only data
        return compute()
    path = os.path.join(directory, f"{source.split}-{key}.npy")
    value = _load_cache(path, shape) if os.path.exists(path) else None
    if value is None:
        value = compute()
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".npy", delete=False) as f:
            np.save(f, value)
            f.flush()
            os.fsync(f.fileno())  # the rename below never exposes a file whose bytes are not on disk yet
        os.replace(f.name, path)  # atomic: concurrent processes never see a partial file
    return value


class TokenWindows:
    """Random-access windows of the byte stream of all documents of `source` concatenated.

    Item i is `np.int32[seq_len + 1]` = stream[i*seq_len : i*seq_len + seq_len + 1], tokens in
    [0, 256). There are `(stream_length - 1) // seq_len` items. Document lengths are computed
    once (cached next to a tfds source's data); an item reads only the documents it overlaps,
    through an LRU cache of the last 1024 documents read.
    """

    def __init__(self, source: Sequence[dict], seq_len: int, text_feature: str = "text"):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if len(source) and text_feature not in source[0]:
            raise ValueError(f"source has no feature {text_feature!r}; it has {sorted(source[0])}")
        lengths = _cached(source, f"{text_feature}-lengths", (len(source),),
                          lambda: np.fromiter(map(len, document_texts(source, text_feature)), np.int64, len(source)))
        self._seq_len = seq_len
        self._document = functools.lru_cache(maxsize=_CACHED_DOCUMENTS)(functools.partial(_text, source, text_feature))
        self._starts = np.concatenate([[0], np.cumsum(lengths)])  # document d is stream[starts[d]:starts[d+1]]
        self._len = max(int(self._starts[-1]) - 1, 0) // seq_len
        if self._len == 0:
            raise ValueError(f"source has {self._starts[-1]} bytes, fewer than one window of {seq_len + 1}")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        index = operator.index(index)
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} out of range [0, {self._len})")
        begin = index * self._seq_len
        end = begin + self._seq_len + 1
        first, last = np.searchsorted(self._starts, [begin, end - 1], side="right") - 1
        data = b"".join(map(self._document, range(first, last + 1)))
        offset = begin - self._starts[first]
        return np.frombuffer(data, np.uint8, count=end - begin, offset=offset).astype(np.int32)


def _local_batches(name: str, split: str, data_dir: str | None, seq_len: int, global_batch_size: int, seed: int,
                   process_index: int, process_count: int, first_step: int) -> grain.MapDataset:
    """Infinite MapDataset whose item k is this process's int32 `(B // P, seq_len + 1)` batch of step first_step + k."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}")
    if seed < 0 or first_step < 0:
        raise ValueError(f"seed and step must be >= 0, got {seed} and {first_step}")
    windows = TokenWindows(text_source(name, split, data_dir), seq_len)
    # Grain seeds epoch e with seed + e, so hash the seed: seed 1 must not replay seed 0 one epoch late.
    shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    ds = grain.MapDataset.source(windows).shuffle(seed=shuffle_seed).repeat()
    # Batch k of `ds.batch(B_l)` holds elements k*B_l + j, so slicing [p::P] gives process p at step s
    # the rows [p*B_l, (p+1)*B_l) of global batch s: elements s*B + p*B_l + j.
    return ds.batch(global_batch_size // process_count, drop_remainder=True)[process_index::process_count][first_step:]


def lm_batches(name: str, split: str, data_dir: str | None, seq_len: int, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1, start_step: int = 0,
               prefetch: int = 8) -> Iterator[np.ndarray]:
    """Endless iterator of this process's batches for steps start_step, start_step + 1, ...

    Each batch is `np.int32[global_batch_size // process_count, seq_len + 1]` of byte tokens;
    `batch[:, :-1]` are inputs and `batch[:, 1:]` targets. Process p gets rows
    [p*B_l, (p+1)*B_l) of the global batch, so the processes' batches stacked in order make the
    one-process batch. Resuming at `start_step` gives exactly the batches an uninterrupted run
    gets there. `prefetch` batches are read ahead by as many background threads (0: none).
    Raises ValueError on bad arguments (global batch not divisible by process_count, ...); DataError
    (naming the file, the fix and, once iterating, the step) on damaged data files.
    """
    ds = _local_batches(name, split, data_dir, seq_len, global_batch_size, seed, process_index, process_count,
                        start_step)
    return _naming_steps(iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch,
                                                                   prefetch_buffer_size=prefetch))), start_step)


def _naming_steps(batches: Iterator[np.ndarray], first_step: int) -> Iterator[np.ndarray]:
    """`batches` (those of steps first_step, first_step + 1, ...), with a DataError naming the step it arose in."""
    for step in itertools.count(first_step):
        try:
            batch = next(batches)
        except DataError as error:
            raise error.at_step(step) from error.__cause__
        yield batch


def lm_batch(name: str, split: str, data_dir: str | None, seq_len: int, global_batch_size: int, seed: int, step: int,
             process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """The batch `lm_batches` yields at `step`: `np.int32[global_batch_size // process_count, seq_len + 1]`."""
    return _local_batches(name, split, data_dir, seq_len, global_batch_size, seed, process_index, process_count,
                          step)[0]


def eval_batches(name: str, split: str, data_dir: str | None, seq_len: int, batch_size: int, num_batches: int,
                 seed: int = 0) -> list[np.ndarray]:
    """A fixed list of `num_batches` batches `np.int32[batch_size, seq_len + 1]` (steps 0.. at `seed`).

    Same pipeline as training, one process; a split smaller than the list wraps into a new epoch.
    """
    if num_batches < 0:
        raise ValueError(f"num_batches must be >= 0, got {num_batches}")
    ds = _local_batches(name, split, data_dir, seq_len, batch_size, seed, 0, 1, 0)
    return list(itertools.islice(_naming_steps(map(ds.__getitem__, itertools.count()), 0), num_batches))


def _byte_counts(source: Sequence[dict], text_feature: str, max_bytes: int) -> np.ndarray:
    """`np.int64[256]` histogram of the first `max_bytes` bytes of the stream."""
    counts = np.zeros(VOCAB_SIZE, np.int64)
    remaining = max_bytes
    for text in document_texts(source, text_feature):
        counts += np.bincount(np.frombuffer(text[:remaining], np.uint8), minlength=VOCAB_SIZE)
        remaining -= min(len(text), remaining)
        if remaining == 0:
            break
    return counts


def unigram_entropy_bits(name: str, split: str, data_dir: str | None, text_feature: str = "text",
                         max_bytes: int = 100_000_000) -> float:
    """Entropy in bits/byte of the byte histogram of the split's first `max_bytes` bytes.

    The loss (in bits) of the best model that ignores context; cached next to the data.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    source = text_source(name, split, data_dir)
    counts = _cached(source, f"{text_feature}-bytecounts-{max_bytes}", (VOCAB_SIZE,),
                     lambda: _byte_counts(source, text_feature, max_bytes))
    if counts.sum() == 0:
        raise ValueError(f"split {split!r} of {name!r} has no text")
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())
