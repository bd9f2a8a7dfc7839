"""LoRA adapters out in Hugging Face peft's layout: `peft.PeftModel.from_pretrained` on the transformers model that
`save_hf` exports computes our logits, merged (`lora_apply`) and unfolded as in training (`lora_unfold`)."""

import json

import jax
import numpy as np
import pytest
import transformers
from flax import nnx

from jaxmodels.interop.hf import save_hf, save_hf_lora
from jaxmodels.models.lm import DecoderLM
from jaxmodels.nn.peft import PeftSpec, lora_apply, lora_init, lora_projections, lora_targets, lora_unfold
from tests.interop.common import our_logits, their_logits

peft = pytest.importorskip("peft")  # the test extra installs it

SIZES = dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48,
             attention=dict(rope_base=10000.0))


@pytest.mark.parametrize("targets, modules", [
    ("attn/w_(q|v)", ["q_proj", "v_proj"]),
    ("blocks/1/(attn/w_o|mlp/w_down)|w_out", ["lm_head", "model.layers.1.mlp.down_proj",
                                               "model.layers.1.self_attn.o_proj"]),
])
def test_peft_loads_our_lora_adapter_and_computes_our_logits(tmp_path, targets, modules):
    model = DecoderLM(**SIZES, rngs=nnx.Rngs(0))
    spec = PeftSpec(method="lora", targets=targets, rank=4, alpha=8.0, dropout=0.1)
    lora = lora_init(jax.random.key(1), lora_targets(model, spec), spec.rank)
    lora = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), lora)  # B != 0
    save_hf(model, tmp_path / "base")
    save_hf_lora(nnx.eval_shape(lambda: DecoderLM(**SIZES, rngs=nnx.Rngs(0))), lora, spec, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["target_modules"]) == (4, 8.0, 0.1,
                                                                                                    modules)

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").float().eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    graphdef, params = nnx.graphdef(model), nnx.state(model, nnx.Param).to_pure_dict()
    unfolded = lora_projections(model, lora_targets(model, spec))  # every target here: peft's are Linear layers
    tokens = np.random.RandomState(0).randint(0, 64, (2, 10))
    expected = their_logits(theirs, tokens)  # eval mode: no dropout, nor in ours outside training
    for ours in (lora_apply(params, lora, spec.scale), lora_unfold(params, lora, spec.scale, unfolded)):
        np.testing.assert_allclose(our_logits(nnx.merge(graphdef, nnx.State(ours)), tokens), expected, rtol=0,
                                   atol=1e-5)


def test_an_embedding_adapter_has_no_peft_layout(tmp_path):
    model = DecoderLM(**SIZES, rngs=nnx.Rngs(0))
    spec = PeftSpec(method="lora", targets="embed", rank=2)
    with pytest.raises(ValueError, match=r"LoRA factors of \['embed/embedding'\] have no Hugging Face peft layout"):
        save_hf_lora(model, lora_init(jax.random.key(0), lora_targets(model, spec), 2), spec, tmp_path)
