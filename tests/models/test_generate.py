"""Sampling controls of `generate` / `sample_logits`: nucleus (top_p) sampling against a float64 NumPy reference,
vocab_limit, stopping at EOS (with an early exit equal to decoding to the end and masking), the ahead-of-time
compiled path, and argument errors. Cached == uncached decoding for the older arguments: tests/models/test_lm.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.models.lm import DecoderLM, compile_generate, generate, sample_logits

SMALL = dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48)


def _model(cls=DecoderLM):
    return cls(**SMALL, rngs=nnx.Rngs(0))


def _prompt(batch=4, length=3):
    return jax.random.randint(jax.random.key(3), (batch, length), 0, SMALL["vocab_size"])


def _distribution(logits, temperature, top_k, top_p):
    """The slow reference: float64 probabilities of softmax(logits / temperature) restricted to the top_k most
    likely, renormalised, then to the nucleus (Holtzman et al. 2020): sorted by probability, a token is kept when
    the mass of the tokens before it is < top_p. Returns the renormalised distribution (zeros outside)."""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    if top_k:
        p[order[top_k:]] = 0.0
        p /= p.sum()
    before = np.cumsum(p[order]) - p[order]
    p[order[before >= top_p]] = 0.0
    return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, 0.5), (0.7, None, 0.9), (1.5, 6, 0.8),
                                                     (1.0, 0, 0.3)])
def test_top_p_samples_the_nucleus_with_renormalised_frequencies(temperature, top_k, top_p):
    rows, vocab, draws = 3, 16, 20_000
    logits = 2.0 * jax.random.normal(jax.random.key(0), (rows, vocab))
    keys = jax.random.split(jax.random.key(1), draws)
    ids = np.asarray(jax.jit(jax.vmap(lambda k: sample_logits(logits, k, temperature, top_k, top_p)))(keys))
    for r in range(rows):
        expected = _distribution(logits[r], temperature, top_k, top_p)
        assert set(ids[:, r]) == set(np.flatnonzero(expected))  # every draw lies in the set, every member drawn
        frequencies = np.bincount(ids[:, r], minlength=vocab) / draws
        # 5 standard errors of a frequency from `draws` independent draws (at most 0.0177 here)
        np.testing.assert_array_less(np.abs(frequencies - expected),
                                     5 * np.sqrt(expected * (1 - expected) / draws) + 1e-12)


def test_top_p_one_or_none_is_off_and_greedy_ignores_it():
    model, prompt, key = _model(), _prompt(), jax.random.key(5)
    off = generate(model, prompt, key, max_new_tokens=6, temperature=0.9)
    np.testing.assert_array_equal(generate(model, prompt, key, max_new_tokens=6, temperature=0.9, top_p=1.0), off)
    np.testing.assert_array_equal(generate(model, prompt, key, max_new_tokens=6, temperature=0.9, top_p=None), off)
    greedy = generate(model, prompt, key, max_new_tokens=6, temperature=0.0)
    np.testing.assert_array_equal(generate(model, prompt, key, max_new_tokens=6, temperature=0.0, top_p=0.1), greedy)


def test_top_p_with_and_without_cache_agree():
    model, prompt, key = _model(), _prompt(), jax.random.key(6)
    kw = dict(max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.7)
    np.testing.assert_array_equal(generate(model, prompt, key, **kw), generate(model, prompt, key, use_cache=False,
                                                                                 **kw))


def test_vocab_limit_never_samples_padding_ids():
    logits = jax.random.normal(jax.random.key(1), (2, 64)).at[:, 40:].set(10.0)  # padding by far the most likely
    keys = jax.random.split(jax.random.key(2), 2000)
    for kw in (dict(temperature=1.0, top_k=None), dict(temperature=2.0, top_k=30, top_p=0.5)):
        ids = jax.vmap(lambda k: sample_logits(logits, k, vocab_limit=40, **kw))(keys)
        assert int(ids.max()) < 40
    greedy = sample_logits(logits, keys[0], 0.0, None, vocab_limit=40)
    np.testing.assert_array_equal(greedy, jnp.argmax(logits[:, :40], axis=-1))
    model, prompt = _model(), _prompt(8, 2)
    free = generate(model, prompt, jax.random.key(0), max_new_tokens=16, temperature=1.0)
    assert int(free[:, 2:].max()) >= 32  # the model does sample the upper half unless told not to
    for cache in (True, False):
        limited = generate(model, prompt, jax.random.key(0), max_new_tokens=16, temperature=1.0, vocab_limit=32,
                           use_cache=cache)
        assert int(limited[:, 2:].max()) < 32
    # vocab_limit = the vocabulary size masks nothing: the same tokens as without it
    np.testing.assert_array_equal(generate(model, prompt, jax.random.key(0), max_new_tokens=16, temperature=1.0,
                                           vocab_limit=64), free)


def _masked_after_eos(tokens, prompt_len, eos_id):
    """Each row's tokens after its first eos_id among the new tokens replaced by eos_id (the slow reference)."""
    tokens = np.array(tokens)
    for row in tokens:
        hits = np.flatnonzero(row[prompt_len:] == eos_id)
        if hits.size:
            row[prompt_len + hits[0]:] = eos_id
    return tokens


@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_stops_rows_like_decoding_to_the_end_and_masking(use_cache):
    model, prompt, key = _model(), _prompt(), jax.random.key(8)
    kw = dict(max_new_tokens=12, temperature=1.0, use_cache=use_cache)
    free = np.asarray(generate(model, prompt, key, **kw))
    eos_id = int(free[0, 3 + 2])  # row 0 produces it at step 2: that row stops there
    stopped = np.asarray(generate(model, prompt, key, eos_id=eos_id, **kw))
    expected = _masked_after_eos(free, 3, eos_id)
    np.testing.assert_array_equal(stopped, expected)
    assert (stopped[0, 5:] == eos_id).all() and not (expected == free).all()


class _CountingLM(DecoderLM):
    """A DecoderLM that reports every forward pass it runs (through a host callback)."""

    calls: list = []

    def __call__(self, tokens, *args, **kwargs):
        jax.debug.callback(lambda: _CountingLM.calls.append(1))
        return super().__call__(tokens, *args, **kwargs)


@pytest.mark.parametrize("use_cache", [True, False])
def test_decoding_stops_early_once_every_row_produced_eos(use_cache):
    model, prompt, key = _model(_CountingLM), _prompt(batch=1), jax.random.key(9)
    kw = dict(max_new_tokens=12, temperature=1.0, use_cache=use_cache)
    free = np.asarray(generate(model, prompt, key, **kw))
    eos_id = int(free[0, 3 + 2])
    first = int(np.flatnonzero(free[0, 3:] == eos_id)[0])  # step of the first EOS (<= 2)
    _CountingLM.calls.clear()
    stopped = generate(model, prompt, key, eos_id=eos_id, **kw).block_until_ready()
    jax.effects_barrier()
    np.testing.assert_array_equal(stopped, _masked_after_eos(free, 3, eos_id))
    assert len(_CountingLM.calls) == first + 1  # one forward pass per step up to the EOS (the prefill is step 0)


def test_compiled_generate_equals_generate():
    model, prompt, key = _model(), _prompt(), jax.random.key(10)
    kw = dict(max_new_tokens=7, temperature=0.8, top_p=0.9, eos_id=5, vocab_limit=60)
    run = compile_generate(model, prompt, key, **kw)
    np.testing.assert_array_equal(run(prompt, key), generate(model, prompt, key, **kw))
    other = jax.random.key(11)
    np.testing.assert_array_equal(run(prompt, other), generate(model, prompt, other, **kw))


@pytest.mark.parametrize("kw, error, match", [
    (dict(top_p=0.0), ValueError, r"top_p must be a real number in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), ValueError, r"top_p must be a real number in \(0, 1\], got 1.5"),
    (dict(top_p=float("nan")), ValueError, r"top_p must be a real number in \(0, 1\]"),
    (dict(top_p="0.9"), TypeError, r"top_p must be a real number in \(0, 1\], got '0.9'"),
    (dict(eos_id=64), ValueError, r"eos_id must be an id in \[0, 64\)"),
    (dict(eos_id=40, vocab_limit=32), ValueError, r"eos_id must be an id in \[0, 32\)"),
    (dict(eos_id=-1), ValueError, "eos_id must be a non-negative int"),
    (dict(eos_id=1.0), TypeError, "eos_id must be a non-negative int"),
    (dict(vocab_limit=0), ValueError, "vocab_limit must be a positive int"),
    (dict(vocab_limit=65), ValueError, "vocab_limit must be at most the model's vocabulary size 64"),
])
def test_generate_refuses_sampling_controls_out_of_range(kw, error, match):
    with pytest.raises(error, match=match):
        generate(_model(), jnp.asarray([[1, 2]], jnp.int32), jax.random.key(0), max_new_tokens=2, **kw)
