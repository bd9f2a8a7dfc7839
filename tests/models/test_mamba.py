"""MambaLM (recurrent decoding == parallel forward, generate with/without cache) and the SSM
SequenceClassifier (shapes, every mixer trains)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from jaxmodels.models.lm import generate
from jaxmodels.models.mamba import MambaLM, train_flops_per_token
from jaxmodels.models.sequence_classifier import SequenceClassifier
from tests.compiled import forward
from tests.fitting import adam_losses

SMALL = dict(vocab_size=32, num_layers=2, embed_dim=16, d_state=4, d_conv=3, expand=2)


def _model(**kw):
    return nnx.jit(lambda: MambaLM(**{**SMALL, **kw}, rngs=nnx.Rngs(0)))()


def _apply(module, fn, *args):
    graphdef, params = nnx.split(module)
    return jax.jit(lambda p, *a: fn(nnx.merge(graphdef, p), *a))(params, *args)


def _shape(module, fn, *args):
    """jax.ShapeDtypeStruct of fn(module, *args), traced but not compiled."""
    graphdef, params = nnx.split(module)
    return jax.eval_shape(lambda p, *a: fn(nnx.merge(graphdef, p), *a), params, *args)


def test_shapes_dtype_parameter_count_and_flops():
    model = _model()
    logits = _shape(model, lambda m, t: m(t), jnp.zeros((2, 7), jnp.int32))
    assert logits.shape == (2, 7, 32) and logits.dtype == jnp.float32
    v, d, n, c, di, r, L = 32, 16, 4, 3, 32, 1, 2
    per_layer = d * 2 * di + c * di + di + di * (r + 2 * n) + r * di + di + di * n + di + di * d + d
    assert sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == v * d + L * per_layer + d + d * v
    matmuls = L * (d * 2 * di + di * (r + 2 * n) + r * di + di * d) + d * v
    assert train_flops_per_token(**SMALL) == 6 * matmuls + 3 * L * (2 * c * di + 7 * di * n)
    assert model.has_cache


def test_bfloat16_compute_keeps_float32_params():
    model = _model(dtype=jnp.bfloat16)
    assert _shape(model, lambda m, t: m(t), jnp.zeros((1, 5), jnp.int32)).dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_cached_logits_equal_parallel_forward_and_causality():
    model = _model()
    tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, 32)

    def cached(m, tokens):
        cache = m.init_cache(2, 11)
        out = []
        for start, stop in ((0, 5), (5, 6), (6, 7), (7, 11)):   # prompt, two single tokens, a chunk
            logits, cache = m(tokens[:, start:stop], cache=cache, cache_index=jnp.int32(start))
            out.append(logits)
        return jnp.concatenate(out, axis=1)

    changed = tokens.at[:, 8:].set((tokens[:, 8:] + 1) % 32)
    both = _apply(model, lambda m, t: m(t), jnp.concatenate([tokens, changed]))
    full = both[:2]
    np.testing.assert_allclose(_apply(model, cached, tokens), full, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(both[2:, :8], full[:, :8], atol=1e-5)   # causal
    assert np.abs(both[2:, 8:] - full[:, 8:]).max() > 1e-3


@pytest.mark.parametrize("temperature", [0.0])
def test_generate_with_cache_equals_without(temperature):
    model = _model()
    prompt = jax.random.randint(jax.random.key(3), (3, 4), 0, 32)
    kw = dict(max_new_tokens=8, temperature=temperature)
    cached = generate(model, prompt, jax.random.key(4), use_cache=True, **kw)
    uncached = generate(model, prompt, jax.random.key(4), use_cache=False, **kw)
    assert cached.shape == (3, 12)
    np.testing.assert_array_equal(cached[:, :4], prompt)
    np.testing.assert_array_equal(cached, uncached)


def test_lm_adam_steps_reduce_loss_and_bad_inputs():
    model = _model(num_layers=1)
    tokens = jax.random.randint(jax.random.key(5), (4, 12), 0, 32)

    def loss_fn(m):
        logits = m(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    losses = adam_losses(model, loss_fn, 6)
    assert losses[-1] < losses[0] - 0.1
    with pytest.raises(ValueError, match="cache has 2 layers"):
        _shape(model, lambda m, t: m(t, cache=m.init_cache(1, 4) * 2), jnp.zeros((1, 1), jnp.int32))
    with pytest.raises(ValueError, match="tokens must be"):
        _shape(model, lambda m, t: m(t), jnp.zeros((1, 3, 2), jnp.int32))


def test_scalar_a_reaches_every_block_and_runs_the_ssd_scan():
    model = _model(scalar_A=True, scan_implementation="ssd")
    assert [b.mixer.A_log.value.shape for b in model.blocks] == [(32, 1)] * 2
    tokens = jax.random.randint(jax.random.key(7), (2, 9), 0, 32)
    logits = _apply(model, lambda m, t: m(t), tokens)
    for block in model.blocks:
        block.mixer.scan_implementation = "associative"
    np.testing.assert_allclose(logits, _apply(model, lambda m, t: m(t), tokens), rtol=1e-5, atol=1e-5)
    section = ml_collections.ConfigDict(dict(SMALL, name="mamba_lm", scan_implementation="ssd", scalar_A="yes"))
    with pytest.raises(TypeError, match="config.model.scalar_A must be a bool, got 'yes'"):
        MambaLM.check_config(section)


# ----------------------------------------------------------------------------- SequenceClassifier


def _toy_task(n=16, L=12):
    """Label = whether the sequence's first-half mean exceeds its second-half mean (needs memory)."""
    x = jax.random.normal(jax.random.key(6), (n, L, 1))
    y = (x[:, : L // 2, 0].mean(1) > x[:, L // 2:, 0].mean(1)).astype(jnp.int32)
    return x, y


@pytest.mark.parametrize("mixer,extra", [("s4d", dict(bidirectional=True)), ("s4", {}),
                                         ("lru", dict(mlp_dim=16, mixer_kwargs=dict(r_min=0.5)))])
def test_sequence_classifier_shapes_and_training(mixer, extra):
    model = nnx.jit(lambda: SequenceClassifier(num_classes=2, d_model=8, num_layers=1, mixer=mixer, in_features=1,
                                               d_state=4, rngs=nnx.Rngs(0), **extra))()
    x, y = _toy_task()
    logits = _shape(model, lambda m, x: m(x), x)
    assert logits.shape == (16, 2) and logits.dtype == jnp.float32

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    losses = adam_losses(model, loss_fn, 5, learning_rate=2e-2)
    assert losses[-1] < losses[0]


def test_sequence_classifier_tokens_and_errors():
    """Token input, the Mamba mixer with last-token pooling (Mamba's training is tested on MambaLM), errors."""
    model = nnx.jit(lambda: SequenceClassifier(num_classes=3, d_model=8, num_layers=1, mixer="mamba", vocab_size=10,
                                               d_state=2, pooling="last", norm_kind="rms", rngs=nnx.Rngs(1)))()
    out = _shape(model, lambda m, t: m(t), jnp.zeros((2, 5), jnp.int32))
    assert out.shape == (2, 3) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="int token ids"):
        _shape(model, lambda m, t: m(t), jnp.zeros((2, 5, 1)))
    with pytest.raises(ValueError, match="unknown mixer"):
        SequenceClassifier(num_classes=2, d_model=8, num_layers=1, mixer="rnn", in_features=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exactly one"):
        SequenceClassifier(num_classes=2, d_model=8, num_layers=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="bidirectional"):
        SequenceClassifier(num_classes=2, d_model=8, num_layers=1, mixer="lru", in_features=1, bidirectional=True,
                           rngs=nnx.Rngs(0))


def test_segment_ids_are_accepted_and_do_not_reset_the_state():
    model = MambaLM(vocab_size=16, num_layers=1, embed_dim=8, rngs=nnx.Rngs(0))
    tokens = jnp.arange(10, dtype=jnp.int32)[None] % 16
    segment_ids = jnp.asarray([[1] * 4 + [2] * 6], jnp.int32)
    np.testing.assert_array_equal(forward(model, tokens, segment_ids=segment_ids), forward(model, tokens))
    logits, aux = forward(model, tokens, segment_ids=segment_ids, return_aux=True)
    np.testing.assert_array_equal(logits, forward(model, tokens))
    assert aux == {}
