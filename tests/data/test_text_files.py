"""Local text files as a data set, tokenized once and cached: windows of documents + EOS with segment ids, checked
against a slow reference; resumable, host-sharded, whole-split eval; caches reused and mended; bpe:VOCAB; errors."""

import json
import os
import pathlib
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxmodels.data import lm, text_files, tokenizers

WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his from at which but have "
         "an had they you were their one all we can her has there been if more when will would who so no café "
         "naïve 3€ ünïcode").split()


def sentences(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(3, 15)))).capitalize() + "." for _ in range(n)]


# lm1b's shape: sentences, sharded train files and one test file, no validation split.
TRAIN = sentences(70, 0) + [""] + sentences(60, 1)  # an empty document still gets its EOS
TEST = sentences(30, 2)
SHARDS = {"train-00000-of-00002.jsonl": TRAIN[:71], "train-00001-of-00002.jsonl": TRAIN[71:],
          "test-00000-of-00001.jsonl": TEST}


def write_jsonl(path, texts, blank_line_at=None):
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    if blank_line_at is not None:
        lines.insert(blank_line_at, "   ")  # blank lines are skipped
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """The lm1b-shaped .jsonl files; the path of their directory."""
    directory = tmp_path_factory.mktemp("raw")
    for i, (name, texts) in enumerate(SHARDS.items()):
        write_jsonl(directory / name, texts, blank_line_at=i + 2)
    return directory


@pytest.fixture(scope="module")
def pristine(raw, tmp_path_factory):
    """A data_dir with the files prepared (both splits) and nothing cached; never modified."""
    data_dir = tmp_path_factory.mktemp("pristine") / "data"
    for split in ("train", "test"):
        lm.source_of(section(raw, data_dir), split)
    return data_dir


@pytest.fixture(scope="module")
def shared(pristine, tmp_path_factory):
    """A copy of the prepared data_dir that tests share (their caches accumulate in it)."""
    return shutil.copytree(pristine, tmp_path_factory.mktemp("shared") / "data")


@pytest.fixture
def data_dir(pristine, tmp_path):
    """A fresh copy of the prepared data_dir (the same source files, so the same config name)."""
    shutil.copytree(pristine, tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return tokenizers.train_bpe(TRAIN, 300, str(tmp_path_factory.mktemp("bpe") / "tokenizer.json"))


def section(raw, data_dir, seq_len=16, **fields):
    """The config's data section, as the task passes it."""
    files = {"train": str(raw / "train-*.jsonl"), "test": str(raw / "test-*.jsonl")}
    return {"name": "text_files", "data_dir": str(data_dir), "seq_len": seq_len, "files": files} | fields


def reference(tokenizer, texts):
    """The slow, obvious stream: each document's ids then EOS; and the document of every position."""
    ids, document = [], []
    for d, text in enumerate(texts):
        encoded = tokenizer.encode(text) + [tokenizer.eos_id]
        ids += encoded
        document += [d] * len(encoded)
    return np.array(ids), np.array(document)


def reference_windows(tokenizer, texts, seq_len):
    """{tokens, segment_ids} of every window, stacked, from the reference stream."""
    ids, document = reference(tokenizer, texts)
    starts = range(0, len(ids) - seq_len, seq_len)
    return {"tokens": np.stack([ids[s:s + seq_len + 1] for s in starts]),
            "segment_ids": np.stack([document[s:s + seq_len + 1] - document[s] + 1 for s in starts])}


def stack(batches):
    return {k: np.stack([b[k] for b in batches]) for k in ("tokens", "segment_ids")}


def train_batches(data, tokenizer, steps, **kwargs):
    it = lm.lm_batches(data, tokenizer, **(dict(split="train", global_batch_size=4, seed=0, prefetch=0) | kwargs))
    return stack([next(it) for _ in range(steps)])


def counting(monkeypatch, tokenizer):
    """Makes `tokenizer.encode_batch` record how many documents each call encodes; returns the record."""
    calls, encode_batch = [], tokenizer.encode_batch
    monkeypatch.setattr(tokenizer, "encode_batch", lambda texts: calls.append(len(texts)) or encode_batch(texts))
    return calls


def test_documents_read_back_in_order(raw, shared):
    for split, texts in (("train", TRAIN), ("test", TEST)):
        source = lm.source_of(section(raw, shared), split)
        assert [x["text"].decode() for x in source] == texts
        assert source[0]["path"].decode() == str(raw / sorted(n for n in SHARDS if n.startswith(split))[0])


@pytest.mark.parametrize("seq_len", [1, 5, 16])
def test_windows_are_the_stream_of_documents_and_eos_with_their_segments(raw, shared, bpe, seq_len):
    windows = lm.windows_of(section(raw, shared, seq_len), bpe, "train")
    expected = reference_windows(bpe, TRAIN, seq_len)
    assert len(windows) == len(expected["tokens"])
    got = stack([windows[i] for i in range(len(windows))])
    np.testing.assert_array_equal(got["tokens"], expected["tokens"])
    np.testing.assert_array_equal(got["segment_ids"], expected["segment_ids"])
    assert got["tokens"].dtype == got["segment_ids"].dtype == np.int32
    assert (got["segment_ids"].max(axis=1) > 1).any()  # windows do hold several documents


def test_resuming_and_processes_give_the_one_run_batches(raw, shared, bpe):
    data = ml_collections.ConfigDict(section(raw, shared, 8))  # the task passes a ConfigDict
    full = train_batches(data, bpe, 12)
    assert full["tokens"].shape == full["segment_ids"].shape == (12, 4, 9)
    windows = reference_windows(bpe, TRAIN, 8)
    rows = {tuple(t) + tuple(s) for t, s in zip(windows["tokens"], windows["segment_ids"])}
    assert all(tuple(t) + tuple(s) in rows for t, s in zip(full["tokens"].reshape(-1, 9),
                                                           full["segment_ids"].reshape(-1, 9)))
    resumed = train_batches(data, bpe, 5, start_step=7, prefetch=2)
    for key in full:
        np.testing.assert_array_equal(resumed[key], full[key][7:])
    one = lm.lm_batch(data, bpe, split="train", global_batch_size=4, seed=0, step=9)
    np.testing.assert_array_equal(one["tokens"], full["tokens"][9])
    local = [train_batches(data, bpe, 12, process_index=p, process_count=2) for p in range(2)]
    for key in full:
        np.testing.assert_array_equal(np.concatenate([b[key] for b in local], axis=1), full[key])


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_whole_split_eval_covers_every_window_once(raw, shared, bpe, batch_size):
    evals = lm.eval_batches(section(raw, shared, 8), bpe, split="test", batch_size=batch_size, num_batches=0)
    expected = reference_windows(bpe, TEST, 8)
    count = len(expected["tokens"])
    assert len(evals) == -(-count // batch_size) and all(b["tokens"].shape == (batch_size, 9) for b in evals)
    got = {k: np.concatenate([b[k] for b in evals]) for k in ("tokens", "segment_ids")}
    for key in got:
        np.testing.assert_array_equal(got[key][:count], expected[key])
        np.testing.assert_array_equal(got[key][count:], 0)  # padding rows
    targets = got["segment_ids"][:, 1:] != 0
    assert targets.sum() == len(reference(bpe, TEST)[0]) // 8 * 8  # every target token of the windows, once


def test_fixed_eval_batches_are_the_seed_0_batches(raw, shared, bpe):
    data = section(raw, shared, 8)
    evals = stack(lm.eval_batches(data, bpe, split="train", batch_size=4, num_batches=3))
    for key, value in train_batches(data, bpe, 3).items():
        np.testing.assert_array_equal(evals[key], value)


def test_byte_tokenizer_concatenates_documents_with_no_segments(raw, shared):
    byte = tokenizers.make_tokenizer("byte")
    windows = lm.windows_of(section(raw, shared, 16), byte, "test")
    stream = np.frombuffer("".join(TEST).encode(), np.uint8)
    assert len(windows) == (len(stream) - 1) // 16
    np.testing.assert_array_equal(windows[3]["tokens"], stream[48:65])
    np.testing.assert_array_equal(windows[3]["segment_ids"], 1)


def test_token_stream_is_cached_and_reused(raw, data_dir, bpe, monkeypatch):
    calls = counting(monkeypatch, bpe)
    data = section(raw, data_dir)
    first = stack([lm.windows_of(data, bpe, "train")[i] for i in range(10)])
    assert sum(calls) == len(TRAIN)  # every document encoded once, in batches
    source = lm.source_of(data, "train")
    tokens_path, starts_path = lm.stream_cache_paths(source, bpe, "text")
    stem = os.path.join(os.fspath(source.dataset_info.data_dir), f"train-text-{bpe.fingerprint()}")
    assert (tokens_path, starts_path) == (f"{stem}-tokens.npy", f"{stem}-starts.npy")
    tokens, starts = np.load(tokens_path), np.load(starts_path)
    np.testing.assert_array_equal(tokens, reference(bpe, TRAIN)[0])
    assert tokens.dtype == np.uint16 and starts.dtype == np.int64 and len(starts) == len(TRAIN) + 1
    calls.clear()
    again = lm.windows_of(data, bpe, "train")  # a second open: a resumed run
    assert calls == []
    assert isinstance(lm.token_stream(source, bpe)[0], np.memmap)
    for key, value in stack([again[i] for i in range(10)]).items():
        np.testing.assert_array_equal(value, first[key])


def test_concurrent_opens_tokenize_once(raw, data_dir, bpe, monkeypatch):
    calls = counting(monkeypatch, bpe)
    with ThreadPoolExecutor(3) as pool:
        lengths = list(pool.map(lambda _: len(lm.windows_of(section(raw, data_dir), bpe, "train")), range(3)))
    assert sum(calls) == len(TRAIN) and len(set(lengths)) == 1
    assert not [f for f in os.listdir(lm.source_of(section(raw, data_dir), "train").dataset_info.data_dir)
                if f.startswith("tmp")]


def bad_eos(path):
    tokens = np.load(path)
    tokens[-1] += 1
    np.save(path, tokens)


@pytest.mark.parametrize("damage,file", [
    (lambda path: path.write_bytes(path.read_bytes()[:200]), "tokens"),  # truncated
    (lambda path: path.write_bytes(b"not a npy file"), "tokens"),
    (lambda path: np.save(path, np.load(path).astype(np.int32)), "tokens"),  # wrong dtype
    (bad_eos, "tokens"),  # a document that does not end with EOS
    (lambda path: np.save(path, np.load(path)[:-1]), "starts"),  # wrong length
    (lambda path: np.save(path, np.load(path)[::-1].copy()), "starts"),  # decreasing offsets
    (os.remove, "starts"),  # missing (silently computed again)
])
def test_a_damaged_token_cache_is_computed_again_with_a_warning(raw, data_dir, bpe, monkeypatch, damage, file):
    data = section(raw, data_dir)
    expected = stack([lm.windows_of(data, bpe, "train")[i] for i in range(20)])
    paths = dict(zip(("tokens", "starts"), lm.stream_cache_paths(lm.source_of(data, "train"), bpe, "text")))
    damage(pathlib.Path(paths[file]))
    calls = counting(monkeypatch, bpe)
    if damage is os.remove:
        windows = lm.windows_of(data, bpe, "train")
    else:
        with pytest.warns(UserWarning, match=f"cache {re.escape(paths[file])} .*; computing it again"):
            windows = lm.windows_of(data, bpe, "train")
    assert sum(calls) == len(TRAIN)
    for key, value in stack([windows[i] for i in range(20)]).items():
        np.testing.assert_array_equal(value, expected[key])
    np.testing.assert_array_equal(np.load(paths["tokens"]), reference(bpe, TRAIN)[0])  # written again


def test_bpe_spec_trains_once_on_the_train_split_and_is_reused(raw, data_dir, capsys):
    data = section(raw, data_dir, tokenizer="bpe:300")
    with ThreadPoolExecutor(3) as pool:  # several processes starting at once: one trains
        resolved = list(pool.map(lambda _: lm.resolve_tokenizer(data), range(3)))
    assert capsys.readouterr().out.count("trained a byte-level BPE tokenizer of 300 ids") == 1
    path = lm.bpe_path(data, 300)
    assert path.startswith(os.path.join(str(data_dir), "tokenizers", "text_files_h")) and os.path.exists(path)
    assert path.endswith("-train-text-bpe300/tokenizer.json")
    assert len({t.fingerprint() for t in resolved}) == 1 and resolved[0].name == path
    assert (resolved[0].vocab_size, resolved[0].eos_id) == (300, 0)
    expected = tokenizers.train_bpe(TRAIN, 300, str(data_dir.parent / "mine" / "tokenizer.json"))
    assert resolved[0].encode(TEST[0]) == expected.encode(TEST[0])  # trained on the train split's documents
    again = lm.resolve_tokenizer(data)
    assert capsys.readouterr().out == "" and again.fingerprint() == resolved[0].fingerprint()
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.warns(UserWarning, match=f"tokenizer {re.escape(path)} cannot be loaded"):
        mended = lm.resolve_tokenizer(data)
    assert "trained a byte-level BPE" in capsys.readouterr().out
    assert mended.fingerprint() == resolved[0].fingerprint()
    assert not [f for f in os.listdir(data_dir / "tokenizers") if ".tmp" in f]


def test_tokenizer_specs(raw, shared, bpe, tmp_path):
    data = section(raw, shared)
    assert isinstance(lm.resolve_tokenizer(data), tokenizers.ByteTokenizer)  # no tokenizer field: bytes
    assert isinstance(lm.resolve_tokenizer(data | {"tokenizer": None}), tokenizers.ByteTokenizer)
    assert lm.resolve_tokenizer(data | {"tokenizer": bpe.name}).fingerprint() == bpe.fingerprint()
    for bad in ("bpe:abc", "bpe:256", "bpe:"):
        with pytest.raises(ValueError, match=re.escape(f"data.tokenizer={bad!r}: expected 'bpe:VOCAB'")):
            lm.resolve_tokenizer(data | {"tokenizer": bad})
    with pytest.raises(ValueError, match="no such file"):
        lm.resolve_tokenizer(data | {"tokenizer": str(tmp_path / "missing.json")})


def test_unigram_baseline_in_bits_per_byte(raw, shared, bpe):
    data = section(raw, shared)
    ids, _ = reference(bpe, TRAIN)
    counts = np.bincount(ids, minlength=bpe.vocab_size)
    text_bytes = sum(len(t.encode()) for t in TRAIN)  # byte-level BPE: every byte once, EOS none
    seen = counts[counts > 0]
    expected = -(seen * np.log2(seen / len(ids))).sum() / text_bytes
    assert lm.unigram_entropy_bits_per_byte(data, bpe, "train") == pytest.approx(expected)
    assert lm.bytes_per_token(data, bpe, "train") == pytest.approx(text_bytes / len(ids))
    byte = tokenizers.make_tokenizer("byte")
    byte_counts = np.bincount(np.frombuffer("".join(TRAIN).encode(), np.uint8), minlength=256)
    p = byte_counts[byte_counts > 0] / byte_counts.sum()
    assert lm.unigram_entropy_bits_per_byte(data, byte, "train") == pytest.approx(-(p * np.log2(p)).sum())


def test_txt_and_parquet_files(tmp_path):
    texts = {"b.txt": "second file\n".encode(), "a.txt": b"first \xff not UTF-8", "c/d.txt": b""}
    for name, content in texts.items():
        (tmp_path / "txt" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "txt" / name).write_bytes(content)
    rows = sentences(9, 3)
    (tmp_path / "pq").mkdir()
    for i, chunk in enumerate((rows[:5], rows[5:])):
        table = pa.table({"id": list(range(len(chunk))), "body": chunk})
        pq.write_table(table, tmp_path / "pq" / f"part-{i}.parquet", row_group_size=2)  # several row groups
    data = {"name": "text_files", "data_dir": str(tmp_path / "data"), "seq_len": 4, "text_key": "body",
            "files": {"train": str(tmp_path / "txt/**/*.txt"), "test": str(tmp_path / "pq/*.parquet")}}
    train = lm.source_of(data, "train")
    assert [x["body"] for x in train] == [texts["a.txt"], texts["b.txt"], texts["c/d.txt"]]
    assert sorted(train[0]) == ["body", "path"]
    assert [x["body"].decode() for x in lm.source_of(data, "test")] == rows
    byte = tokenizers.make_tokenizer("byte")
    assert lm.windows_of(data, byte, "train")[0]["tokens"].tolist() == list(b"first")


def test_changed_files_are_prepared_again(tmp_path):
    (tmp_path / "raw").mkdir()
    write_jsonl(tmp_path / "raw" / "train.jsonl", TEST[:5])
    data = section(tmp_path / "raw", tmp_path / "data") | {"files": {"train": str(tmp_path / "raw" / "*.jsonl")}}
    first = lm.source_of(data, "train")
    write_jsonl(tmp_path / "raw" / "train.jsonl", TEST[:6])
    second = lm.source_of(data, "train")
    assert len(first) == 5 and len(second) == 6
    assert first.dataset_info.config_name != second.dataset_info.config_name
    assert lm.source_of(data, "train").dataset_info.config_name == second.dataset_info.config_name


def test_a_damaged_prepared_copy_is_prepared_again(raw, data_dir, no_network):
    source = lm.source_of(section(raw, data_dir), "train")
    shard = next(pathlib.Path(source.dataset_info.data_dir).glob("text_files-train.array_record-*"))
    shard.write_bytes(b"")
    with pytest.warns(UserWarning, match=re.escape(f"shard is empty: {shard}; deleting")):
        again = lm.source_of(section(raw, data_dir), "train")
    assert [x["text"].decode() for x in again] == TRAIN


def test_errors_name_what_was_expected(raw, shared, tmp_path, no_network):
    data = section(raw, shared)
    with pytest.raises(ValueError, match=re.escape("Unknown split 'validation'. Should be one of ['test', 'train']")):
        lm.eval_batches(data, tokenizers.make_tokenizer("byte"), split="validation", batch_size=2, num_batches=0)
    nothing = str(tmp_path / "nothing" / "*.jsonl")
    with pytest.raises(ValueError, match=re.escape(f"data.files['train'] = {nothing!r} matches no file")):
        lm.source_of(data | {"files": {"train": nothing}}, "train")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=re.escape(f"matches {str(tmp_path / 'x.csv')!r}, of unknown type; "
                                                   "expected one of ['.txt', '.jsonl', '.parquet']")):
        lm.source_of(data | {"files": {"train": str(tmp_path / "x.*")}}, "train")
    with pytest.raises(ValueError, match="needs data.files, a mapping split -> glob"):
        lm.source_of(data | {"files": None}, "train")
    with pytest.raises(ValueError, match="must be a non-empty mapping split -> glob"):
        text_files.expand(str(raw / "*.jsonl"))


def test_a_missing_text_key_names_the_fields(raw, tmp_path, no_network):
    shard = str(raw / "test-00000-of-00001.jsonl")  # splits are read in sorted order
    with pytest.raises(ValueError, match=re.escape(f"line 1 of {shard} has no field 'content' (data.text_key); it "
                                                   "has ['id', 'text']")):
        lm.source_of(section(raw, tmp_path / "data", text_key="content"), "train")
    (tmp_path / "later").mkdir()
    (tmp_path / "later" / "a.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(ValueError, match=r"line 2 of .*a\.jsonl has no field 'text' \(data.text_key\); it has \['txt'"):
        lm.source_of(section(raw, tmp_path / "data") | {"files": {"train": str(tmp_path / "later/*")}}, "train")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 't.parquet'} has no column 'text' (data.text_key); "
                                                   "it has ['body']")):
        lm.source_of(section(raw, tmp_path / "data") | {"files": {"train": str(tmp_path / "*.parquet")}}, "train")
