"""PEFT (jaxmodels/nn/peft.py and its hooks in the decoder LM): LoRA's reparametrisation against the factored form
x W + s (x A) B, merge/unmerge, and the hook methods (prefix, prompt, adapters) equal to the base model where the
papers say they are; cached decoding equal to the full forward; clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.models.lm import DecoderLM
from jaxmodels.nn.peft import (
    PeftSpec,
    lora_apply,
    lora_init,
    lora_targets,
    lora_unmerge,
    merge_params,
    peft_spec_from_config,
    split_params,
)

SIZES = dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48)


def _model(peft=None, **overrides):
    return DecoderLM(**{**SIZES, **overrides}, peft=peft, rngs=nnx.Rngs(0))


def _params(model):
    return nnx.state(model, nnx.Param).to_pure_dict()


@jax.jit(static_argnums=0)
def _forward(graphdef, params, tokens, segment_ids=None):
    return nnx.merge(graphdef, nnx.State(params))(tokens, segment_ids=segment_ids)


def _logits(model, tokens, params=None, segment_ids=None):
    """model(tokens), jitted (much faster than eagerly), with `params` if given."""
    with jax.default_matmul_precision("float32"):
        return np.asarray(_forward(nnx.graphdef(model), params or _params(model), tokens, segment_ids))


def _random_b(lora, key):
    """LoRA factors with B drawn too (B = 0 at init would hide every mistake of the update's layout)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(lora)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(tree, [jax.random.normal(k, x.shape) if p[-1].key == "lora_b" else x
                                               for (p, x), k in zip(leaves, keys)])


TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
BASE = _model()


def test_lora_with_b_zero_leaves_the_model_unchanged():
    model = BASE
    spec = PeftSpec(method="lora", targets="attn/w_|mlp/w_down", rank=4)
    targets = lora_targets(model, spec)
    assert [t.name for t in targets] == [f"blocks/{i}/{w}" for i in range(2) for w in
                                         ("attn/w_k", "attn/w_o", "attn/w_q", "attn/w_v", "mlp/w_down")]
    params = _params(model)
    merged = lora_apply(params, lora_init(jax.random.key(0), targets, 4), spec.scale)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name, spec", [("w_q", "bld,dnh->blnh"), ("w_o", "blnh,nhd->bld"), ("w_down", "blf,fd->bld")])
def test_the_merged_kernel_computes_x_w_plus_scaled_x_a_b(name, spec):
    """The kernel W + s·A·B reshaped is the paper's h = x W + s (x A) B, with A's rows the kernel's input dims
    (heads x head_dim for w_o) and B's columns its output dims (heads x head_dim for w_q)."""
    model = BASE
    path = f"attn/{name}" if name != "w_down" else "mlp/w_down"
    peft = PeftSpec(method="lora", targets=f"blocks/0/{path}$", rank=3, alpha=5.0)
    (target,) = lora_targets(model, peft)
    lora = _random_b(lora_init(jax.random.key(2), [target], 3), jax.random.key(3))
    w = _params(model)["blocks"][0][path.split("/")[0]][name]
    w_merged = lora_apply(_params(model), lora, peft.scale)["blocks"][0][path.split("/")[0]][name]
    factors = lora["blocks"][0][path.split("/")[0]][name]
    x = jax.random.normal(jax.random.key(4), (2, 5, *w.shape[:target.fan_in]))
    with jax.default_matmul_precision("float32"):
        merged = jnp.einsum(spec, x, w_merged)
        x_a = x.reshape(*x.shape[:2], -1) @ factors["lora_a"]
        factored = jnp.einsum(spec, x, w) + peft.scale * (x_a @ factors["lora_b"]).reshape(merged.shape)
    np.testing.assert_allclose(merged, factored, rtol=1e-5, atol=1e-5)


def test_lora_merge_then_unmerge_gives_the_base_back_and_the_merged_model_its_logits():
    model = BASE
    spec = PeftSpec(method="lora", targets="attn/w_(q|v)", rank=4)
    lora = _random_b(lora_init(jax.random.key(0), lora_targets(model, spec), 4), jax.random.key(1))
    params = _params(model)
    merged = lora_apply(params, lora, spec.scale)
    assert not np.allclose(_logits(model, TOKENS, merged), _logits(model, TOKENS), atol=1e-3)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(lora_unmerge(merged, lora, spec.scale))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_hook_modules_are_drawn_after_the_base_and_split_off_exactly():
    base, model = BASE, _model(PeftSpec(method="adapter", adapter_dim=4))
    added, kept = split_params(_params(model), _params(base))
    assert sorted(added["blocks"][0]) == ["attn_adapter", "mlp_adapter"]
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(_params(base))):
        np.testing.assert_array_equal(a, b)  # the same seed gives the base the same values
    for a, b in zip(jax.tree.leaves(merge_params(kept, added)), jax.tree.leaves(_params(model))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("peft", [PeftSpec(method="adapter", adapter_dim=4),
                                  PeftSpec(method="prefix", prefix_length=0),
                                  PeftSpec(method="prompt", prompt_length=0)], ids=["adapter", "prefix0", "prompt0"])
def test_adapters_at_init_and_empty_prefixes_and_prompts_equal_the_base_model(peft):
    np.testing.assert_allclose(_logits(_model(peft), TOKENS), _logits(BASE, TOKENS), rtol=0, atol=1e-6)


@jax.jit(static_argnums=0)
def _cached_logits(graphdef, params, tokens):
    """The logits of tokens[:, 4:] decoded one at a time after a prefill of tokens[:, :4], with the KV cache."""
    model = nnx.merge(graphdef, nnx.State(params))
    logits, cache = model(tokens[:, :4], cache=model.init_cache(tokens.shape[0], tokens.shape[1]), cache_index=0)
    out = [logits]
    for t in range(4, tokens.shape[1]):
        logits, cache = model(tokens[:, t:t + 1], cache=cache, cache_index=t)
        out.append(logits)
    return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("peft", [PeftSpec(method="prefix", prefix_length=3, prefix_hidden=8),
                                  PeftSpec(method="prompt", prompt_length=3)], ids=["prefix", "prompt"])
def test_prefixes_and_prompts_change_the_model_decode_cached_as_full_and_prefixes_materialise(peft):
    model = _model(peft)
    full = _logits(model, TOKENS[:, :7])
    assert not np.allclose(full, _logits(BASE, TOKENS[:, :7]), atol=1e-3)
    with jax.default_matmul_precision("float32"):
        cached = _cached_logits(nnx.graphdef(model), _params(model), TOKENS[:, :7])
    np.testing.assert_allclose(cached, full, rtol=0, atol=1e-5)
    if peft.method == "prefix":  # materialised, the prefixes are parameters and the MLP is gone
        model.prefix = model.prefix.materialized()
        assert sorted(_params(model)["prefix"]) == ["kv"]
        np.testing.assert_allclose(_logits(model, TOKENS[:, :7]), full, rtol=0, atol=1e-6)


def test_the_prefix_attends_from_every_packed_document():
    """Prefix keys are seen by every document of a packed row: document 2 alone gives its packed logits."""
    model = _model(PeftSpec(method="prefix", prefix_length=3, prefix_hidden=0))
    packed = _logits(model, TOKENS[:1], segment_ids=jnp.array([[1] * 5 + [2] * 7]))
    alone = _logits(model, TOKENS[:1, 5:])
    np.testing.assert_allclose(packed[:, 5:], alone, rtol=0, atol=1e-5)


def test_bad_input_is_named():
    model = BASE
    with pytest.raises(ValueError, match=r"peft.targets='attn/w_z' matches no parameter; the kernels are: "
                                         r"blocks/\*/attn/w_k, blocks/\*/attn/w_o, .*embed/embedding, .*w_out"):
        lora_targets(model, PeftSpec(method="lora", targets="attn/w_z"))
    with pytest.raises(ValueError, match=r"peft.rank=20 is larger .*blocks/0/attn/w_v \(32, 2, 8\) \(min\(in, out\) "
                                         r"= 16\)"):
        lora_targets(model, PeftSpec(method="lora", targets="attn/w_v", rank=20))
    with pytest.raises(ValueError, match=r"peft has unknown fields \['ranks'\]"):
        peft_spec_from_config({"ranks": 4})
    with pytest.raises(ValueError, match=r"peft.method='qlora' is not valid; choose one of \['none', 'lora'"):
        PeftSpec(method="qlora")
    with pytest.raises(ValueError, match=r"peft.targets='\(' is not a regular expression"):
        PeftSpec(targets="(")
    with pytest.raises(ValueError, match=r"attention kind 'linear' cannot take prefix tuning's keys"):
        _logits(_model(PeftSpec(method="prefix"), attention={"kind": "linear"}), TOKENS)
    with pytest.raises(ValueError, match=r"soft prompt .* packed documents"):
        _logits(_model(PeftSpec(method="prompt")), TOKENS, segment_ids=jnp.ones_like(TOKENS))
