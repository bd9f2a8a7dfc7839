"""PEFT (jaxmodels/nn/peft.py and its hooks in the decoder LM): LoRA's reparametrisation against the factored form
x W + s (x A) B, merge/unmerge, and the hook methods (prefix, prompt, adapters) equal to the base model where the
papers say they are; cached decoding equal to the full forward; clear errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.models.lm import DecoderLM
from jaxmodels.nn.layers import dense
from jaxmodels.nn.peft import (
    LoraKernel,
    PeftSpec,
    lora_apply,
    lora_init,
    lora_projections,
    lora_targets,
    lora_unfold,
    lora_unmerge,
    merge_params,
    peft_spec_from_config,
    split_params,
)
from tests.jaxprs import equations

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


# ------------------------------------------------------------------------------------ LoRA unfolded (training)


def _kernel_and_factors(shape, fan_in, rank, seed):
    """Random W of `shape` and factors A (in, r), B (r, out) with B != 0, as float32 arrays."""
    k = jax.random.split(jax.random.key(seed), 3)
    n_in, n_out = int(np.prod(shape[:fan_in])), int(np.prod(shape[fan_in:]))
    return (jax.random.normal(k[0], shape), jax.random.normal(k[1], (n_in, rank)) / np.sqrt(n_in),
            jax.random.normal(k[2], (rank, n_out)))


@pytest.mark.parametrize("spec, shape, fan_in", [("bld,dnh->blnh", (24, 4, 6), 1), ("blnh,nhd->bld", (4, 6, 24), 2),
                                                 ("...i,ij->...j", (24, 40), 1)], ids=["w_q", "w_o", "mlp"])
def test_an_unfolded_projection_and_its_factor_gradients_equal_the_float64_reference_and_the_folded_kernel(
        spec, shape, fan_in):
    """dense(x, LoraKernel) = x W + s (x A) B, and dA = s xᵀ (dy Bᵀ), dB = s (x A)ᵀ dy, against NumPy in float64 and
    against the folded kernel W + s A B (`lora_apply`), on the three layouts of the LM's projections."""
    w, a, b = _kernel_and_factors(shape, fan_in, 3, seed=0)
    x = jax.random.normal(jax.random.key(1), (2, 5, *shape[:fan_in]))
    scale = 2.5
    out_shape = (2, 5, *shape[fan_in:])
    c = jax.random.normal(jax.random.key(2), out_shape)  # the loss sum(y * c) has dy = c

    def unfolded(a, b):
        return dense(x, LoraKernel(w, a, b, None, scale, fan_in), jnp.float32, spec)

    def folded(a, b):
        return dense(x, lora_apply({"w": w}, {"w": {"lora_a": a, "lora_b": b}}, scale)["w"], jnp.float32, spec)

    x2, c2 = (np.asarray(t, np.float64).reshape(10, -1) for t in (x, c))
    w2 = np.asarray(w, np.float64).reshape(a.shape[0], -1)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    y_ref = (x2 @ w2 + scale * (x2 @ a64) @ b64).reshape(out_shape)
    grads_ref = (scale * x2.T @ (c2 @ b64.T), scale * (x2 @ a64).T @ c2)
    with jax.default_matmul_precision("float32"):
        for f in (unfolded, folded):
            np.testing.assert_allclose(f(a, b), y_ref, rtol=1e-5, atol=1e-4)
            grads = jax.grad(lambda a, b, f=f: jnp.sum(f(a, b) * c), argnums=(0, 1))(a, b)
            for g, g_ref in zip(grads, grads_ref):
                np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-4)


SMALL = dict(vocab_size=64, num_layers=1, embed_dim=24, num_heads=4, num_kv_heads=2, head_dim=6, mlp_dim=40)


def _lm_lora(targets, rank=3, **overrides):
    """(graphdef, params, targets, lora with B drawn) of a small LM."""
    model = DecoderLM(**{**SMALL, **overrides}, rngs=nnx.Rngs(0))
    targets = lora_targets(model, PeftSpec(method="lora", targets=targets, rank=rank))
    return model, nnx.graphdef(model), _params(model), targets, _random_b(lora_init(jax.random.key(5), targets, rank),
                                                                          jax.random.key(6))


def _lm_loss(graphdef, params, tokens):
    logits = nnx.merge(graphdef, nnx.State(params))(tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])


@pytest.mark.parametrize("targets, overrides, unfolded", [
    ("attn/w_|mlp/w_|^w_out|embed", {}, ["attn/w_k", "attn/w_o", "attn/w_q", "attn/w_v", "mlp/w_down", "mlp/w_gate",
                                         "mlp/w_up", "w_out"]),
    ("attn/w_", dict(attention={"kind": "gau"}, remat="full", tie_embeddings=True),
     ["attn/w_o", "attn/w_u", "attn/w_v", "attn/w_z"]),
], ids=["attention_mlp_head_and_folded_embedding", "gau_remat_tied"])
def test_the_lm_unfolded_equals_folded_in_logits_and_factor_gradients(targets, overrides, unfolded):
    model, graphdef, params, targets, lora = _lm_lora(targets, **overrides)
    projections = lora_projections(model, targets)
    assert sorted({re.sub(r"^blocks/\d+/", "", t.name) for t in projections}) == unfolded
    scale = 1.5

    @jax.jit
    def loss_and_grads(lora):
        unfold = jax.value_and_grad(lambda l: _lm_loss(graphdef, lora_unfold(params, l, scale, projections), TOKENS))
        fold = jax.value_and_grad(lambda l: _lm_loss(graphdef, lora_apply(params, l, scale), TOKENS))
        return unfold(lora), fold(lora)

    with jax.default_matmul_precision("float32"):
        (loss_u, grads_u), (loss_f, grads_f) = loss_and_grads(lora)
    np.testing.assert_allclose(loss_u, loss_f, rtol=1e-6)
    for (path, g_u), g_f in zip(jax.tree_util.tree_flatten_with_path(grads_u)[0], jax.tree.leaves(grads_f)):
        assert np.abs(g_f).max() > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(g_u, g_f, rtol=1e-4, atol=1e-5 * np.abs(g_f).max(),
                                   err_msg=jax.tree_util.keystr(path))


def test_lora_dropout_draws_per_key_and_per_example_and_keeps_the_update_in_expectation():
    """With p > 0 two keys give two outputs, the rows of a batch get their own masks, about a fraction 1 - p of the
    inputs is kept, and the mean update over many keys is the undropped one within 5 standard errors (the update is
    linear in the mask: Var[update_j] = s² Σ_i (x_i (AB)_ij)² p / (1 - p) per key)."""
    p, scale, n = 0.3, 2.0, 4000
    w, a, b = _kernel_and_factors((24, 40), 1, 3, seed=3)
    x = jax.random.normal(jax.random.key(4), (1, 24))

    def update(key, x=x):
        return LoraKernel(w, a, b, key, scale, 1, p).update(x, jnp.float32, "...i,ij->...j")

    keys = jax.random.split(jax.random.key(5), n)
    with jax.default_matmul_precision("float32"):
        updates = np.asarray(jax.jit(jax.vmap(update))(keys))[:, 0]
        exact = np.asarray(LoraKernel(w, a, b, None, scale, 1).update(x, jnp.float32, "...i,ij->...j"))[0]
        rows = np.asarray(update(keys[0], jnp.repeat(x, 2, axis=0)))
    assert not np.allclose(updates[0], updates[1]) and not np.allclose(rows[0], rows[1])
    ab = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    std = scale * np.sqrt((np.asarray(x[0], np.float64)[:, None] ** 2 * ab**2).sum(0) * p / (1 - p))
    assert np.all(np.abs(updates.mean(0) - exact) < 5 * std / np.sqrt(n))
    eye = jnp.eye(24)  # A = B = I: the update is dropout(x) itself, 0 or x / (1 - p) per entry
    dropped = np.asarray(jax.vmap(lambda k: LoraKernel(jnp.zeros((24, 24)), eye, eye, k, 1.0, 1, p).update(
        x, jnp.float32, "...i,ij->...j"))(keys[:500]))[:, 0]
    zero = dropped == 0
    assert abs(zero.mean() - p) < 0.02
    np.testing.assert_allclose(dropped[~zero], np.broadcast_to(x[0] / (1 - p), dropped.shape)[~zero], rtol=1e-6)


def dot_output_shapes(jaxpr) -> list[tuple[int, ...]]:
    """The output shapes of every dot_general in `jaxpr` and the jaxprs nested in it (jit, remat, scan ...)."""
    return [tuple(eqn.outvars[0].aval.shape) for eqn in equations(jaxpr) if eqn.primitive.name == "dot_general"]


def test_the_unfolded_gradient_forms_no_weight_gradient_of_the_frozen_kernels():
    """In the jaxpr of the factors' gradient, no dot_general has the shape of an adapted kernel or of its (in, out)
    matrix (in any order of dims) when unfolded; folded, every adapted kernel's weight gradient dW' = xᵀ dy is
    there. The sizes make no activation's shape a kernel's."""
    model, graphdef, params, targets, lora = _lm_lora("attn/w_|mlp/w_|^w_out")
    kernels = {tuple(sorted(t.shape)) for t in targets}
    matrices = {tuple(sorted((t.in_features, t.out_features))) for t in targets}

    def dots(reparametrize):
        grad = jax.grad(lambda l: _lm_loss(graphdef, reparametrize(l), TOKENS))
        return {tuple(sorted(s)) for s in dot_output_shapes(jax.make_jaxpr(grad)(lora).jaxpr)}

    unfolded = dots(lambda l: lora_unfold(params, l, 2.0, lora_projections(model, targets)))
    folded = dots(lambda l: lora_apply(params, l, 2.0))
    assert kernels <= folded
    assert not unfolded & (kernels | matrices), unfolded & (kernels | matrices)
    assert {(3, 24), (3, 40), (3, 64)} <= unfolded  # the factors' gradients, e.g. dB (r, out) of mlp/w_up and w_out


def test_bad_lora_dropout_and_unfolded_are_named():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"peft.dropout must be a real number in \[0, 1\), got {bad}"):
            PeftSpec(method="lora", dropout=bad)
    with pytest.raises(TypeError, match=r"peft.dropout must be a real number"):
        peft_spec_from_config({"method": "lora", "dropout": "0.1"})
    with pytest.raises(ValueError, match=r"peft.dropout=0.1 needs peft.unfolded=True"):
        PeftSpec(method="lora", dropout=0.1, unfolded=False)
    with pytest.raises(TypeError, match=r"peft.unfolded must be a bool"):
        PeftSpec(method="lora", unfolded=1)
    model, _, params, targets, lora = _lm_lora("attn/w_q|embed")
    with pytest.raises(ValueError, match=r"peft.dropout=0.1 needs LoRA unfolded, but embed/embedding is folded"):
        lora_unfold(params, lora, 1.0, lora_projections(model, targets), dropout=0.1, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"einsum spec 'bld,vd->blv' is not one"):  # the tied head's use of a table
        dense(jnp.ones((1, 2, 24)), LoraKernel(jnp.ones((64, 24)), jnp.ones((64, 2)), jnp.ones((2, 24)), None, 1.0, 1),
              jnp.float32, "bld,vd->blv")
