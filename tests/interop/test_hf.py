"""Hugging Face checkpoints in and out (`jaxmodels.interop.hf`), against transformers itself: tiny random
Llama / Mistral / Mamba models in float32 give our logits within 1e-4 of transformers' and the same greedy
continuation; our models exported load in transformers with equal logits; import ∘ export is the identity."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from jaxmodels.interop.hf import hf_config, load_hf, save_hf
from jaxmodels.models import make_model
from tests.interop.common import (
    assert_trees_equal,
    hf_model,
    our_greedy,
    our_logits,
    params_of,
    their_greedy,
    their_logits,
)

ATOL = 1e-4
LLAMA = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None,
             pad_token_id=None)
MAMBA = dict(vocab_size=256, hidden_size=32, state_size=8, num_hidden_layers=2, conv_kernel=4, expand=2,
             layer_norm_epsilon=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None)
TOKENS = np.random.RandomState(0).randint(0, 256, (2, 16))


@pytest.mark.parametrize("arch, extra", [
    ("llama", dict(tie_word_embeddings=False)),
    ("llama", dict(tie_word_embeddings=True)),
    ("mistral", dict(sliding_window=5)),             # shorter than the 16-token inputs and the 24-token generations
    ("mamba", dict(tie_word_embeddings=True)),
    ("mamba", dict(tie_word_embeddings=False, use_conv_bias=False)),
], ids=["llama", "llama_tied", "mistral_window", "mamba_tied", "mamba_no_conv_bias"])
def test_imported_logits_and_greedy_generation_equal_transformers(arch, extra, tmp_path):
    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                             "mamba": (transformers.MambaConfig, transformers.MambaForCausalLM)}[arch]
    theirs = hf_model(model_cls, config_cls(**(MAMBA if arch == "mamba" else LLAMA), **extra), tmp_path)
    section, ours = load_hf(tmp_path)
    assert section.tie_embeddings == extra.get("tie_word_embeddings", False)
    if arch == "mistral":
        assert section.attention.window == 5
    np.testing.assert_allclose(our_logits(ours, TOKENS), their_logits(theirs, TOKENS), rtol=0, atol=ATOL)
    prompt = TOKENS[:, :4]
    np.testing.assert_array_equal(our_greedy(ours, prompt), their_greedy(theirs, prompt))


@pytest.mark.parametrize("rope_scaling", [{"rope_type": "linear", "factor": 2.0},
                                          {"rope_type": "dynamic", "factor": 2.0}], ids=["linear", "dynamic"])
def test_rope_scalings_equal_transformers(rope_scaling, tmp_path):
    # max_position_embeddings 8 < 16 tokens: dynamic NTK rescales
    config = transformers.LlamaConfig(**{**LLAMA, "rope_theta": 10000.0}, max_position_embeddings=8,
                                      rope_scaling=rope_scaling)
    theirs = hf_model(transformers.LlamaForCausalLM, config, tmp_path)
    section, ours = load_hf(tmp_path)
    assert section.attention.rope_scaling == {"linear": "linear", "dynamic": "dynamic_ntk"}[rope_scaling["rope_type"]]
    np.testing.assert_allclose(our_logits(ours, TOKENS), their_logits(theirs, TOKENS), rtol=0, atol=ATOL)


def test_sharded_checkpoint_loads_like_one_file(tmp_path):
    theirs = hf_model(transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA), tmp_path / "one")
    theirs.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert_trees_equal(params_of(load_hf(tmp_path / "one")[1]), params_of(load_hf(tmp_path / "sharded")[1]))


def test_bfloat16_checkpoint_reads_exactly(tmp_path):
    theirs = hf_model(transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA), tmp_path / "f32")
    theirs.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)  # as published
    section, ours = load_hf(tmp_path / "bf16", param_dtype="bfloat16")
    assert section.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params_of(ours))} == {np.dtype(jnp.bfloat16)}
    upcast = load_hf(tmp_path / "bf16")[1]   # float32 params: the bfloat16 values, exactly
    assert_trees_equal(params_of(upcast), jax.tree.map(lambda x: x.astype(np.float32), params_of(ours)))
    # (not `theirs.float()`: .to(bfloat16) also rounded its RoPE frequencies, which loading recomputes)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    np.testing.assert_allclose(our_logits(upcast, TOKENS), their_logits(theirs, TOKENS), rtol=0, atol=ATOL)


def _section(name, **overrides):
    if name == "mamba_lm":
        fields = dict(vocab_size=256, num_layers=2, embed_dim=32, d_state=8, d_conv=4, expand=2, dt_rank="auto",
                      chunk_size=None, scan_implementation=None, norm_eps=1e-5, tie_embeddings=False)
    else:
        fields = dict(vocab_size=256, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16,
                      mlp_dim=128, norm_eps=1e-5, tie_embeddings=False,
                      attention=dict(rope_base=500000.0, window=0, train_length=64))
    return ml_collections.ConfigDict({"name": name, **fields, "dtype": "float32", "param_dtype": "float32",
                                      **overrides})


@pytest.mark.parametrize("section, architecture", [
    (_section("decoder_lm"), "LlamaForCausalLM"),
    (_section("decoder_lm", tie_embeddings=True,
              attention=dict(window=6, rope_scaling="dynamic_ntk", rope_factor=2.0, train_length=8)),
     "MistralForCausalLM"),
    (_section("mamba_lm", tie_embeddings=True), "MambaForCausalLM"),
], ids=["llama", "mistral_tied_dynamic_rope", "mamba_tied"])
def test_exported_model_loads_in_transformers_with_equal_logits(section, architecture, tmp_path):
    ours = make_model(section, nnx.Rngs(0))
    save_hf(ours, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert type(theirs).__name__ == architecture
    np.testing.assert_allclose(their_logits(theirs, TOKENS), our_logits(ours, TOKENS), rtol=0, atol=ATOL)
    assert_trees_equal(params_of(load_hf(tmp_path)[1]), params_of(ours))   # export, then import: the same arrays


@pytest.mark.parametrize("arch", ["llama", "mamba"])
def test_import_then_export_writes_the_same_tensors(arch, tmp_path):
    if arch == "llama":
        hf_model(transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA), tmp_path / "hf")
    else:
        hf_model(transformers.MambaForCausalLM, transformers.MambaConfig(**MAMBA), tmp_path / "hf")
    save_hf(load_hf(tmp_path / "hf")[1], tmp_path / "out")
    original, exported = (load_file(tmp_path / d / "model.safetensors") for d in ("hf", "out"))
    assert sorted(original) == sorted(exported)
    for name in original:
        np.testing.assert_array_equal(original[name], exported[name], err_msg=name)


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **changes}))


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    hf_model(transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA), tmp_path)
    _edit_config(tmp_path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match=r"unsupported architecture \['GPT2LMHeadModel'\]; supported: "
                                         r"\['LlamaForCausalLM', 'MistralForCausalLM', 'MambaForCausalLM'\]"):
        load_hf(tmp_path)


def test_a_tensor_that_does_not_fit_the_config_is_named_with_both_shapes(tmp_path):
    hf_model(transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA), tmp_path)
    _edit_config(tmp_path, intermediate_size=96)
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.gate_proj.weight has shape \(128, 64\) in .*"
                                         r"config.json's sizes need \(96, 64\)"):
        load_hf(tmp_path)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    hf_model(transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA), tmp_path)
    _edit_config(tmp_path, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"missing \['model.layers.2.input_layernorm.weight', .*unexpected \[\]"):
        load_hf(tmp_path)


@pytest.mark.parametrize("changes, match", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                           "original_max_position_embeddings": 64}),
     r"rope_type='yarn' \(supported, as our RoPE reproduces them exactly: \['default', 'linear', 'dynamic'\]\)"),
    (dict(rope_parameters=None, rope_theta=10000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     r"rope_type='llama3'"),
    (dict(attention_bias=True, hidden_act="gelu"), r"hidden_act='gelu' \(supported: 'silu'\); attention_bias=True"),
], ids=["yarn", "llama3", "bias_and_gelu"])
def test_unsupported_llama_fields_are_refused(changes, match, tmp_path):
    hf_model(transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA), tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=r"cannot import this LlamaForCausalLM: .*" + match):
        load_hf(tmp_path)


def test_exporting_what_transformers_cannot_express_lists_every_offending_field(tmp_path):
    section = _section("decoder_lm", mlp_kind="gelu", norm_kind="layer",
                       attention=dict(kind="linear", qk_norm=True),
                       moe=dict(num_experts=2))
    model = nnx.eval_shape(lambda: make_model(section, nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"cannot export this DecoderLM as a Hugging Face Llama/Mistral: "
                                         r"model.mlp_kind='gelu' \(Hugging Face needs 'swiglu'\); "
                                         r"model.norm_kind='layer' .*; model.attention.kind='linear' .*; "
                                         r"model.attention.qk_norm=True .*; model.moe.num_experts=2"):
        save_hf(model, tmp_path)
    sinusoidal = nnx.eval_shape(lambda: make_model(_section("decoder_lm", attention=dict(position="sinusoidal")),
                                                   nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"model.attention.position='sinusoidal' \(Hugging Face needs 'rope'\)"):
        hf_config(sinusoidal)
    mup = nnx.eval_shape(lambda: make_model(_section("decoder_lm", parametrization="mup", mup_base_width=16),
                                            nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"model.parametrization='mup' \(Hugging Face needs 'standard'\)"):
        hf_config(mup)
    with pytest.raises(TypeError, match="save_hf exports a DecoderLM or a MambaLM, got Embed"):
        hf_config(nnx.eval_shape(lambda: nnx.Embed(4, 4, rngs=nnx.Rngs(0))))
    assert not any(tmp_path.iterdir())  # nothing written
