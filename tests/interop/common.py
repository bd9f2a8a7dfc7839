"""What the interop tests share: tiny random transformers models saved as safetensors, logits and greedy
continuations on both sides (ours in float32 matmul precision, so that GPUs' TF32 does not blur the comparison),
and exact comparison of parameter trees."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from jaxmodels.models.lm import generate


def hf_model(cls, config, directory, seed=0):
    """A transformers model of `config` with weights large enough that attention and the SSM are far from
    uniform (its own init is std 0.02), saved as safetensors in `directory`."""
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight") or name.endswith("norm_f.weight"):
                p.uniform_(0.5, 1.5)
            elif not name.endswith("A_log"):
                p.normal_(0.0, 0.2)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def our_logits(model, tokens):
    with jax.default_matmul_precision("float32"):
        return np.asarray(model(jnp.asarray(tokens)))


def their_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def our_greedy(model, prompt, n=20):
    with jax.default_matmul_precision("float32"):
        return np.asarray(generate(model, jnp.asarray(prompt), jax.random.key(0), max_new_tokens=n, temperature=0))


def their_greedy(model, prompt, n=20):
    prompt = torch.tensor(prompt)
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=n).numpy()


def params_of(model):
    return jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
