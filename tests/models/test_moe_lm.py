"""DecoderLM with mixture-of-experts blocks: placement, aux losses in the objective, generation, FLOPs,
expert sharding, config errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmodels.models.lm import DecoderLM, generate, train_flops_per_token
from jaxmodels.nn.layers import MLP
from jaxmodels.nn.moe import MoEFeedForward
from jaxmodels.nn.transformer import MoESpec
from jaxmodels.ops.losses import softmax_cross_entropy
from jaxmodels.parallel.mesh import make_mesh
from jaxmodels.parallel.sharding import DEFAULT_RULES, batch_spec, named, param_specs
from jaxmodels.tasks.lm import next_token_loss
from jaxmodels.train.config import validate_config
from tests.tiny import tiny_config

SMALL = dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48)
MOE = dict(num_experts=4, every=1, k=2, capacity_factor=1.25)


def _model(moe=None, **kw):
    return DecoderLM(**{**SMALL, **kw}, moe=moe, rngs=nnx.Rngs(0))


def _num_params(model):
    return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _tokens(seed, shape=(2, 13)):
    return jax.random.randint(jax.random.key(seed), shape, 0, 64)


loss_fn = nnx.jit(next_token_loss)
forward_aux = nnx.jit(lambda model, tokens: model(tokens, return_aux=True))
cross_entropy = nnx.jit(lambda model, tokens: jnp.mean(softmax_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])))


def test_moe_blocks_placement_shapes_and_parameter_count():
    spec = MoESpec(num_experts=4, every=2, k=1, num_shared=1)
    abstract = nnx.eval_shape(lambda: _model(spec, num_layers=4))
    assert [type(b.mlp) for b in abstract.blocks] == [MLP, MoEFeedForward, MLP, MoEFeedForward]
    d, h, kv, hd, f, v, E = 32, 4, 2, 8, 48, 64, 4
    attn, dense_mlp, norms = d * hd * (2 * h + 2 * kv), 3 * d * f, 2 * d
    moe_mlp = d * E + E * 3 * d * f + 3 * d * f  # router, experts, one shared expert of width f
    expected = v * d + 4 * (attn + norms) + 2 * dense_mlp + 2 * moe_mlp + d + d * v
    assert _num_params(abstract) == expected
    logits, aux = forward_aux(_model(spec), _tokens(0, (2, 7)))
    assert logits.shape == (2, 7, 64) and logits.dtype == jnp.float32
    assert aux["expert_load"].shape == (1, 4)
    np.testing.assert_allclose(aux["expert_load"].sum(-1), 1.0, rtol=1e-6)
    for name in ("load_balancing_loss", "router_z_loss", "dropped_fraction", "routing_entropy", "max_expert_load",
                 "moe_loss"):
        assert aux[name].shape == () and aux[name].dtype == jnp.float32, name


def test_dense_config_is_unchanged():
    tokens = _tokens(1)
    dense = _model()
    off = _model(MoESpec(num_experts=0, every=2, k=3))  # every other field is ignored when num_experts=0
    for a, b in zip(jax.tree.leaves(nnx.state(dense, nnx.Param)), jax.tree.leaves(nnx.state(off, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    loss, metrics = loss_fn(off, tokens)
    np.testing.assert_array_equal(loss, cross_entropy(dense, tokens))
    assert set(metrics) == {"loss", "bits_per_byte", "perplexity", "num_tokens", "num_bytes"}
    assert forward_aux(off, tokens)[1] == {}
    flops = dict(mlp_kind="swiglu", seq_len=16)
    assert train_flops_per_token(**SMALL, **flops, moe=MoESpec()) == train_flops_per_token(**SMALL, **flops)


def test_aux_losses_reach_the_loss_and_the_router_gets_gradients():
    tokens = _tokens(2)
    model = _model(MoESpec(**MOE, load_balancing_weight=0.5, router_z_weight=0.25))
    # Each compiled whole (one compilation, not one per operation).
    loss, metrics = nnx.jit(loss_fn)(model, tokens)
    _, aux = nnx.jit(forward_aux)(model, tokens[:, :-1])
    ce = nnx.jit(cross_entropy)(model, tokens)
    np.testing.assert_allclose(metrics["cross_entropy"], ce, rtol=1e-6)
    np.testing.assert_allclose(metrics["bits_per_byte"], ce / math.log(2), rtol=1e-6)
    np.testing.assert_allclose(loss, ce + 0.5 * aux["load_balancing_loss"] + 0.25 * aux["router_z_loss"], rtol=1e-6)
    assert metrics["load_balancing_loss"] >= 1.0 - 1e-5  # Switch's loss is minimal (1) at uniform routing
    assert 0 < metrics["routing_entropy"] <= math.log(4) + 1e-5 and 1 <= metrics["max_expert_load"] <= 4

    @nnx.jit
    def router_grads(model):
        def part(name):
            grads = nnx.grad(lambda m: next_token_loss(m, tokens)[1][name])(model)
            return [grads["blocks"][i]["mlp"]["router"].value for i in range(2)]
        return part("cross_entropy"), part("moe_loss")

    for task, aux_grad in zip(*router_grads(model)):
        assert jnp.all(jnp.isfinite(task)) and jnp.all(jnp.isfinite(aux_grad))
        assert jnp.linalg.norm(task) > 0  # the task loss reaches the router through the gates
        assert jnp.linalg.norm(aux_grad) > 0  # and so do the load-balancing and z losses


def test_a_few_steps_reduce_the_loss_with_remat_unchanged():
    tokens = _tokens(3, (4, 17))
    model = _model(MoESpec(**MOE), remat="full")
    np.testing.assert_allclose(loss_fn(model, tokens)[0], loss_fn(_model(MoESpec(**MOE)), tokens)[0], rtol=1e-6)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: next_token_loss(m, tokens)[0])(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(6)]
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("moe", [dict(dispatch="dropless"), dict(dispatch="einsum", capacity_factor=2.0)],
                         ids=["dropless", "einsum_no_drops"])
def test_generate_with_kv_cache_equals_without(moe):
    # capacity_factor = E / k: every expert has a slot for every token, so no call drops anything and
    # the cached (one token per step) and the full forward route the same tokens the same way.
    model = _model(MoESpec(**{**MOE, **moe}))
    prompt = _tokens(4, (3, 4))
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=None)
    cached = generate(model, prompt, jax.random.key(5), use_cache=True, **kw)
    uncached = generate(model, prompt, jax.random.key(5), use_cache=False, **kw)
    np.testing.assert_array_equal(cached, uncached)
    tokens = _tokens(6, (2, 9))
    prefill = nnx.jit(lambda m, t: m(t, cache=m.init_cache(2, 9), cache_index=jnp.int32(0), return_aux=True))
    logits, _, aux = prefill(model, tokens)
    np.testing.assert_allclose(logits, forward_aux(model, tokens)[0], atol=1e-5)
    assert aux["expert_load"].shape == (2, 4)


def test_flop_count_uses_active_parameters():
    spec = MoESpec(num_experts=8, every=2, k=2, num_shared=1)
    model = _model(spec, num_layers=4)
    d, f, E, v = 32, 48, 8, 64
    embedding = v * d
    norms = sum(p.size for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param)) if "scale" in path)
    inactive = 2 * (E - spec.k) * 3 * d * f  # two MoE blocks, E - k idle experts of 3 d f weights each
    active_matmul = _num_params(model) - embedding - norms - inactive
    attn_fwd = 4 * 2 * 2 * 4 * 8 * 16 * 0.5
    flops = train_flops_per_token(**{**SMALL, "num_layers": 4}, mlp_kind="swiglu", seq_len=16, moe=spec)
    assert flops == 6 * active_matmul + 3 * attn_fwd
    more_experts = train_flops_per_token(**{**SMALL, "num_layers": 4}, mlp_kind="swiglu", seq_len=16,
                                         moe=MoESpec(num_experts=64, every=2, k=2, num_shared=1))
    assert more_experts - flops == 6 * 2 * d * (64 - 8)  # only the router grows with E


@pytest.mark.devices(8)
def test_expert_sharded_loss_equals_single_device():
    # 8 fake CPU devices, mesh data=2 x expert=4: experts split over `expert`, the batch over data x expert;
    # XLA partitions the layer (GSPMD), the capacity stays the global one, so the loss is the same.
    model = _model(MoESpec(**MOE))
    mesh = make_mesh({"data": 2, "expert": 4})
    specs = param_specs(model, mesh, DEFAULT_RULES)
    assert specs["blocks"][0]["mlp"]["w_gate"] == P("expert", None, None)
    assert specs["blocks"][0]["mlp"]["router"] == P(None, "expert")
    graphdef, state = nnx.split(model)
    params = jax.device_put(state.to_pure_dict(), named(mesh, specs))
    tokens = _tokens(7, (8, 13))
    sharded_tokens = jax.device_put(tokens, NamedSharding(mesh, batch_spec(DEFAULT_RULES, 2)))
    loss = jax.jit(lambda p, t: next_token_loss(nnx.merge(graphdef, nnx.State(p)), t))
    (sharded, sharded_metrics), (single, single_metrics) = loss(params, sharded_tokens), loss_fn(model, tokens)
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    np.testing.assert_allclose(sharded_metrics["dropped_fraction"], single_metrics["dropped_fraction"], rtol=1e-6)


@pytest.mark.parametrize("moe,match", [
    (dict(num_experts=2, k=3), r"moe.k=3 must be an int in \[1, moe.num_experts=2\]"),
    (dict(num_experts=-1), "moe.num_experts must be an int >= 0"),
    (dict(num_experts=4, every=0), "moe.every must be an int >= 1"),
    (dict(num_experts=4, routing="expert_choice"), r"moe.routing='expert_choice' is not valid"),
    (dict(num_experts=4, dispatch="sparse"), r"moe.dispatch='sparse' is not valid"),
    (dict(num_experts=4, capacity_factor=0.0), "moe.capacity_factor must be > 0"),
    (dict(num_experts=4, router_z_weight=-1.0), "moe.router_z_weight must be >= 0"),
    (dict(experts=4), r"moe has unknown fields \['experts'\]"),
])
def test_config_errors_name_the_field(moe, match):
    with pytest.raises(ValueError, match=match):
        _model(moe)
    config = tiny_config()
    if "experts" in moe:
        config.model.moe = {**config.model.moe, **moe}
    else:
        config.model.moe.update(moe)
    with pytest.raises(ValueError, match="config.model." + match):
        validate_config(config, num_devices=1)


def test_config_errors_mesh_and_gau():
    validate_config(tiny_config(model__moe__num_experts=4, mesh__data=1, mesh__expert=-1), num_devices=2)
    with pytest.raises(ValueError, match="data x fsdp x expert"):
        validate_config(tiny_config(mesh__data=1, mesh__expert=-1, data__global_batch_size=6), num_devices=4)
    with pytest.raises(ValueError, match="'zero'.*expert parallelism.*config.mesh.expert=2"):
        validate_config(tiny_config(mesh__data=-1, mesh__expert=2, parallel__strategy="zero"), num_devices=4)
    with pytest.raises(ValueError, match="config.model.moe.num_experts=4 needs blocks with an MLP"):
        validate_config(tiny_config(model__moe__num_experts=4, model__attention__kind="gau"), num_devices=1)
