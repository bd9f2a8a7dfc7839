"""Tokenizers for language modelling: bytes, a SentencePiece model, or a Hugging Face `tokenizer.json`.

`make_tokenizer(spec)` reads `config.data.tokenizer`: "byte" (token = byte value, vocabulary 256, no
end-of-document token: the default experiment's tokens), a SentencePiece `.model` file, a Hugging Face
`tokenizer.json`, or a directory holding one of them (a Hugging Face model directory). Only local files
are read: nothing downloads.

Every tokenizer gives ids in [0, vocab_size), the id of its end-of-document token (`eos_id`; None for
bytes), and the UTF-8 bytes each token stands for (`token_byte_lengths`), so that bits per byte can be
counted for any tokenizer. `train_bpe` trains a byte-level BPE tokenizer (GPT-2's scheme, with the
`tokenizers` library) on local text; the command line wraps it:

    python -m jaxmodels.data.tokenizers --data py_stdlib --vocab_size 4096 --out /tmp/bpe/tokenizer.json
"""

from __future__ import annotations

import abc
import argparse
import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

BYTE = "byte"
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")  # tried in this order
VOCAB_MULTIPLE = 128  # the model's vocabulary is padded up to a multiple of this (MXU/tensor-core friendly)


class Tokenizer(abc.ABC):
    """Text <-> token ids. `vocab_size`: ids are in [0, vocab_size); `eos_id`: the token that ends every
    document (None: documents are concatenated with no separator); `name`: where it came from."""

    name: str
    vocab_size: int
    eos_id: int | None

    @abc.abstractmethod
    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of `text` (bytes are decoded as UTF-8, invalid sequences replaced); no EOS appended."""

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
        """`[encode(t) for t in texts]`; tokenizers with a faster batched (parallel) encoder override it."""
        return [self.encode(text) for text in texts]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (special tokens dropped, invalid UTF-8 replaced)."""

    @abc.abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes token `token_id` stands for in the text (b"" for special tokens)."""

    @abc.abstractmethod
    def files(self) -> dict[str, bytes]:
        """The tokenizer's files as Hugging Face reads them from a model directory ({file name: content}), giving
        the same ids."""

    def token_byte_lengths(self) -> np.ndarray:
        """`np.int32[vocab_size]`: len(token_bytes(i)) for every id; the bytes of text a token covers, for
        bits per byte. Sums over a document's ids give its UTF-8 length (SentencePiece models that add a dummy
        prefix count one byte more per document)."""
        return np.fromiter((len(self.token_bytes(i)) for i in range(self.vocab_size)), np.int32, self.vocab_size)

    def fingerprint(self) -> str:
        """A short hash of the tokenizer's definition: token caches are keyed by it."""
        digest = hashlib.sha256()
        for file_name, content in sorted(self.files().items()):
            digest.update(file_name.encode() + b"\0" + content)
        return digest.hexdigest()[:16]

    def save(self, directory: str) -> list[str]:
        """Writes `files()` into `directory` (created if needed) and a `tokenizer_config.json` naming the EOS
        token, so that `transformers.AutoTokenizer.from_pretrained(directory)` loads it. Returns the paths."""
        os.makedirs(directory, exist_ok=True)
        written = []
        for file_name, content in self.files().items():
            path = os.path.join(directory, file_name)
            with open(path, "wb") as f:
                f.write(content)
            written.append(path)
        path = os.path.join(directory, "tokenizer_config.json")
        with open(path, "w") as f:
            json.dump(self._hf_config(), f, indent=2)
        return [*written, path]

    def _hf_config(self) -> dict:
        """tokenizer_config.json for Hugging Face: the EOS token (and no added BOS)."""
        config = {"model_max_length": 1_000_000_000, "add_bos_token": False, "add_eos_token": False}
        if self.eos_id is not None:
            config["eos_token"] = self.token_string(self.eos_id)
        return config

    def token_string(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` (for special tokens, their literal, e.g. "</s>")."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")


class ByteTokenizer(Tokenizer):
    """Token = byte value: vocabulary 256, no EOS (documents are concatenated)."""

    name, vocab_size, eos_id = BYTE, 256, None

    def encode(self, text: str | bytes) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else text)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(np.asarray(list(ids), np.uint8).tolist()).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id])

    def files(self) -> dict[str, bytes]:
        """A Hugging Face tokenizer.json with the same ids: a BPE with no merges over GPT-2's byte alphabet
        (character c stands for byte b and has id b), no pre-tokenizer splitting, byte-level decoding."""
        from tokenizers import Tokenizer as RawTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        tokenizer = RawTokenizer(models.BPE(vocab=_byte_level_decoder(), merges=[]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.decoder = decoders.ByteLevel()
        return {"tokenizer.json": tokenizer.to_str().encode("utf-8")}


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file (Kudo & Richardson 2018), e.g. Llama 2's `tokenizer.model`. EOS: the model's
    `eos_id` (ValueError if it has none). Byte-fallback pieces `<0xNN>` stand for one byte, `▁` for a space."""

    def __init__(self, path: str):
        import sentencepiece

        with open(path, "rb") as f:
            self._proto = f.read()
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=self._proto)
        self.name, self.vocab_size = os.path.abspath(path), self._sp.get_piece_size()
        if self._sp.eos_id() < 0:
            raise ValueError(f"SentencePiece model {path} has no EOS piece (eos_id = -1); train it with eos_id set")
        self.eos_id = self._sp.eos_id()

    def encode(self, text: str | bytes) -> list[int]:
        return self._sp.encode(_as_str(text))

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
        return self._sp.encode([_as_str(t) for t in texts])  # SentencePiece encodes a list on several threads

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_bytes(self, token_id: int) -> bytes:
        sp = self._sp
        if sp.is_control(token_id) or sp.is_unknown(token_id):
            return b""
        piece = sp.id_to_piece(token_id)
        if sp.is_byte(token_id):  # "<0xAB>"
            return bytes([int(piece[1:-1], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def token_string(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def files(self) -> dict[str, bytes]:
        return {"tokenizer.model": self._proto}


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (the `tokenizers` library). EOS: `tokenizer_config.json`'s eos_token
    when that file sits beside it, else the first of EOS_CANDIDATES in the vocabulary (ValueError if none)."""

    def __init__(self, path: str):
        import tokenizers

        with open(path, "rb") as f:
            self._json = f.read()
        self._tok = tokenizers.Tokenizer.from_str(self._json.decode("utf-8"))
        self.name, self.vocab_size = os.path.abspath(path), self._tok.get_vocab_size(with_added_tokens=True)
        definition = json.loads(self._json)
        self._byte_level = (definition.get("decoder") or {}).get("type") == "ByteLevel"
        self._special = {t["id"] for t in definition.get("added_tokens", []) if t.get("special")}
        self.eos_id = self._find_eos(path)

    def _find_eos(self, path: str) -> int:
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        candidates = EOS_CANDIDATES
        if os.path.exists(config_path):
            with open(config_path) as f:
                eos = json.load(f).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            candidates = (eos,) if eos else candidates
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        raise ValueError(f"tokenizer {path} has no end-of-document token: none of {list(candidates)} is in its "
                         "vocabulary; add one (a special token) or name it as eos_token in a tokenizer_config.json "
                         "beside it")

    def encode(self, text: str | bytes) -> list[int]:
        return self._tok.encode(_as_str(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
        encodings = self._tok.encode_batch([_as_str(t) for t in texts], add_special_tokens=False)  # parallel (Rust)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._special:
            return b""
        token = self._tok.id_to_token(token_id)
        if token is None:
            return b""
        if self._byte_level:  # each character of a byte-level token stands for one byte (GPT-2's table)
            return bytes(_byte_level_decoder()[c] for c in token)
        if token.startswith("<0x") and token.endswith(">") and len(token) == 6:  # byte fallback
            return bytes([int(token[3:5], 16)])
        return token.replace("\u2581", " ").encode("utf-8")

    def token_string(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)

    def files(self) -> dict[str, bytes]:
        return {"tokenizer.json": self._json}


def _as_str(text: str | bytes) -> str:
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the character standing for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(extra)}


def make_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer named by `config.data.tokenizer`: "byte", a `.model` (SentencePiece) file, a `.json`
    (Hugging Face) file, or a directory holding `tokenizer.json` or `tokenizer.model`. Raises ValueError naming
    the path and what was looked for when there is none."""
    if spec == BYTE:
        return ByteTokenizer()
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        for file_name in ("tokenizer.json", "tokenizer.model"):
            if os.path.exists(os.path.join(path, file_name)):
                return make_tokenizer(os.path.join(path, file_name))
        raise ValueError(f"data.tokenizer={spec!r} is a directory with neither tokenizer.json nor tokenizer.model")
    if not os.path.exists(path):
        raise ValueError(f"data.tokenizer={spec!r}: no such file; expected 'byte', 'bpe:VOCAB' (a byte-level BPE "
                         "trained on the data), a SentencePiece .model, a Hugging Face tokenizer.json, or a directory "
                         "holding one")
    if path.endswith(".json"):
        return HuggingFaceTokenizer(path)
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    raise ValueError(f"data.tokenizer={spec!r}: unknown file type; expected a SentencePiece .model or a Hugging "
                     "Face tokenizer .json")


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """`vocab_size` rounded up to a multiple of `multiple`: the model's vocabulary (the padding ids are never
    targets and never sampled)."""
    return -(-vocab_size // multiple) * multiple


def train_bpe(texts: Iterable[str | bytes], vocab_size: int, path: str, *, eos: str = "<|endoftext|>") -> Tokenizer:
    """Trains a byte-level BPE tokenizer (Sennrich et al. 2016 over GPT-2's byte alphabet, so any text
    encodes with no unknown token) of `vocab_size` ids, `eos` being id 0, and writes it as a Hugging Face
    `tokenizer.json` at `path` (with a tokenizer_config.json beside it). Returns it, loaded from `path`."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + EOS), got {vocab_size}")
    tokenizer = RawTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((_as_str(t) for t in texts), trainer)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tokenizer.save(path)
    with open(os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": eos, "model_max_length": 1_000_000_000}, f, indent=2)
    return make_tokenizer(path)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: train a byte-level BPE tokenizer on a split of a local text data set."""
    from jaxmodels.data import lm as lm_data

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="py_stdlib", help="tfds name of a prepared data set (default: py_stdlib)")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--text_key", default="text")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--out", required=True, help="path of the tokenizer.json to write")
    args = parser.parse_args(argv)
    source = lm_data.text_source(args.data, args.split, args.data_dir)
    tokenizer = train_bpe(lm_data.document_texts(source, args.text_key), args.vocab_size, args.out)
    print(f"wrote {args.out}: byte-level BPE, {tokenizer.vocab_size} ids, EOS id {tokenizer.eos_id}")


if __name__ == "__main__":
    main()
