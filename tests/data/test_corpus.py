"""The stdlib corpus builder: prepared offline, exact bytes back, deterministic disjoint split."""

import sys
from concurrent.futures import ThreadPoolExecutor

from jaxmodels.data import corpus, lm

FAKE_FILES = {
    "a.py": b"print('a')\n",
    "empty.py": b"",
    "latin1.py": "# caf\u00e9\n".encode("latin-1") + b"\xff\x00\n",  # not UTF-8: bytes must survive
    "pkg/__init__.py": b"",
    "pkg/mod.py": b"def f():\n    return 1\n" * 50,
    **{f"doc{i:02d}.py": f"x = {i}\n".encode() * i for i in range(30)},  # doc23.py goes to validation
}
SKIPPED_FILES = {
    "__pycache__/c.py": b"skip", "site-packages/s.py": b"skip", "dist-packages/d.py": b"skip",
    "test/t.py": b"skip", "pkg/tests/t.py": b"skip", "notes.txt": b"skip",
}


def fake_config(base, files):
    """Writes `files` ({relative path: bytes}) under base/root; returns a config named "fake" reading them."""
    for rel, data in files.items():
        path = base / "root" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return corpus.PyStdlibConfig(name="fake", root=str(base / "root"))


def prepare_fake(base, files):
    """The builder of `files`, prepared into base/data (tfds name "py_stdlib/fake" there)."""
    return corpus.prepare(str(base / "data"), config=fake_config(base, files))


def read_split(builder, split):
    source = builder.as_data_source(split)
    return {source[i]["path"].decode(): source[i]["text"] for i in range(len(source))}


def test_prepare_reads_back_every_file_exactly(tmp_path, no_network):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "broken.py").symlink_to(tmp_path / "nowhere.py")  # unreadable: skipped
    builder = prepare_fake(tmp_path, {**FAKE_FILES, **SKIPPED_FILES})
    assert {**read_split(builder, "train"), **read_split(builder, "validation")} == FAKE_FILES
    assert prepare_fake(tmp_path, {}).data_dir == builder.data_dir  # second call reuses the prepared data


def test_split_is_deterministic_and_disjoint(tmp_path, no_network):
    first = prepare_fake(tmp_path / "one", FAKE_FILES)
    second = prepare_fake(tmp_path / "two", FAKE_FILES)
    train, validation = read_split(first, "train"), read_split(first, "validation")
    assert not train.keys() & validation.keys()
    assert sorted(validation) == sorted(p for p in FAKE_FILES if corpus.split_of(p) == "validation") != []
    assert list(train) == sorted(train)  # source order is sorted path order
    assert [list(read_split(second, s)) for s in corpus.SPLITS] == [list(train), list(validation)]


def test_concurrent_prepare_is_safe(tmp_path, no_network):
    config = fake_config(tmp_path, FAKE_FILES)
    with ThreadPoolExecutor(4) as pool:  # flock also excludes threads: each open() is its own lock
        builders = list(pool.map(lambda _: corpus.prepare(str(tmp_path / "data"), config=config), range(4)))
    assert all(read_split(b, "train") == read_split(builders[0], "train") for b in builders)


def test_real_stdlib_corpus_in_shared_cache():
    builder = corpus.prepare()  # the one test on the real corpus; prepared once per machine and Python
    assert builder.builder_config.name == "py{}.{}".format(*sys.version_info[:2])
    train, validation = read_split(builder, "train"), read_split(builder, "validation")
    assert not train.keys() & validation.keys()
    assert sum(map(len, train.values())) + sum(map(len, validation.values())) >= 5_000_000
    assert len(train) + len(validation) >= 300
    assert 0.02 <= len(validation) / (len(train) + len(validation)) <= 0.1
    assert not any("site-packages/" in p or "__pycache__/" in p or p.startswith("test/") for p in train)
    assert len(lm.text_source("py_stdlib", "validation", None)) == len(validation)
