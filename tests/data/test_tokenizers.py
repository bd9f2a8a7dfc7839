"""Tokenizers: round trips, bytes per token, EOS, files that transformers loads, and clear errors."""

import io
import json

import numpy as np
import pytest
import sentencepiece
from transformers import AutoTokenizer

from jaxmodels.data import tokenizers

TEXTS = [f"def f{i}(x):\n    return x + {i}  # é€ naïve\n" for i in range(300)]
SAMPLE = "def bar(y):\n  return 'é€😀' \t\n"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return tokenizers.train_bpe(TEXTS, 300, str(tmp_path_factory.mktemp("bpe") / "tokenizer.json"))


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS), model_writer=model, vocab_size=300, model_type="bpe", byte_fallback=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity", unk_id=0,
        bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return tokenizers.make_tokenizer(str(path))


def test_byte_tokenizer_is_the_byte_values():
    tok = tokenizers.make_tokenizer("byte")
    assert (tok.vocab_size, tok.eos_id) == (256, None)
    assert tok.encode(SAMPLE) == list(SAMPLE.encode())
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    np.testing.assert_array_equal(tok.token_byte_lengths(), np.ones(256))
    assert tok.encode_batch([SAMPLE, b"\xff"]) == [list(SAMPLE.encode()), [255]]


@pytest.mark.parametrize("name", ["bpe", "sentencepiece_model"])
def test_round_trip_and_bytes_per_token(name, request):
    tok = request.getfixturevalue(name)
    assert tok.vocab_size == 300
    for text in (SAMPLE, TEXTS[7], "x" * 50 + "\n\n  \u00a0z"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.encode(text.encode()) == ids
        assert max(ids) < tok.vocab_size
        assert tok.token_byte_lengths()[ids].sum() == len(text.encode())  # every byte counted once
    assert tok.token_byte_lengths()[tok.eos_id] == 0
    texts = [SAMPLE, "", TEXTS[7].encode()]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]  # the batched (parallel) encoder agrees
    assert len(tok.encode(TEXTS[3])) < 0.7 * len(TEXTS[3].encode())  # merges learned: fewer tokens than bytes


@pytest.mark.parametrize("name", ["byte", "bpe", "sentencepiece_model"])
def test_saved_files_load_in_transformers_with_the_same_ids(name, request, tmp_path):
    tok = tokenizers.make_tokenizer("byte") if name == "byte" else request.getfixturevalue(name)
    tok.save(str(tmp_path))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tok.encode(SAMPLE + "\x00\x7f")
    assert theirs.encode(SAMPLE + "\x00\x7f", add_special_tokens=False) == ids
    assert theirs.decode(ids) == tok.decode(ids)
    assert theirs.eos_token_id == tok.eos_id
    if tok.eos_id is not None:  # a model directory works as data.tokenizer
        again = tokenizers.make_tokenizer(str(tmp_path))
        assert again.encode(SAMPLE) == tok.encode(SAMPLE) and again.fingerprint() == tok.fingerprint()


def test_fingerprints_tell_tokenizers_apart(bpe, sentencepiece_model):
    prints = {t.fingerprint() for t in (bpe, sentencepiece_model, tokenizers.make_tokenizer("byte"))}
    assert len(prints) == 3


def test_padded_vocab_size():
    assert [tokenizers.padded_vocab_size(n) for n in (1, 128, 129, 300, 32000)] == [128, 128, 256, 384, 32000]


def test_bad_specs_name_what_was_expected(tmp_path, bpe):
    with pytest.raises(ValueError, match="no such file"):
        tokenizers.make_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="neither tokenizer.json nor tokenizer.model"):
        tokenizers.make_tokenizer(str(tmp_path))
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="unknown file type"):
        tokenizers.make_tokenizer(str(tmp_path / "vocab.txt"))
    definition = json.loads(bpe.files()["tokenizer.json"])
    definition["added_tokens"] = []
    definition["model"]["vocab"].pop("<|endoftext|>")
    (tmp_path / "no_eos.json").write_text(json.dumps(definition))
    with pytest.raises(ValueError, match="no end-of-document token"):
        tokenizers.make_tokenizer(str(tmp_path / "no_eos.json"))
    with pytest.raises(ValueError, match="vocab_size must be >= 257"):
        tokenizers.train_bpe(TEXTS, 100, str(tmp_path / "small.json"))
