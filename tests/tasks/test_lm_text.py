"""The language-modelling task end to end through the data layer (`jaxmodels.data.lm`): tokenizers, the model's
vocabulary, validation before compile, packed documents, whole-split eval and samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import lm_tiny_bpe
from jaxmodels.data import tokenizers
from jaxmodels.tasks.lm import next_token_loss
from jaxmodels.train.config import ConfigError, validate_config
from jaxmodels.train.loop import Trainer, train_and_evaluate
from tests.tiny import TINY_OVERRIDES, apply_overrides, tiny_config

TEXTS = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "import os\nprint(os.getcwd())\n"] * 20


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory) -> str:
    """A small byte-level BPE tokenizer (with an end-of-document token) as a tokenizer.json file."""
    path = str(tmp_path_factory.mktemp("bpe") / "tokenizer.json")
    tokenizers.train_bpe(TEXTS, 300, path)
    return path


def _refused(config, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(config, num_devices=1)


def test_byte_tokenizer_keeps_lm_tiny_as_it_was():
    config = tiny_config()
    task = validate_config(config, num_devices=1)
    assert task.tokenizer.vocab_size == 256 and task.tokenizer.eos_id is None and config.model.vocab_size == 256
    batch = task.eval_batches()[0]
    assert batch["tokens"].shape == batch["segment_ids"].shape == (config.data.global_batch_size,
                                                                    config.data.seq_len + 1)
    assert (batch["segment_ids"] == 1).all()  # one stream of concatenated documents
    np.testing.assert_array_equal(task.token_byte_lengths, np.ones(256))


def test_vocab_size_zero_is_the_tokenizers_padded_vocabulary_and_resuming_with_zero_is_no_change(
        bpe_path, tmp_path, capsys):
    def config(steps):
        return tiny_config(data__tokenizer=bpe_path, model__vocab_size=0, train__num_steps=steps,
                           train__checkpoint_every=2, data__eval_batches=1)

    first = config(2)
    task = validate_config(first, num_devices=1)
    vocab = task.tokenizer.vocab_size
    assert first.model.vocab_size == tokenizers.padded_vocab_size(vocab) >= vocab
    train_and_evaluate(config(2), str(tmp_path), devices=jax.devices()[:1])
    capsys.readouterr()
    summary = train_and_evaluate(config(4), str(tmp_path), devices=jax.devices()[:1])  # a protected change raises
    assert summary["start_step"] == 2 and summary["final_step"] == 4
    assert "model.vocab_size" not in capsys.readouterr().out
    assert isinstance(summary["sample"], str) and summary["sample"].startswith("def ")
    assert {"bits_per_byte", "perplexity", "num_tokens", "num_bytes"} <= set(summary["eval_end"])


def test_vocab_size_smaller_than_the_tokenizers_is_refused(bpe_path):
    vocab = tokenizers.make_tokenizer(bpe_path).vocab_size
    _refused(tiny_config(data__tokenizer=bpe_path, model__vocab_size=vocab - 1),
             f"config.model.vocab_size={vocab - 1} is smaller than the vocabulary of config.data.tokenizer=.*, "
             f"{vocab} ids")


@pytest.mark.parametrize("field", ["train_split", "eval_split"])
def test_a_missing_split_names_the_available_splits(field):
    with pytest.raises(ConfigError) as error:
        validate_config(tiny_config(**{f"data__{field}": "nope"}), num_devices=1)
    assert "nope" in str(error.value) and "train" in str(error.value) and "validation" in str(error.value)


def test_unknown_tokenizer_spec_names_the_accepted_forms():
    with pytest.raises(ConfigError) as error:
        validate_config(tiny_config(data__tokenizer="no-such-tokenizer"), num_devices=1)
    assert "no-such-tokenizer" in str(error.value) and "byte" in str(error.value) and "bpe:" in str(error.value)


def test_eval_batches_zero_is_the_whole_split_for_lm():
    validate_config(tiny_config(data__eval_batches=0), num_devices=1)


def test_documents_reach_the_model_only_with_an_end_of_document_token(bpe_path):
    linear = {"model__attention__kind": "linear", "model__attention__chunk_size": 8}
    byte_task = validate_config(tiny_config(**linear), num_devices=1)
    model = byte_task.build_model(nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, byte_task.eval_batches()[0])
    assert np.isfinite(byte_task.loss(model, batch)[0])  # bytes: no segment ids for the model, nothing to refuse
    bpe_task = validate_config(tiny_config(**linear, data__tokenizer=bpe_path, model__vocab_size=0), num_devices=1)
    model = bpe_task.build_model(nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, bpe_task.eval_batches()[0])
    with pytest.raises(ValueError, match="attention kind 'linear' cannot keep packed documents apart"):
        bpe_task.loss(model, batch)


def test_packed_eval_batches_attend_within_documents(bpe_path):
    task = validate_config(tiny_config(data__tokenizer=bpe_path, model__vocab_size=0, data__eval_batches=0),
                           num_devices=1)
    model = task.build_model(nnx.Rngs(0))
    packed = next(b for b in task.eval_batches() if (b["segment_ids"] > 1).any())  # a window with 2 documents
    batch = jax.tree.map(jnp.asarray, packed)
    tokens, segments = batch["tokens"], batch["segment_ids"]
    loss = task.loss(model, batch)[0]
    kw = dict(token_byte_lengths=task.token_byte_lengths)
    np.testing.assert_allclose(loss, next_token_loss(model, tokens, segments, attend_within_documents=True, **kw)[0])
    assert not np.isclose(loss, next_token_loss(model, tokens, segments, **kw)[0], rtol=1e-4)


def test_whole_split_eval_combines_unequal_batches_exactly(bpe_path, tmp_path):
    config = tiny_config(data__tokenizer=bpe_path, model__vocab_size=0, data__eval_batches=0, data__seq_len=64)
    trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:1])
    batches = trainer.task.eval_batches()  # every window of the split once, the last batch padded
    params = trainer.init()["params"]
    whole = trainer.evaluate(params, batches)
    assert whole["num_tokens"] == sum(int((b["segment_ids"][:, 1:] != 0).sum()) for b in batches)
    # Unequal batches: a full one and one whose last rows are padding; their metrics combine to the joined batch's.
    padded = {k: v.copy() for k, v in batches[1].items()}
    padded["segment_ids"][-3:] = 0
    parts = [batches[0], padded]
    one = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
    split, joined = trainer.evaluate(params, parts), trainer.evaluate(params, [one])
    assert split.keys() == joined.keys()
    for name in joined:
        np.testing.assert_allclose(split[name], joined[name], rtol=1e-5, err_msg=name)


def test_lm_tiny_bpe_trains_a_few_steps(tmp_path):
    config = apply_overrides(lm_tiny_bpe.get_config(), {**TINY_OVERRIDES, "train.num_steps": 2,
                                                        "train.checkpoint_every": 2, "data.eval_batches": 1})
    summary = train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    assert config.model.vocab_size == 2048 and summary["final_step"] == 2
    assert all(np.isfinite(v) for v in summary["eval_end"].values())
