"""The LM with every attention kind: causality, cached decoding == full forward, position options,
clear errors; and every experiments/configs/lm_<kind>.py trains a few steps."""

import importlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.models.lm import DecoderLM, generate
from jaxmodels.nn.attention import CACHED_KINDS, KINDS, AttentionSpec
from jaxmodels.ops.position import apply_rope
from tests.compiled import forward

SMALL = dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48)
# Small enough for sequences of 16-32: chunks and blocks of 8.
SPEC = dict(chunk_size=8, block_size=8, sparse_block=8, sparse_summary=2, num_features=16)


def _model(seed=0, **attention):
    return DecoderLM(**SMALL, attention=AttentionSpec(**{**SPEC, **attention}), rngs=nnx.Rngs(seed))


def _tokens(seed, length, batch=2):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, 64)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_causal_and_finite(kind):
    model = _model(kind=kind)
    a = _tokens(1, 16)
    b = a.at[:, 10:].set((a[:, 10:] + 1) % 64)
    logits_a, logits_b = model(a), model(b)
    assert logits_a.shape == (2, 16, 64) and bool(jnp.all(jnp.isfinite(logits_a)))
    np.testing.assert_allclose(logits_a[:, :10], logits_b[:, :10], atol=2e-5)
    assert not np.allclose(logits_a[:, 10:], logits_b[:, 10:], atol=1e-3)


CACHED_CASES = [dict(kind=k) for k in CACHED_KINDS] + [
    dict(kind="softmax", position="alibi"), dict(kind="softmax", position="rerope", rerope_window=4),
    dict(kind="softmax", position="rerope", rerope_window=4, rerope_leaky=4.0),
    dict(kind="softmax", window=5), dict(kind="softmax", qk_norm=True), dict(kind="softmax", position="none"),
    dict(kind="softmax", rope_scaling="yarn", rope_factor=4.0, train_length=8),
    dict(kind="softmax", rope_scaling="ntk", rope_factor=2.0, log_n=True, train_length=8),
    dict(kind="linear", feature_map="relu", qk_norm=True), dict(kind="softmax", position="sinusoidal"),
    dict(kind="softmax", position="learned", max_positions=24), dict(kind="diag", position="learned", max_positions=32)]


@pytest.mark.parametrize("attention", CACHED_CASES, ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()))
def test_cached_decoding_equals_full_forward(attention):
    """Prefill 11 tokens, then feed 13 one at a time: every position's logits == the full forward's."""
    model = _model(**attention)
    tokens = _tokens(2, 24)
    full = forward(model, tokens)
    cache = model.init_cache(2, 24)
    logits, cache = forward(model, tokens[:, :11], cache=cache, cache_index=jnp.int32(0))
    steps = [logits]
    for t in range(11, 24):
        logits, cache = forward(model, tokens[:, t:t + 1], cache=cache, cache_index=jnp.int32(t))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["softmax", "linear", "transnormer", "gau"])
def test_generate_with_and_without_cache_agree(kind):
    """Kinds without a cached form (gau) decode uncached even when asked for the cache."""
    model = _model(kind=kind)
    prompt, key = _tokens(3, 5), jax.random.key(4)
    kw = dict(max_new_tokens=9, temperature=0.0)
    np.testing.assert_array_equal(generate(model, prompt, key, **kw), generate(model, prompt, key, use_cache=False,
                                                                             **kw))
    assert model.has_cache == (kind != "gau")


def test_log_n_changes_nothing_within_the_training_length():
    tokens = _tokens(5, 16)
    base = _model(kind="softmax")
    scaled = _model(kind="softmax", log_n=True, train_length=16)
    np.testing.assert_allclose(scaled(tokens), base(tokens), atol=1e-6)
    longer = _model(kind="softmax", log_n=True, train_length=8)
    assert not np.allclose(longer(tokens)[:, 8:], base(tokens)[:, 8:], atol=1e-4)
    np.testing.assert_allclose(longer(tokens)[:, :8], base(tokens)[:, :8], atol=1e-6)


def test_rerope_with_a_window_beyond_the_length_is_rope():
    tokens = _tokens(6, 16)
    np.testing.assert_allclose(_model(kind="softmax", position="rerope", rerope_window=16)(tokens),
                               _model(kind="softmax")(tokens), atol=1e-5)


@pytest.mark.parametrize("method", ["linear", "ntk", "yarn"])
def test_rope_scaling_at_factor_one_is_plain_rope(method):
    tokens = _tokens(7, 16)
    scaled = _model(kind="softmax", rope_scaling=method, rope_factor=1.0, train_length=16)
    np.testing.assert_allclose(scaled(tokens), _model(kind="softmax")(tokens), atol=1e-5)


def test_linear_position_interpolation_is_rope_at_scaled_positions():
    """PI with factor s rotates position m by m/s: the layer equals RoPE applied at positions / s."""
    x = jax.random.normal(jax.random.key(8), (1, 12, 2, 8))
    from jaxmodels.ops.position import rope_inverse_frequencies
    pi = rope_inverse_frequencies(8, method="linear", factor=4.0).inv_freq
    positions = jnp.arange(12)
    np.testing.assert_allclose(apply_rope(x, positions, inv_freq=pi), apply_rope(x, positions / 4.0), atol=1e-5)


def test_qk_norm_adds_per_head_gains():
    plain, normed = _model(kind="softmax"), _model(kind="softmax", qk_norm=True)
    count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert count(normed) - count(plain) == SMALL["num_layers"] * 2 * SMALL["head_dim"]


def test_transnormer_puts_diag_below_norm():
    model = DecoderLM(**{**SMALL, "num_layers": 4}, attention=AttentionSpec(kind="transnormer", chunk_size=8),
                      rngs=nnx.Rngs(0))
    assert [block.attn.kind for block in model.blocks] == ["diag", "diag", "norm", "norm"]


@pytest.mark.parametrize("fields, match", [
    (dict(kind="softmaxx"), r"attention.kind='softmaxx' is not valid; choose one of \['softmax'"),
    (dict(kind="linear", position="alibi"), r"position='alibi' needs attention.kind='softmax'"),
    (dict(position="none", rope_scaling="yarn", train_length=8), "rope_scaling='yarn' needs attention.position='rope'"),
    (dict(rope_scaling="dynamic_ntk"), r"attention.train_length .* must be set"),
    (dict(kind="linear", window=4), "attention.window needs attention.kind='softmax'"),
    (dict(implementation="fast"), r"attention.implementation='fast' is not valid"),
])
def test_bad_specs_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        AttentionSpec(**fields)


def test_learned_positions_are_a_table_and_refuse_longer_sequences():
    model = _model(kind="softmax", position="learned", max_positions=16)
    assert model.position_table.value.shape == (16, SMALL["embed_dim"])
    assert model(_tokens(11, 16)).shape == (2, 16, 64)
    with pytest.raises(ValueError, match=r"17 tokens is longer than the 16 learned positions"):
        model(_tokens(11, 17))
    with pytest.raises(ValueError, match=r"max_length=20 is longer than the 16 learned positions"):
        model.init_cache(2, 20)


def test_sparse_kind_needs_a_length_multiple_of_the_block():
    with pytest.raises(ValueError, match=r"length \(12\) to be a multiple of attention.block_size=8"):
        _model(kind="sparse_strided")(_tokens(9, 12))


def _attention_config(name: str) -> bool:
    """A decoder-LM config of an attention kind: not lm_tiny (tests/train) nor a fine-tune (config.peft: lm_tiny's
    model, trained in tests/train/test_peft_training.py)."""
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    return name != "lm_tiny" and config.model.name == "decoder_lm" and "peft" not in config


CONFIGS = sorted(p.stem for p in pathlib.Path(__file__).parents[2].glob("experiments/configs/lm_*.py")
                 if _attention_config(p.stem))


def test_a_config_exists_for_every_kind():
    assert {f"lm_{k}" for k in KINDS} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_validates_and_its_model_learns(name):
    """Each config passes validate_config, and its model (shrunk) lowers the loss of a batch in a few
    SGD steps. The full pipeline per kind runs in experiments/attention_kinds.py."""
    from jaxmodels.tasks.lm import next_token_loss
    from jaxmodels.train.config import validate_config
    from tests.tiny import TINY_OVERRIDES, apply_overrides
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    apply_overrides(config, {**TINY_OVERRIDES, "model.num_layers": 2, "model.embed_dim": 32, "model.head_dim": 16})
    validate_config(config, num_devices=1)
    from jaxmodels.models import make_model
    model = make_model(config.model, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batch = _tokens(10, config.data.seq_len + 1, batch=4) % config.model.vocab_size

    @jax.jit
    def sgd(params):
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(nnx.merge(graphdef, p), batch)[0])(params)
        return jax.tree.map(lambda p, g: p - 0.3 * g, params, grads), loss

    losses = []
    for _ in range(4):
        params, loss = sgd(params)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses
