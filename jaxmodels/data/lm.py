"""Language-modelling batches from any text data set, with any tokenizer.

A data set is named by the config's data section (`name`, `data_dir`, `text_key`, `files`): a prepared
tensorflow-datasets data set (the embedded `py_stdlib`, prepared on first use; lm1b or any other prepared as
ArrayRecord in `data_dir`), or local `.txt`/`.jsonl`/`.parquet` files (`name="text_files"`, `files` = {split:
glob}; `jaxmodels.data.text_files`). Nothing here downloads.

Stream. The documents of a split, in source order, make one token stream: with a tokenizer that has an
end-of-document token (`eos_id`), each document's ids followed by EOS; with the byte tokenizer (no EOS), the
documents' bytes concatenated with no separator. Document d owns `stream[starts[d]:starts[d + 1]]` (its EOS
included). A tokenizer's stream is computed once per (split, text_key, tokenizer fingerprint) and cached next to
the data (`token_stream`); the byte stream needs no tokenizing and is read from the documents themselves.

Windows. The stream is cut into non-overlapping windows of `seq_len + 1` tokens, stride `seq_len` (inputs
`tokens[:-1]`, targets `tokens[1:]`): concatenate-and-chunk. Every token is used once, no padding is spent, and
window i is a slice found by arithmetic, so the windows form a random-access source and a batch is a pure function
of (seed, step, process). Grain's first-fit packing (`grain.experimental.FirstFitPackIterDataset`) would keep more
documents whole, but it packs an *iterator* (an IterDataset): the batch of step s is then only reachable by reading
every batch before it, and resuming or sharding needs its iterator state. Attention does not cross documents in a
window when the model masks by `segment_ids` (below); the only cost is that a document cut at a window's start has
lost its beginning, as in GPT-2-style training.

Batches: dicts of NumPy arrays `{"tokens": int32 (b, seq_len + 1), "segment_ids": int32 (b, seq_len + 1)}`.
`segment_ids` number the documents inside each window 1, 2, 3, ... in order (a document continued from the previous
window is segment 1); 0 marks padding, which only the last batch of a whole-split eval (`eval_batches(...,
num_batches=0)`) has. With no EOS (bytes) documents cannot be told apart and segment_ids are all 1. Grain shuffles
the windows (a fresh permutation each epoch), repeats them forever and cuts global batches, of which each process
takes its own contiguous rows: resuming needs only the step.
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import operator
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence

import grain
import numpy as np
import tqdm

from jaxmodels.data import corpus, integrity, text_files, tokenizers
from jaxmodels.data.errors import DataError
from jaxmodels.data.tokenizers import Tokenizer

VOCAB_SIZE = 256  # of the byte tokenizer
DEFAULT_TEXT_KEY = "text"
_CACHED_DOCUMENTS = 1024  # per byte stream; reading a window from a cached document is ~40x faster
_ENCODE_DOCUMENTS = 1024  # documents per encode_batch call when tokenizing a split
_COUNT_TOKENS = 1 << 24  # tokens per bincount when counting a cached stream


def _field(data, key: str, default=None):
    """`data.key` of a ConfigDict or dict data section, `default` when missing or None."""
    value = data.get(key, default) if hasattr(data, "get") else getattr(data, key, default)
    return default if value is None else value


def text_key_of(data) -> str:
    """`data.text_key`, default "text": the feature (tfds), field (.jsonl) or column (.parquet) holding documents."""
    return _field(data, "text_key", DEFAULT_TEXT_KEY)


def text_source(name: str, split: str, data_dir: str | None = None, files=None, *,
                text_key: str = DEFAULT_TEXT_KEY) -> integrity.CheckedSource:
    """Random-access documents of a prepared tfds data set or of local files; never downloads.

    `name` is a tfds name (`"lm1b"`, `"py_stdlib/py3.11"`, ...) or `"text_files"`; `"py_stdlib"` is prepared on
    first use (and again if damaged); `"text_files"` reads `files` ({split: glob} of .txt/.jsonl/.parquet files,
    `text_key` naming the .jsonl field / .parquet column) and is prepared once per set of files
    (`text_files.prepare`); `files` is ignored for other names. `data_dir` defaults to
    `corpus.default_data_dir()`. Items are feature dicts, text features as `bytes`. Raises ValueError if the data
    set is unknown, not prepared in `data_dir`, has no split `split` (naming the splits it has), or its files do not
    fit (`text_files.expand`); DataError (naming the file and the fix) if its files fail `integrity.verify`'s cheap
    checks, or later when a record cannot be read.
    """
    data_dir = data_dir or corpus.default_data_dir()
    if name == text_files.NAME:
        if not files:
            raise ValueError(f"data.name={name!r} needs data.files, a mapping split -> glob, e.g. "
                             f"{{'train': '/data/train-*.jsonl', 'test': '/data/test/*.txt'}}; got {files!r}")
        if split not in files:
            raise text_files.unknown_split(split, files.keys())
        builder = text_files.prepare(data_dir, files, text_key)
        fix = text_files.fix(builder.data_path)
    elif name == corpus.NAME:
        builder = corpus.prepare(data_dir)
        fix = integrity.embedded_fix(builder.data_path)
    else:
        builder = integrity.tfds_builder(name, data_dir)
        fix = integrity.tfds_fix(name, data_dir, builder.data_path)
    return integrity.open_split(builder, split, fix)  # an unknown split raises ValueError naming the splits


def source_of(data, split: str) -> integrity.CheckedSource:
    """`text_source` of the data section `data` (name, data_dir, files, text_key)."""
    return text_source(_field(data, "name"), split, _field(data, "data_dir"), _field(data, "files"),
                       text_key=text_key_of(data))


def _text(source: Sequence[dict], text_key: str, index: int) -> bytes:
    """Document `index`'s `text_key` as bytes."""
    text = source[index][text_key]
    return text.encode("utf-8") if isinstance(text, str) else text


def document_texts(source: Sequence[dict], text_key: str) -> Iterator[bytes]:
    """All documents' `text_key`s in source order, one `source[i]` at a time (tfds's batched
    `__getitems__` runs a thread pool per call and measured slower here, even over a whole split)."""
    return (_text(source, text_key, i) for i in range(len(source)))


def _check_text_key(source: Sequence[dict], text_key: str) -> None:
    if len(source) and text_key not in source[0]:
        raise ValueError(f"source has no feature {text_key!r} (data.text_key); it has {sorted(source[0])}")


# ---------------------------------------------------------------------------------------------------------------
# Caches next to the data


def _cache_dir(source: Sequence[dict]) -> str | None:
    """The prepared directory of a tfds source when it is local and writable, else None (no caching)."""
    info = getattr(source, "dataset_info", None)
    directory = None if info is None else os.fspath(info.data_dir)
    if directory is None or not os.access(directory, os.W_OK):  # in-memory source, or remote/read-only data
        return None
    return directory


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


def _save_atomically(path: str, write: Callable[[object], None]) -> None:
    """Calls `write(file)` on a temporary file beside `path`, then renames it to `path` (atomic: concurrent readers
    never see a partial file; the bytes are on disk before the rename)."""
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), suffix=".npy", delete=False) as f:
        try:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            os.unlink(f.name)
            raise
    os.replace(f.name, path)


def _cached(source: Sequence[dict], key: str, shape: tuple[int, ...], compute: Callable[[], np.ndarray]) -> np.ndarray:
    """`compute()`, a non-negative int64 array of `shape`, cached as `{split}-{key}.npy` in a tfds source's
    data directory when writable. A cache file that is not such an array is computed and written again."""
    directory = _cache_dir(source)
    if directory is None:
        return compute()
    path = os.path.join(directory, f"{source.split}-{key}.npy")
    value = _load_cache(path, shape) if os.path.exists(path) else None
    if value is None:
        value = compute()
        _save_atomically(path, lambda f: np.save(f, value))
    return value


class _Lock:
    """An exclusive `fcntl.flock` on `path` (created) for the `with` block: several processes, one at a time."""

    def __init__(self, path: str):
        self._path = path

    def __enter__(self):
        os.makedirs(os.path.dirname(self._path), exist_ok=True)
        self._file = open(self._path, "w")  # closed in __exit__
        fcntl.flock(self._file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc_info):
        self._file.close()  # releases the lock


# ---------------------------------------------------------------------------------------------------------------
# Token streams


def stream_dtype(vocab_size: int) -> np.dtype:
    """The dtype a token stream is stored in: uint16 when ids fit (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def stream_cache_paths(source: Sequence[dict], tokenizer: Tokenizer, text_key: str) -> tuple[str, str] | None:
    """(tokens, starts) cache paths of `token_stream` in the source's prepared directory:
    `{split}-{text_key}-{fingerprint}-tokens.npy` and `...-starts.npy`; None when the source is not cacheable."""
    directory = _cache_dir(source)
    if directory is None:
        return None
    stem = os.path.join(directory, f"{source.split}-{text_key}-{tokenizer.fingerprint()}")
    return f"{stem}-tokens.npy", f"{stem}-starts.npy"


def _encoded_documents(source: Sequence[dict], tokenizer: Tokenizer, text_key: str) -> Iterator[list[list[int]]]:
    """The documents' ids (EOS appended when the tokenizer has one), `_ENCODE_DOCUMENTS` at a time, with a bar."""
    suffix = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    split = getattr(source, "split", "source")
    texts = document_texts(source, text_key)
    with tqdm.tqdm(total=len(source), desc=f"tokenizing {split}", unit="doc", unit_scale=True, mininterval=2) as bar:
        while chunk := list(itertools.islice(texts, _ENCODE_DOCUMENTS)):
            yield [ids + suffix for ids in tokenizer.encode_batch(chunk)]
            bar.update(len(chunk))


def _tokenize(source: Sequence[dict], tokenizer: Tokenizer, text_key: str,
              paths: tuple[str, str] | None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, starts) of the split, written to `paths` (atomically, starts last) when given. Tokens go to a raw
    file as they come, so memory holds one chunk of documents, not the stream."""
    dtype = stream_dtype(tokenizer.vocab_size)
    lengths = np.zeros(len(source), np.int64)
    if paths is None:
        chunks, done = [], 0
        for encoded in _encoded_documents(source, tokenizer, text_key):
            lengths[done:done + len(encoded)] = list(map(len, encoded))
            chunks += [np.asarray(ids, dtype) for ids in encoded]
            done += len(encoded)
        return np.concatenate([np.zeros(0, dtype), *chunks]), np.concatenate([[0], np.cumsum(lengths)])
    tokens_path, starts_path = paths
    with tempfile.TemporaryFile(dir=os.path.dirname(tokens_path)) as raw:
        done = 0
        for encoded in _encoded_documents(source, tokenizer, text_key):
            lengths[done:done + len(encoded)] = list(map(len, encoded))
            raw.write(np.fromiter(itertools.chain.from_iterable(encoded), dtype).tobytes())
            done += len(encoded)
        starts = np.concatenate([[0], np.cumsum(lengths)])

        def write_tokens(f):
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (int(starts[-1]),)}
            np.lib.format.write_array_header_1_0(f, header)
            raw.seek(0)
            shutil.copyfileobj(raw, f, 1 << 24)

        _save_atomically(tokens_path, write_tokens)
    _save_atomically(starts_path, lambda f: np.save(f, starts))
    return np.load(tokens_path, mmap_mode="r"), starts


def _load_stream(paths: tuple[str, str], tokenizer: Tokenizer, num_documents: int) -> tuple | None:
    """The cached (tokens memory-mapped, starts) if both files are there and consistent; None, with a warning naming
    the file at fault, when they are damaged; None, silently, when missing."""
    tokens_path, starts_path = paths
    if not (os.path.exists(tokens_path) and os.path.exists(starts_path)):
        return None
    dtype, path = stream_dtype(tokenizer.vocab_size), tokens_path
    try:
        tokens = np.load(tokens_path, mmap_mode="r")
        path = starts_path
        starts = np.load(starts_path)
    except (OSError, ValueError, EOFError) as error:
        problem = f"cannot be read ({error})"
    else:
        if tokens.dtype != dtype or tokens.ndim != 1:
            path, problem = tokens_path, f"holds {tokens.dtype}{list(tokens.shape)}, not a {dtype} vector"
        elif starts.dtype != np.int64 or starts.shape != (num_documents + 1,):
            problem = f"holds {starts.dtype}{list(starts.shape)}, not int64[{num_documents + 1}]"
        elif starts[0] != 0 or (np.diff(starts) < 0).any() or starts[-1] != len(tokens):
            problem = f"does not hold increasing offsets from 0 to the {len(tokens)} tokens of {tokens_path}"
        elif tokenizer.eos_id is not None and (np.diff(starts) < 1).any():
            problem = "holds an empty document, but every document ends with EOS"
        elif tokenizer.eos_id is not None and (tokens[starts[1:] - 1] != tokenizer.eos_id).any():
            path, problem = tokens_path, f"does not hold EOS ({tokenizer.eos_id}) at the end of every document"
        else:
            return tokens, starts
    warnings.warn(f"cache {path} {problem}; computing it again", stacklevel=3)
    return None


def token_stream(source: Sequence[dict], tokenizer: Tokenizer,
                 text_key: str = DEFAULT_TEXT_KEY) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, starts) of all documents of `source`: tokens `uint16[T]` (`uint32` when vocab_size > 65536), each
    document's ids followed by EOS (when the tokenizer has one); starts `int64[num_documents + 1]`, document d
    being `tokens[starts[d]:starts[d + 1]]`.

    Computed once per (split, text_key, tokenizer fingerprint), with a progress bar and the tokenizer's batched
    encoder, and cached in the source's prepared directory as `{split}-{text_key}-{fingerprint}-tokens.npy` /
    `-starts.npy` (tokens read back memory-mapped). Several processes may call it at once: one tokenizes (under an
    `fcntl` lock on `...-tokens.lock`) while the others wait and read its files. Damaged cache files (unreadable,
    wrong dtype or length, offsets not ending with EOS) are computed again after a warning naming the file.
    In-memory sources and read-only data are tokenized in memory every time.
    """
    _check_text_key(source, text_key)
    paths = stream_cache_paths(source, tokenizer, text_key)
    if paths is None:
        return _tokenize(source, tokenizer, text_key, None)
    with _Lock(paths[0].removesuffix(".npy") + ".lock"):
        cached = _load_stream(paths, tokenizer, len(source))
        if cached is not None:
            return cached
        print(f"tokenizing split {source.split!r} ({len(source)} documents, {text_key!r}) with "
              f"{tokenizer.name} ({tokenizer.vocab_size} ids) into {paths[0]}", flush=True)
        return _tokenize(source, tokenizer, text_key, paths)


class _ByteStream:
    """The byte tokenizer's stream, read from the documents themselves: no tokenizing, no copy of the text.
    Document lengths are computed once (cached as `{split}-{text_key}-lengths.npy` next to a tfds source's data);
    a read takes only the documents it overlaps, through an LRU cache of the last 1024 documents read."""

    eos_id = None

    def __init__(self, source: Sequence[dict], text_key: str):
        _check_text_key(source, text_key)
        lengths = _cached(source, f"{text_key}-lengths", (len(source),),
                          lambda: np.fromiter(map(len, document_texts(source, text_key)), np.int64, len(source)))
        self.starts = np.concatenate([[0], np.cumsum(lengths)])
        self._document = functools.lru_cache(maxsize=_CACHED_DOCUMENTS)(functools.partial(_text, source, text_key))

    def read(self, begin: int, end: int) -> np.ndarray:
        """stream[begin:end] as int32."""
        first, last = np.searchsorted(self.starts, [begin, end - 1], side="right") - 1
        data = b"".join(map(self._document, range(first, last + 1)))
        return np.frombuffer(data, np.uint8, count=end - begin, offset=begin - self.starts[first]).astype(np.int32)


class _ArrayStream:
    """A tokenizer's cached stream (`token_stream`)."""

    def __init__(self, source: Sequence[dict], tokenizer: Tokenizer, text_key: str):
        self.eos_id = tokenizer.eos_id
        self._tokens, self.starts = token_stream(source, tokenizer, text_key)

    def read(self, begin: int, end: int) -> np.ndarray:
        return np.asarray(self._tokens[begin:end], np.int32)


class TokenWindows:
    """Random-access windows of the token stream of `source` (see the module docstring).

    Item i is `{"tokens": np.int32[seq_len + 1], "segment_ids": np.int32[seq_len + 1]}`, tokens =
    stream[i*seq_len : i*seq_len + seq_len + 1], ids in [0, vocab_size); segment_ids number the documents in the
    window from 1 (all 1 for a tokenizer without EOS). There are `(stream_length - 1) // seq_len` items.
    `tokenizer` None or the byte tokenizer reads the documents' bytes directly (`_ByteStream`); any other is
    tokenized once and cached (`token_stream`).
    """

    def __init__(self, source: Sequence[dict], seq_len: int, tokenizer: Tokenizer | None = None,
                 text_key: str = DEFAULT_TEXT_KEY):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int | np.integer) or seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len!r}")
        if tokenizer is None or isinstance(tokenizer, tokenizers.ByteTokenizer):
            self._stream = _ByteStream(source, text_key)
        else:
            self._stream = _ArrayStream(source, tokenizer, text_key)
        self._seq_len = int(seq_len)
        self.starts = self._stream.starts  # document d is stream[starts[d]:starts[d + 1]]
        self._len = max(int(self.starts[-1]) - 1, 0) // self._seq_len
        if self._len == 0:
            raise ValueError(f"source has {self.starts[-1]} tokens, fewer than one window of {seq_len + 1}")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = operator.index(index)
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} out of range [0, {self._len})")
        begin = index * self._seq_len
        end = begin + self._seq_len + 1
        if self._stream.eos_id is None:  # documents cannot be told apart
            segment_ids = np.ones(end - begin, np.int32)
        else:  # 1 + the number of documents begun after the window's first, at each position
            first, last = np.searchsorted(self.starts, [begin, end - 1], side="right") - 1
            begins = np.zeros(end - begin, np.int32)
            begins[self.starts[first + 1:last + 1] - begin] = 1  # distinct: with EOS no document is empty
            segment_ids = 1 + np.cumsum(begins, dtype=np.int32)
        return {"tokens": self._stream.read(begin, end), "segment_ids": segment_ids}


def windows_of(data, tokenizer: Tokenizer, split: str) -> TokenWindows:
    """The `TokenWindows` of split `split` of the data section `data` (name, data_dir, files, text_key, seq_len)."""
    return TokenWindows(source_of(data, split), _field(data, "seq_len"), tokenizer, text_key_of(data))


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def bpe_path(data, vocab_size: int) -> str:
    """Where `resolve_tokenizer` keeps the byte-level BPE of `data.tokenizer = "bpe:VOCAB"`:
    `{data_dir}/tokenizers/{data set}-{train_split}-{text_key}-bpe{VOCAB}/tokenizer.json`, the data set being its
    tfds full name with "/" as "_" (e.g. `py_stdlib_py3.11_1.0.0`, `text_files_h<hash>_1.0.0`); data_dir falls
    back to `corpus.default_data_dir()` when the data's own is not writable (remote or read-only)."""
    split = _field(data, "train_split", "train")
    source = source_of(data, split)
    data_dir = _field(data, "data_dir") or corpus.default_data_dir()
    if not os.access(data_dir, os.W_OK):
        data_dir = corpus.default_data_dir()
    name = source.dataset_info.full_name.replace("/", "_")
    return os.path.join(data_dir, "tokenizers", f"{name}-{split}-{text_key_of(data)}-bpe{vocab_size}",
                        "tokenizer.json")


def resolve_tokenizer(data) -> Tokenizer:
    """The tokenizer of the data section `data`: `data.tokenizer` is "byte" (also when missing), a tokenizer file
    or directory (`tokenizers.make_tokenizer`), or "bpe:VOCAB": a byte-level BPE of VOCAB ids (>= 257) trained on
    split `data.train_split` (default "train") of the data set, field `data.text_key`, and kept at `bpe_path`, so a
    fresh machine makes its own from the data with nothing to fetch. Training happens once, under an `fcntl` lock
    (several processes may call this at once), into a temporary directory renamed into place, and prints what it
    trained; a kept tokenizer that does not load is trained again after a warning. Raises ValueError naming the
    field for a bad spec.
    """
    spec = _field(data, "tokenizer", tokenizers.BYTE)
    if not isinstance(spec, str):
        raise ValueError(f"data.tokenizer must be a string ('byte', 'bpe:VOCAB' or a path), got {spec!r}")
    if not spec.startswith("bpe:"):
        return tokenizers.make_tokenizer(spec)
    vocab = spec.removeprefix("bpe:")
    if not vocab.isdigit() or int(vocab) < 257:
        raise ValueError(f"data.tokenizer={spec!r}: expected 'bpe:VOCAB' with VOCAB an integer >= 257 (256 bytes + "
                         "EOS), e.g. 'bpe:4096'")
    path = bpe_path(data, int(vocab))
    directory = os.path.dirname(path)
    with _Lock(directory + ".lock"):
        if os.path.exists(directory):
            try:
                return tokenizers.make_tokenizer(path)
            except Exception as error:  # a damaged or partial file: any of json's, tokenizers' or our errors
                warnings.warn(f"tokenizer {path} cannot be loaded ({error}); training it again", stacklevel=2)
                shutil.rmtree(directory)
        split, text_key = _field(data, "train_split", "train"), text_key_of(data)
        source = source_of(data, split)
        _check_text_key(source, text_key)
        temporary = tempfile.mkdtemp(dir=os.path.dirname(directory), prefix=os.path.basename(directory) + ".tmp")
        try:
            tokenizers.train_bpe(document_texts(source, text_key), int(vocab),
                                 os.path.join(temporary, "tokenizer.json"))
            os.rename(temporary, directory)  # atomic: the directory appears complete or not at all
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        tokenizer = tokenizers.make_tokenizer(path)
        print(f"trained a byte-level BPE tokenizer of {tokenizer.vocab_size} ids (EOS {tokenizer.eos_id}) on split "
              f"{split!r} of {_field(data, 'name')!r} ({len(source)} documents, {text_key!r}): {path}", flush=True)
        return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Batches


def _check_batching(global_batch_size: int, seed: int, process_index: int, process_count: int, step: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}")
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got {seed} and {step}")


def _local_batches(data, tokenizer: Tokenizer, split: str, global_batch_size: int, seed: int, process_index: int,
                   process_count: int, first_step: int) -> grain.MapDataset:
    """Infinite MapDataset whose item k is this process's batch of step first_step + k."""
    _check_batching(global_batch_size, seed, process_index, process_count, first_step)
    windows = windows_of(data, tokenizer, split)
    # Grain seeds epoch e with seed + e, so hash the seed: seed 1 must not replay seed 0 one epoch late.
    shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    ds = grain.MapDataset.source(windows).shuffle(seed=shuffle_seed).repeat()
    # Batch k of `ds.batch(B_l)` holds elements k*B_l + j, so slicing [p::P] gives process p at step s
    # the rows [p*B_l, (p+1)*B_l) of global batch s: elements s*B + p*B_l + j.
    return ds.batch(global_batch_size // process_count, drop_remainder=True)[process_index::process_count][first_step:]


def lm_batches(data, tokenizer: Tokenizer, *, split: str, global_batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1, start_step: int = 0, prefetch: int = 8) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator of this process's batches for steps start_step, start_step + 1, ...

    `data`: the data section (name, data_dir, seq_len, text_key, files); `tokenizer`: `resolve_tokenizer(data)`.
    Each batch is `{"tokens": np.int32[B_l, seq_len + 1], "segment_ids": np.int32[B_l, seq_len + 1]}` with
    B_l = global_batch_size // process_count (see the module docstring); `tokens[:, :-1]` are inputs and
    `tokens[:, 1:]` targets. Windows are shuffled afresh each epoch. Process p gets rows [p*B_l, (p+1)*B_l) of the
    global batch, so the processes' batches stacked in order make the one-process batch. Resuming at `start_step`
    gives exactly the batches an uninterrupted run gets there. `prefetch` batches are read ahead by as many
    background threads (0: none). Raises ValueError on bad arguments (global batch not divisible by process_count,
    ...); DataError (naming the file, the fix and, once iterating, the step) on damaged data files.
    """
    ds = _local_batches(data, tokenizer, split, global_batch_size, seed, process_index, process_count, start_step)
    return _naming_steps(iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch,
                                                                   prefetch_buffer_size=prefetch))), start_step)


def _naming_steps(batches: Iterator, first_step: int) -> Iterator:
    """`batches` (those of steps first_step, first_step + 1, ...), with a DataError naming the step it arose in."""
    for step in itertools.count(first_step):
        try:
            batch = next(batches)
        except StopIteration:
            return
        except DataError as error:
            raise error.at_step(step) from error.__cause__
        yield batch


def lm_batch(data, tokenizer: Tokenizer, *, split: str, global_batch_size: int, seed: int, step: int,
             process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    """The batch `lm_batches` yields at `step`: `{"tokens", "segment_ids"}`, each
    `np.int32[global_batch_size // process_count, seq_len + 1]`."""
    return _local_batches(data, tokenizer, split, global_batch_size, seed, process_index, process_count, step)[0]


def _pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """`batch` with zero rows (tokens 0, segment_ids 0: padding) appended up to `rows`."""
    return {k: np.concatenate([v, np.zeros((rows - len(v), *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def _whole_split(windows: TokenWindows, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    for first in range(0, len(windows), batch_size):
        rows = [windows[i] for i in range(first, min(first + batch_size, len(windows)))]
        yield _pad_rows({k: np.stack([r[k] for r in rows]) for k in rows[0]}, batch_size)


def eval_batches(data, tokenizer: Tokenizer, *, split: str, batch_size: int,
                 num_batches: int) -> list[dict[str, np.ndarray]]:
    """Eval batches of split `split`, each `{"tokens", "segment_ids"}: np.int32[batch_size, seq_len + 1]`.

    `num_batches > 0`: the first `num_batches` batches of the training pipeline at seed 0, one process (a split
    smaller than the list wraps into a new epoch): a fixed sample. `num_batches == 0`: every window of the split
    exactly once, in stream order; the last batch is padded to `batch_size` rows of tokens 0 and segment_ids 0
    (mask targets by `segment_ids[:, 1:] != 0`). The list is held in memory: (windows x (seq_len + 1) x 8) bytes.
    Raises ValueError on bad arguments; DataError naming the batch ("step") being read on damaged data files.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 0:
        raise ValueError(f"num_batches must be an int >= 0 (0: the whole split), got {num_batches!r}")
    if num_batches == 0:
        _check_batching(batch_size, 0, 0, 1, 0)
        return list(_naming_steps(_whole_split(windows_of(data, tokenizer, split), batch_size), 0))
    ds = _local_batches(data, tokenizer, split, batch_size, 0, 0, 1, 0)
    return list(itertools.islice(_naming_steps(map(ds.__getitem__, itertools.count()), 0), num_batches))


# ---------------------------------------------------------------------------------------------------------------
# Baselines


def _byte_counts(source: Sequence[dict], text_key: str, max_bytes: int | None) -> np.ndarray:
    """`np.int64[256]` histogram of the first `max_bytes` bytes of the byte stream (None: all of it)."""
    counts = np.zeros(VOCAB_SIZE, np.int64)
    remaining = np.inf if max_bytes is None else max_bytes
    for text in document_texts(source, text_key):
        take = text if max_bytes is None else text[:remaining]
        counts += np.bincount(np.frombuffer(take, np.uint8), minlength=VOCAB_SIZE)
        remaining -= len(take)
        if remaining == 0:
            break
    return counts


def unigram_entropy_bits(name: str, split: str, data_dir: str | None, text_feature: str = DEFAULT_TEXT_KEY,
                         max_bytes: int = 100_000_000) -> float:
    """Entropy in bits/byte of the byte histogram of the split's first `max_bytes` bytes.

    The loss (in bits) of the best model that ignores context; cached next to the data.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    source = text_source(name, split, data_dir, text_key=text_feature)
    _check_text_key(source, text_feature)
    counts = _cached(source, f"{text_feature}-bytecounts-{max_bytes}", (VOCAB_SIZE,),
                     lambda: _byte_counts(source, text_feature, max_bytes))
    if counts.sum() == 0:
        raise ValueError(f"split {split!r} of {name!r} has no text")
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def unigram_counts(data, tokenizer: Tokenizer, split: str) -> np.ndarray:
    """`np.int64[vocab_size]`: how often each id occurs in the split's token stream (EOS included); cached next to
    the data as `{split}-{text_key}-{fingerprint}-unigram.npy`."""
    source, text_key = source_of(data, split), text_key_of(data)
    _check_text_key(source, text_key)
    if isinstance(tokenizer, tokenizers.ByteTokenizer):
        compute = lambda: _byte_counts(source, text_key, None)
    else:
        def compute():
            tokens, _ = token_stream(source, tokenizer, text_key)
            counts = np.zeros(tokenizer.vocab_size, np.int64)
            for begin in range(0, len(tokens), _COUNT_TOKENS):
                counts += np.bincount(tokens[begin:begin + _COUNT_TOKENS], minlength=tokenizer.vocab_size)
            return counts
    return _cached(source, f"{text_key}-{tokenizer.fingerprint()}-unigram", (tokenizer.vocab_size,), compute)


def _counts_and_bytes(data, tokenizer: Tokenizer, split: str) -> tuple[np.ndarray, int]:
    counts = unigram_counts(data, tokenizer, split)
    total_bytes = int(counts @ tokenizer.token_byte_lengths().astype(np.int64))
    if total_bytes == 0:
        raise ValueError(f"split {split!r} of {_field(data, 'name')!r} has no text")
    return counts, total_bytes


def unigram_entropy_bits_per_byte(data, tokenizer: Tokenizer, split: str) -> float:
    """The loss of the best context-free model of the split's token stream, in bits per byte of text: with p the
    unigram distribution of the stream (EOS included), sum over tokens of -log2 p(token) / the UTF-8 bytes the
    tokens stand for (`token_byte_lengths`; EOS stands for none). Comparable across tokenizers; for bytes it is the
    entropy of the byte histogram (`unigram_entropy_bits` of the whole split). Cached (`unigram_counts`)."""
    counts, total_bytes = _counts_and_bytes(data, tokenizer, split)
    seen = counts[counts > 0]
    return float(-(seen * np.log2(seen / counts.sum())).sum() / total_bytes)


def bytes_per_token(data, tokenizer: Tokenizer, split: str) -> float:
    """Mean UTF-8 bytes of text per token of the split's stream (EOS included, standing for 0 bytes): loss in
    bits/token / bytes_per_token = bits/byte on average. Cached (`unigram_counts`)."""
    counts, total_bytes = _counts_and_bytes(data, tokenizer, split)
    return total_bytes / int(counts.sum())
