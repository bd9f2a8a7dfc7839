import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxmodels.models import check_model_config
from jaxmodels.models.lm import DecoderLM, generate, sample_logits, train_flops_per_token
from jaxmodels.models.mamba import MambaLM
from jaxmodels.nn.layers import RMSNorm
from tests.compiled import forward

SMALL = dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48)
MAMBA = dict(vocab_size=64, num_layers=2, embed_dim=16, d_state=4, d_conv=3, expand=2)


def _model(**kw):
    return DecoderLM(**{**SMALL, **kw}, rngs=nnx.Rngs(0))


def test_shapes_dtype_and_parameter_count():
    model = _model()
    logits = model(jnp.zeros((2, 7), jnp.int32))
    assert logits.shape == (2, 7, 64) and logits.dtype == jnp.float32
    d, h, k, hd, f, v, L = 32, 4, 2, 8, 48, 64, 2
    expected = v * d + L * (d * hd * (2 * h + 2 * k) + 3 * d * f + 2 * d) + d + d * v
    assert sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == expected


def test_bfloat16_compute_keeps_float32_params():
    model = _model(dtype=jnp.bfloat16)
    assert model(jnp.zeros((1, 5), jnp.int32)).dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_causality_future_tokens_do_not_change_past_logits():
    model = _model()
    a = jax.random.randint(jax.random.key(1), (1, 12), 0, 64)
    b = a.at[:, 8:].set((a[:, 8:] + 1) % 64)
    np.testing.assert_allclose(model(a)[:, :8], model(b)[:, :8], atol=1e-5)


def test_remat_does_not_change_loss_or_gradients():
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, 64)

    def loss(model):
        return jnp.mean(model(tokens) ** 2)

    plain, remat = _model(), _model(remat="full")
    loss_and_grad = nnx.jit(nnx.value_and_grad(loss))  # one compilation per model, not one per op
    (l1, g1), (l2, g2) = loss_and_grad(plain), loss_and_grad(remat)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.7, 5)])
def test_generate_with_kv_cache_equals_without(temperature, top_k):
    model = _model()
    prompt = jax.random.randint(jax.random.key(3), (3, 4), 0, 64)
    key = jax.random.key(4)
    kw = dict(max_new_tokens=10, temperature=temperature, top_k=top_k)
    cached = generate(model, prompt, key, use_cache=True, **kw)
    uncached = generate(model, prompt, key, use_cache=False, **kw)
    assert cached.shape == (3, 14)
    np.testing.assert_array_equal(cached[:, :4], prompt)
    np.testing.assert_array_equal(cached, uncached)


def test_cached_forward_equals_full_forward_logits():
    model = _model()
    tokens = jax.random.randint(jax.random.key(5), (2, 10), 0, 64)
    full = forward(model, tokens)
    logits, cache = forward(model, tokens[:, :6], cache=model.init_cache(2, 10), cache_index=jnp.int32(0))
    np.testing.assert_allclose(logits, full[:, :6], atol=1e-5)
    for t in range(6, 10):
        step_logits, cache = forward(model, tokens[:, t:t + 1], cache=cache, cache_index=jnp.int32(t))
        np.testing.assert_allclose(step_logits[:, 0], full[:, t], atol=1e-5)


def test_flops_count_matches_6n_plus_attention():
    flops = train_flops_per_token(**{k: v for k, v in SMALL.items()}, mlp_kind="swiglu", seq_len=16)
    n = 2 * (32 * 8 * 12 + 3 * 32 * 48) + 32 * 64
    assert flops == 6 * n + 3 * 2 * 2 * 2 * 4 * 8 * 16 * 0.5


def test_generate_errors():
    model = _model()
    with pytest.raises(ValueError, match="prompt"):
        generate(model, jnp.zeros((4,), jnp.int32), jax.random.key(0), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, jnp.zeros((1, 2), jnp.int32), jax.random.key(0), max_new_tokens=0)
    with pytest.raises(ValueError, match="num_kv_heads"):
        _model(num_kv_heads=3)


@pytest.mark.parametrize("kw, error, match", [
    (dict(temperature=-1.0), ValueError, r"temperature must be a real number in \[0, inf\)"),
    (dict(temperature=float("nan")), ValueError, r"temperature must be a real number in \[0, inf\)"),
    (dict(top_k=65), ValueError, "top_k must be at most the vocabulary size 64"),
    (dict(top_k=-1), ValueError, "top_k must be a non-negative int"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be a positive int"),
    (dict(prompt=[[1, 64]]), ValueError, r"prompt must hold values in \[0, 64\)"),
    (dict(prompt=[[-1, 2]]), ValueError, r"prompt must hold values in \[0, 64\)"),
])
def test_generate_refuses_arguments_out_of_range(kw, error, match):
    kw = {"prompt": [[1, 2]], "max_new_tokens": 2, **kw}
    with pytest.raises(error, match=match):
        generate(_model(), jnp.asarray(kw.pop("prompt"), jnp.int32), jax.random.key(0), **kw)


def test_top_k_zero_and_none_both_mean_off():
    model, prompt, key = _model(), jnp.array([[1, 2, 3]], jnp.int32), jax.random.key(3)
    off = generate(model, prompt, key, max_new_tokens=4, top_k=None)
    np.testing.assert_array_equal(generate(model, prompt, key, max_new_tokens=4, top_k=0), off)
    np.testing.assert_array_equal(generate(model, prompt, key, max_new_tokens=4, top_k=64), off)
    logits = jnp.array([[0.0, 5.0, 1.0]])
    assert sample_logits(logits, key, 0.0, 0)[0] == 1  # greedy


DOCUMENTS = (5, 3, 4)  # a packed window: three documents then 2 padding tokens (segment 0)


def _packed(key=6):
    tokens = jax.random.randint(jax.random.key(key), (1, sum(DOCUMENTS) + 2), 0, 64)
    segment_ids = jnp.asarray([np.repeat([1, 2, 3, 0], (*DOCUMENTS, 2))], jnp.int32)
    return tokens, segment_ids


@pytest.mark.parametrize("kw", [
    dict(),                                                     # RoPE, grouped-query heads (4 query, 2 kv)
    dict(num_kv_heads=1, attention=dict(qk_norm=True)),         # multi-query heads
    dict(attention=dict(window=2)),                             # sliding window
    dict(attention=dict(position="alibi")),
    dict(attention=dict(position="learned", max_positions=16)),
    dict(attention=dict(position="sinusoidal", implementation="reference")),
])
def test_packed_documents_get_the_logits_they_get_alone(kw):
    model = _model(**kw)
    tokens, segment_ids = _packed()
    with jax.default_matmul_precision("float32"):
        packed = forward(model, tokens, segment_ids=segment_ids)
        start = 0
        for length in DOCUMENTS:
            alone = forward(model, tokens[:, start:start + length])  # positions 0 .. length - 1
            np.testing.assert_allclose(packed[:, start:start + length], alone, atol=1e-5, rtol=1e-5)
            start += length
        # Without segment ids the later documents see the earlier ones: the mask is what makes them equal.
        assert not np.allclose(forward(model, tokens)[:, DOCUMENTS[0]:sum(DOCUMENTS)],
                               packed[:, DOCUMENTS[0]:sum(DOCUMENTS)], atol=1e-3)


def test_segment_ids_with_the_aux_and_remat_paths():
    tokens, segment_ids = _packed()
    plain = forward(_model(), tokens, segment_ids=segment_ids)
    logits, aux = forward(_model(remat="full"), tokens, segment_ids=segment_ids, return_aux=True)
    np.testing.assert_allclose(logits, plain, atol=1e-6)
    assert aux == {}


@pytest.mark.parametrize("attention, match", [
    (dict(kind="linear"), "attention kind 'linear' cannot keep packed documents apart"),
    (dict(kind="performer"), "attention kind 'performer'"),
    (dict(kind="diag", chunk_size=4), "attention kind 'diag'"),
    (dict(kind="transnormer", chunk_size=4), "attention kind 'transnormer'"),
    (dict(kind="sparse_strided", block_size=7, sparse_block=7), "attention kind 'sparse_strided'"),
    (dict(kind="gau"), "attention kind 'gau'"),
    (dict(position="rerope"), "position 'rerope' cannot keep packed documents apart"),
])
def test_attention_that_cannot_keep_documents_apart_refuses_segment_ids(attention, match):
    model = _model(attention=attention)
    tokens, segment_ids = _packed()
    model(tokens)  # fine without segment ids
    with pytest.raises(ValueError, match=match):
        model(tokens, segment_ids=segment_ids)


def test_segment_ids_errors():
    model = _model()
    tokens, segment_ids = _packed()
    with pytest.raises(ValueError, match="segment_ids must have the tokens' shape"):
        model(tokens, segment_ids=segment_ids[:, 1:])
    with pytest.raises(ValueError, match="decoding with a cache"):
        model(tokens, cache=model.init_cache(1, 16), cache_index=jnp.int32(0), segment_ids=segment_ids)


def _with_w_out(tied, untied):
    """`untied`'s graph with `tied`'s params and w_out = tied's embedding transposed."""
    params = nnx.state(tied, nnx.Param).to_pure_dict()
    params["w_out"] = params["embed"]["embedding"].T
    state = nnx.state(untied)
    state.replace_by_pure_dict(params)
    return nnx.merge(nnx.graphdef(untied), state)


@pytest.mark.parametrize("make", [_model, lambda **kw: MambaLM(**{**MAMBA, **kw}, rngs=nnx.Rngs(0))],
                         ids=["decoder_lm", "mamba_lm"])
def test_tied_embeddings_reuse_the_table_as_the_output_head(make):
    tied, untied = make(tie_embeddings=True), make()
    assert not hasattr(tied, "w_out")
    count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert count(untied) - count(tied) == tied.embed_dim * tied.vocab_size
    tokens = jax.random.randint(jax.random.key(4), (2, 6), 0, tied.vocab_size)
    np.testing.assert_allclose(tied(tokens), _with_w_out(tied, untied)(tokens), rtol=1e-6, atol=1e-6)
    assert tied.train_flops_per_token(6) == untied.train_flops_per_token(6)


@pytest.mark.parametrize("make", [_model, lambda **kw: MambaLM(**{**MAMBA, **kw}, rngs=nnx.Rngs(0))],
                         ids=["decoder_lm", "mamba_lm"])
def test_norm_eps_reaches_every_norm_and_defaults_to_1e_6(make):
    norms = lambda m: [n for _, n in nnx.iter_graph(m) if isinstance(n, RMSNorm)]
    assert {n.eps for n in norms(make())} == {1e-6}
    model = make(norm_eps=1e-5)
    assert len(norms(model)) >= 3 and {n.eps for n in norms(model)} == {1e-5}


@pytest.mark.parametrize("name, fields", [("decoder_lm", SMALL), ("mamba_lm", MAMBA)])
@pytest.mark.parametrize("field, value, error, match", [
    ("norm_eps", 0.0, ValueError, r"config.model.norm_eps must be a real number in \(0, inf\), got 0.0"),
    ("tie_embeddings", "yes", TypeError, "config.model.tie_embeddings must be a bool, got 'yes'"),
])
def test_check_config_refuses_bad_norm_eps_and_tie_embeddings(name, fields, field, value, error, match):
    sections = {"decoder_lm": {"mlp_kind": "swiglu", "norm_kind": "rms", "remat": "none", "attention": {}, "moe": {}},
                "mamba_lm": {"scan_implementation": None}}
    section = ml_collections.ConfigDict({"name": name, **fields, **sections[name], field: value, "dtype": "float32",
                                         "param_dtype": "float32"})
    with pytest.raises(error, match=match):
        check_model_config(section)
