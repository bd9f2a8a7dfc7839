"""LM batches over a tfds data set with the byte tokenizer: windows of the naive stream, unchanged by the
tokenizer API, resumable, host-sharded, offline."""

import hashlib
import os

import numpy as np
import pytest

from jaxmodels.data import corpus, lm, tokenizers
from tests.data.test_corpus import prepare_fake

NAME = "py_stdlib/fake"  # read back through the generic tfds path, like lm1b would be
BYTE = tokenizers.make_tokenizer("byte")
_rng = np.random.default_rng(0)
# Random bytes (windows are unique, so positions can be identified); empty and short documents
# make windows span several documents. doc23, doc40, doc49, doc53, doc56 go to validation.
DOCS = {f"doc{i:02d}.py": _rng.integers(0, 256, int(n), dtype=np.uint8).tobytes()
        for i, n in enumerate(_rng.choice([0, 1, 5, 40, 300], size=60))}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("lm")
    prepare_fake(base, DOCS)
    return str(base / "data")


def stream(split):
    """The naive concatenation of the split's documents in sorted path order, as int32 tokens."""
    docs = [text for path, text in sorted(DOCS.items()) if corpus.split_of(path) == split]
    return np.frombuffer(b"".join(docs), np.uint8).astype(np.int32)


def data(data_dir, seq_len=8):
    """The config's data section (a plain dict works like a ConfigDict)."""
    return {"name": NAME, "data_dir": data_dir, "seq_len": seq_len}


def batches(data_dir, steps, seq_len=8, **kwargs):
    """`steps` token batches stacked; their segment_ids must be all 1 (bytes: no EOS)."""
    args = dict(split="train", global_batch_size=8, seed=0, prefetch=0) | kwargs
    it = lm.lm_batches(data(data_dir, seq_len), BYTE, **args)
    got = [next(it) for _ in range(steps)]
    assert all(sorted(b) == ["segment_ids", "tokens"] and (b["segment_ids"] == 1).all() for b in got)
    return np.stack([b["tokens"] for b in got])


def digest(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def test_byte_batches_are_those_of_the_byte_only_pipeline(data_dir):
    """Digests of the batches that data/lm.py made before tokenizers existed (same windows, same shuffle)."""
    assert digest(batches(data_dir, 40)) == "6e3d4644d43462dd"
    evals = lm.eval_batches(data(data_dir, 4), BYTE, split="validation", batch_size=3, num_batches=2)
    assert digest(np.stack([b["tokens"] for b in evals])) == "576041f5df0ee422"


def test_token_windows_are_slices_of_the_naive_stream(data_dir):
    tokens = stream("train")
    for seq_len in (1, 7, 64):
        windows = lm.TokenWindows(lm.text_source(NAME, "train", data_dir), seq_len)
        assert len(windows) == (len(tokens) - 1) // seq_len
        for i in {*range(0, len(windows), 3), len(windows) - 1}:  # includes the last window
            np.testing.assert_array_equal(windows[i]["tokens"], tokens[i * seq_len:i * seq_len + seq_len + 1])
            np.testing.assert_array_equal(windows[i]["segment_ids"], np.ones(seq_len + 1))
        assert windows[0]["tokens"].dtype == np.int32 and windows[0]["tokens"].shape == (seq_len + 1,)
    with pytest.raises(IndexError):
        windows[len(windows)]


def test_token_windows_over_an_in_memory_source():
    docs = ["h\u00e9llo", "", "world", "!"]  # str texts are UTF-8 encoded
    windows = lm.TokenWindows([{"text": d} for d in docs], seq_len=3)
    expected = np.frombuffer("".join(docs).encode(), np.uint8)
    assert len(windows) == 3
    np.testing.assert_array_equal(np.stack([windows[i]["tokens"] for i in range(3)]),
                                  np.stack([expected[3 * i:3 * i + 4] for i in range(3)]))


def test_document_lengths_are_cached_next_to_the_data(data_dir):
    source = lm.text_source(NAME, "train", data_dir)
    lm.TokenWindows(source, 8)
    lengths = np.load(os.path.join(os.fspath(source.dataset_info.data_dir), "train-text-lengths.npy"))
    assert lengths.sum() == len(stream("train")) and len(lengths) == len(source)


def test_resuming_gives_the_uninterrupted_batches(data_dir):
    full = batches(data_dir, 10)
    assert full.shape == (10, 8, 9) and full.dtype == np.int32
    np.testing.assert_array_equal(batches(data_dir, 6, start_step=4, prefetch=4), full[4:])
    batch = lm.lm_batch(data(data_dir), BYTE, split="train", global_batch_size=8, seed=0, step=7)
    np.testing.assert_array_equal(batch["tokens"], full[7])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_batches_stack_to_the_global_batch(data_dir, process_count):
    local = [batches(data_dir, 5, process_index=p, process_count=process_count) for p in range(process_count)]
    assert local[0].shape == (5, 8 // process_count, 9)
    np.testing.assert_array_equal(np.concatenate(local, axis=1), batches(data_dir, 5))


def test_seeds_give_different_orders(data_dir):
    assert not np.array_equal(batches(data_dir, 3, seed=0), batches(data_dir, 3, seed=1))


def test_every_epoch_is_a_permutation_of_all_windows(data_dir):
    windows = lm.TokenWindows(lm.text_source(NAME, "train", data_dir), 8)
    every = np.stack([windows[i]["tokens"] for i in range(len(windows))])
    assert len(np.unique(every, axis=0)) == len(windows)  # random bytes: rows identify windows
    rows = batches(data_dir, -(-3 * len(windows) // 8)).reshape(-1, 9)
    epochs = [rows[e * len(windows):(e + 1) * len(windows)] for e in range(3)]
    for epoch in epochs:
        np.testing.assert_array_equal(np.unique(epoch, axis=0), np.unique(every, axis=0))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_eval_batches_are_deterministic_and_from_the_split(data_dir):
    first = lm.eval_batches(data(data_dir, 4), BYTE, split="validation", batch_size=3, num_batches=2)
    second = lm.eval_batches(data(data_dir, 4), BYTE, split="validation", batch_size=3, num_batches=2)
    assert len(first) == 2 and first[0]["tokens"].shape == (3, 5) and first[0]["tokens"].dtype == np.int32
    np.testing.assert_array_equal(np.stack([b["tokens"] for b in first]), np.stack([b["tokens"] for b in second]))
    assert all((b["segment_ids"] == 1).all() for b in first)
    tokens = stream("validation")
    starts = [i * 4 for i in range((len(tokens) - 1) // 4)]
    assert all(any(np.array_equal(row, tokens[s:s + 5]) for s in starts) for b in first for row in b["tokens"])


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_whole_split_eval_reads_every_window_once_in_order(data_dir, batch_size):
    tokens, seq_len = stream("validation"), 4
    count = (len(tokens) - 1) // seq_len
    evals = lm.eval_batches(data(data_dir, seq_len), BYTE, split="validation", batch_size=batch_size, num_batches=0)
    assert len(evals) == -(-count // batch_size)
    rows = {k: np.concatenate([b[k] for b in evals]) for k in ("tokens", "segment_ids")}
    assert rows["tokens"].shape == (len(evals) * batch_size, seq_len + 1)
    expected = np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(count)])
    np.testing.assert_array_equal(rows["tokens"][:count], expected)
    np.testing.assert_array_equal(rows["segment_ids"][:count], 1)
    np.testing.assert_array_equal(rows["tokens"][count:], 0)  # padding: tokens 0, segment 0
    np.testing.assert_array_equal(rows["segment_ids"][count:], 0)
    assert (rows["segment_ids"][:, 1:] != 0).sum() == count * seq_len  # every target of the split, once


@pytest.mark.parametrize("max_bytes", [100, 10**8])
def test_unigram_entropy_matches_numpy(data_dir, max_bytes):
    counts = np.bincount(stream("train")[:max_bytes], minlength=256)
    p = counts[counts > 0] / counts.sum()
    expected = -(p * np.log2(p)).sum()
    assert lm.unigram_entropy_bits(NAME, "train", data_dir, max_bytes=max_bytes) == pytest.approx(expected)


def test_unigram_entropy_per_byte_of_bytes_is_the_byte_entropy(data_dir):
    expected = lm.unigram_entropy_bits(NAME, "train", data_dir)
    assert lm.unigram_entropy_bits_per_byte(data(data_dir), BYTE, "train") == pytest.approx(expected)
    assert lm.bytes_per_token(data(data_dir), BYTE, "train") == 1.0
    np.testing.assert_array_equal(lm.unigram_counts(data(data_dir), BYTE, "train"),
                                  np.bincount(stream("train"), minlength=256))


def test_bad_arguments_raise_value_errors(data_dir, tmp_path, no_network):
    with pytest.raises(ValueError, match="multiple of process_count"):
        batches(data_dir, 1, global_batch_size=6, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        batches(data_dir, 1, process_index=2, process_count=2)
    with pytest.raises(ValueError, match=r"Unknown split 'bogus'. Should be one of \['train', 'validation'\]"):
        lm.lm_batch(data(data_dir), BYTE, split="bogus", global_batch_size=8, seed=0, step=0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        lm.lm_batch(data(data_dir), BYTE, split="train", global_batch_size=8, seed=0, step=-1)
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        batches(data_dir, 1, seq_len=0)
    with pytest.raises(ValueError, match="fewer than one window"):
        batches(data_dir, 1, seq_len=10**6)
    with pytest.raises(ValueError, match="num_batches must be an int >= 0"):
        lm.eval_batches(data(data_dir), BYTE, split="validation", batch_size=2, num_batches=-1)
    with pytest.raises(ValueError, match=r"no feature 'body' \(data.text_key\); it has \['path', 'text'\]"):
        lm.TokenWindows(lm.text_source(NAME, "train", data_dir), 8, text_key="body")
    with pytest.raises(ValueError, match="no feature 'body'"):
        lm.lm_batch(data(data_dir) | {"text_key": "body"}, BYTE, split="train", global_batch_size=8, seed=0, step=0)
    with pytest.raises(ValueError, match="not found"):  # tfds's DatasetNotFoundError is a ValueError
        lm.text_source("no_such_data_set", "train", str(tmp_path))
    with pytest.raises(ValueError, match="not prepared"):  # a real tfds data set, never downloaded
        lm.text_source("lm1b", "train", str(tmp_path))
