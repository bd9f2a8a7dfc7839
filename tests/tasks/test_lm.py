"""The language-modelling loss and metrics on hand-made batches: padding, bits per byte for any tokenizer, packed
documents, and eval metrics that combine exactly over unequal batches. (Tests that read text through the data
layer are in test_lm_text.py.)"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxmodels.models.lm import DecoderLM
from jaxmodels.tasks.base import Task
from jaxmodels.tasks.lm import METRIC_WEIGHTS, LanguageModeling, check_sample_config, next_token_loss

VOCAB = 32
BYTES = np.random.default_rng(0).integers(0, 5, VOCAB).astype(np.int32)  # bytes per id; 0 like special tokens


def _model(**kw):
    return DecoderLM(vocab_size=VOCAB, num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=1, head_dim=8,
                     mlp_dim=32, rngs=nnx.Rngs(0), **kw)


def _batch(rows=3, length=9, seed=1):
    """tokens (rows, length + 1) and segment ids: row 0 one document, row 1 two, row 2 a document then padding."""
    tokens = jax.random.randint(jax.random.key(seed), (rows, length + 1), 0, VOCAB)
    segments = np.ones((rows, length + 1), np.int32)
    segments[1, 4:] = 2
    segments[2, 6:] = 0
    return tokens, jnp.asarray(segments)


def _nats(model, tokens, segment_ids=None):
    """float64 per-target cross entropy (rows, length) computed the obvious way."""
    kw = {} if segment_ids is None else {"segment_ids": segment_ids[:, :-1]}
    logp = jax.nn.log_softmax(np.asarray(model(tokens[:, :-1], **kw), np.float64), axis=-1)
    return -np.take_along_axis(np.asarray(logp), np.asarray(tokens[:, 1:])[..., None], axis=-1)[..., 0]


def test_without_segments_every_target_counts_and_bytes_are_tokens():
    model, (tokens, _) = _model(), _batch()
    loss, metrics = next_token_loss(model, tokens)
    nats = _nats(model, tokens)
    np.testing.assert_allclose(loss, nats.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["bits_per_byte"], nats.mean() / math.log(2), rtol=1e-5)
    np.testing.assert_allclose(metrics["perplexity"], np.exp(nats.mean()), rtol=1e-5)
    assert metrics["num_tokens"] == metrics["num_bytes"] == nats.size
    assert set(metrics) == {"loss", "bits_per_byte", "perplexity", "num_tokens", "num_bytes"}


def test_padding_targets_do_not_count_and_bits_per_byte_uses_each_tokens_bytes():
    model, (tokens, segments) = _model(), _batch()
    loss, metrics = next_token_loss(model, tokens, segments, token_byte_lengths=BYTES)
    nats = _nats(model, tokens)
    counted = np.asarray(segments[:, 1:]) != 0
    num_bytes = BYTES[np.asarray(tokens[:, 1:])][counted].sum()
    np.testing.assert_allclose(loss, nats[counted].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["bits_per_byte"], nats[counted].sum() / math.log(2) / num_bytes, rtol=1e-5)
    assert metrics["num_tokens"] == counted.sum() and metrics["num_bytes"] == num_bytes


def test_attending_within_documents_gives_the_models_segment_logits():
    model, (tokens, segments) = _model(), _batch()
    loss, _ = next_token_loss(model, tokens, segments, attend_within_documents=True)
    nats = _nats(model, tokens, segments)
    np.testing.assert_allclose(loss, nats[np.asarray(segments[:, 1:]) != 0].mean(), rtol=1e-5)
    assert not np.isclose(loss, next_token_loss(model, tokens, segments)[0], rtol=1e-4)
    with pytest.raises(ValueError, match="attend_within_documents=True needs the segment_ids"):
        next_token_loss(model, tokens, attend_within_documents=True)


def test_attention_that_cannot_keep_documents_apart_fails_only_when_asked_to():
    model, (tokens, segments) = _model(attention=dict(kind="linear")), _batch()
    next_token_loss(model, tokens, segments)  # byte-style: segment ids only mask the targets
    with pytest.raises(ValueError, match="attention kind 'linear' cannot keep packed documents apart"):
        next_token_loss(model, tokens, segments, attend_within_documents=True)


def test_moe_metrics_and_cross_entropy():
    model = _model(moe=dict(num_experts=2))
    tokens, segments = _batch()
    loss, metrics = next_token_loss(model, tokens, segments, token_byte_lengths=BYTES)
    np.testing.assert_allclose(loss, metrics["cross_entropy"] + metrics["moe_loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["perplexity"], np.exp(metrics["cross_entropy"]), rtol=1e-6)
    assert {"load_balancing_loss", "router_z_loss", "max_expert_load"} <= set(metrics)


def _lm_task() -> LanguageModeling:
    """A LanguageModeling without its constructor (which reads the data): combine_metrics needs no state."""
    return LanguageModeling.__new__(LanguageModeling)


def test_eval_over_unequal_batches_equals_the_one_batch_figures():
    """A split of 3 rows evaluated as 2 rows + (1 row and a padding row) combines to the one-batch metrics."""
    model, (tokens, segments) = _model(), _batch()
    padding_row = (jnp.zeros_like(tokens[:1]), jnp.zeros_like(segments[:1]))
    parts = [(tokens[:2], segments[:2]),
             (jnp.concatenate([tokens[2:], padding_row[0]]), jnp.concatenate([segments[2:], padding_row[1]]))]
    loss = jax.jit(lambda t, s: next_token_loss(model, t, s, token_byte_lengths=BYTES)[1])
    whole = {k: float(v) for k, v in loss(tokens, segments).items()}
    combined = _lm_task().combine_metrics([{k: float(v) for k, v in loss(*p).items()} for p in parts])
    assert combined.keys() == whole.keys()
    for name in whole:
        np.testing.assert_allclose(combined[name], whole[name], rtol=1e-6, err_msg=name)
    # a plain mean over the batches would be wrong here: the batches hold different numbers of targets and bytes
    naive = np.mean([float(loss(*p)["bits_per_byte"]) for p in parts])
    assert not np.isclose(naive, whole["bits_per_byte"], rtol=1e-3)


def test_combine_metrics_rules():
    class Plain(Task):
        loss = abstract_batch = train_batches = eval_batches = None

    batches = [{"loss": 1.0, "bits_per_byte": 2.0, "num_tokens": 1.0, "num_bytes": 3.0},
               {"loss": 4.0, "bits_per_byte": 1.0, "num_tokens": 3.0, "num_bytes": 1.0}]
    assert Plain(ml_collections.ConfigDict()).combine_metrics(batches) == {
        "loss": 2.5, "bits_per_byte": 1.5, "num_tokens": 2.0, "num_bytes": 2.0}  # default: plain means
    out = _lm_task().combine_metrics(batches)
    assert out["num_tokens"] == 4.0 and out["num_bytes"] == 4.0
    assert out["loss"] == (1.0 * 1 + 4.0 * 3) / 4 and out["bits_per_byte"] == (2.0 * 3 + 1.0 * 1) / 4
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))
    assert set(METRIC_WEIGHTS.values()) == {"num_tokens", "num_bytes"}
    with pytest.raises(ValueError, match="at least one batch"):
        _lm_task().combine_metrics([])


@pytest.mark.parametrize("top_p, error", [(0.0, ValueError), (1.5, ValueError), ("0.5", TypeError)])
def test_sample_top_p_must_be_in_zero_one(top_p, error):
    sample = ml_collections.ConfigDict(dict(prompt="a", max_new_tokens=1, temperature=1.0, top_k=0, top_p=top_p))
    with pytest.raises(error, match=r"config.sample.top_p must be a real number in \(0, 1\]"):
        check_sample_config(sample, VOCAB)
    check_sample_config(ml_collections.ConfigDict({**sample, "top_p": 1.0}), VOCAB)
