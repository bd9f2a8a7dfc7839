"""MoEFeedForward: float64 forward reference, dropless == einsum, dtype policy, parameter count, sharding
axes, noise keys, router gradients, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxmodels.nn.moe import MoEFeedForward
from jaxmodels.parallel.sharding import DEFAULT_RULES, param_specs
from tests.fitting import adam_losses
from tests.ops.test_moe import _np_moe, _np_priority_positions, _np_swiglu


def _randomise(model, seed):
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            var.value = jnp.asarray(rng.normal(size=var.value.shape) * 0.5, var.value.dtype)


def _apply(model, x, key=None):
    """(y, aux) of model(x, key=key), jitted."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, x, key: nnx.merge(graphdef, state)(x, key=key))(state, x, key)


def _num_params(model):
    return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _np_layer(model, x):
    """float64 forward of a top_k / einsum MoEFeedForward from the equations, one token at a time."""
    p = {name: np.asarray(getattr(model, name).value, np.float64) for name in ("router", "w_gate", "w_up", "w_down")}
    t = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    logits = t @ p["router"]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    experts = np.argsort(-probs, axis=1)[:, :model.k]
    gates = np.take_along_axis(probs, experts, 1)
    if model.normalize:
        gates /= gates.sum(1, keepdims=True)
    T, E = probs.shape
    C = int(np.ceil(model.k * T * model.capacity_factor / E))
    kept = _np_priority_positions(gates, experts, E, model.priority) < C
    y = _np_moe(t, gates, experts, kept, [p["w_gate"], p["w_up"], p["w_down"]])
    if model.shared is not None:
        shared = (np.asarray(getattr(model.shared, n).value, np.float64) for n in ("w_gate", "w_up", "w_down"))
        y += _np_swiglu(t, *shared)
    f = np.bincount(experts.ravel(), minlength=E) / experts.size
    aux = {"load_balancing_loss": E * np.sum(f * probs.mean(0)), "dropped_fraction": 1 - kept.mean(),
           "router_z_loss": np.mean(np.log(np.exp(logits).sum(1)) ** 2), "expert_load": f,
           "routing_entropy": np.mean(-(probs * np.log(probs)).sum(1))}
    return y.reshape(x.shape), aux


@pytest.mark.parametrize("kw", [dict(k=2, priority="slot", num_shared=1), dict(k=1, priority="gate")])
def test_matches_numpy_layer(kw):
    model = MoEFeedForward(6, 8, 4, capacity_factor=0.8, rngs=nnx.Rngs(0), **kw)
    assert model.normalize == (kw["k"] > 1)  # default: GShard's renormalised top-2, Switch's raw top-1 gate
    _randomise(model, seed=1)
    x = np.random.default_rng(2).normal(size=(2, 5, 6)).astype(np.float32)
    y, aux = _apply(model, x)
    y_ref, aux_ref = _np_layer(model, x)
    assert aux_ref["dropped_fraction"] > 0  # E C < T k: some assignment must drop
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    for name, value in aux_ref.items():
        assert aux[name].dtype == jnp.float32
        np.testing.assert_allclose(aux[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


CASES = [dict(), dict(dispatch="dropless"), dict(routing="noisy_top_k"), dict(routing="expert_choice", num_shared=2)]


@pytest.mark.parametrize("kw", CASES)
def test_shapes_bfloat16_compute_and_parameter_count(kw):
    d, f, E = 8, 12, 4
    x = jax.random.normal(jax.random.key(0), (2, 6, d))
    model = MoEFeedForward(d, f, E, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), **kw)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    y, aux = _apply(model, x, jax.random.key(1))
    assert y.shape == x.shape and y.dtype == jnp.bfloat16
    assert set(aux) == {"load_balancing_loss", "router_z_loss", "dropped_fraction", "routing_entropy", "expert_load"}
    assert all(v.dtype == jnp.float32 for v in aux.values()) and aux["expert_load"].shape == (E,)
    assert float(jnp.sum(aux["expert_load"])) == pytest.approx(1.0)
    if kw in (CASES[0], CASES[3]):
        y32, _ = _apply(MoEFeedForward(d, f, E, rngs=nnx.Rngs(0), **kw), x, jax.random.key(1))
        np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=0.1, atol=0.05)
    shared = kw.get("num_shared", 0)
    expected = 3 * E * d * f + d * E * (2 if kw.get("routing") == "noisy_top_k" else 1) + 3 * d * shared * f
    assert _num_params(model) == expected
    assert MoEFeedForward(d, f, E, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)).w_up.value.dtype == jnp.bfloat16


@pytest.mark.devices(8)
def test_logical_axes_shard_experts_over_the_expert_axis():
    model = nnx.eval_shape(lambda: MoEFeedForward(16, 32, 8, routing="noisy_top_k", num_shared=1, rngs=nnx.Rngs(0)))
    rules = tuple(DEFAULT_RULES) + (("expert", "expert"),)
    mesh = jax.make_mesh((1, 1, 4, 2), ("data", "fsdp", "expert", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    specs = param_specs(model, mesh, rules)  # the expert axis and rule are not in parallel/ yet
    assert specs["w_gate"] == specs["w_up"] == P("expert", None, "tensor")
    assert specs["w_down"] == P("expert", "tensor", None)
    assert specs["router"] == specs["noise"] == P(None, "expert")
    assert specs["shared"]["w_up"] == P(None, "tensor")


def test_dropless_equals_einsum_when_nothing_drops_values_and_gradients():
    d, f, E, k = 6, 8, 4, 2
    x = jax.random.normal(jax.random.key(0), (2, 5, d))
    models = {name: MoEFeedForward(d, f, E, k=k, dispatch=name, capacity_factor=E / k, num_shared=1,
                                   rngs=nnx.Rngs(0)) for name in ("einsum", "dropless")}
    results = {}
    for name, model in models.items():
        _randomise(model, seed=3)
        graphdef, params = nnx.split(model)

        def loss(params, x):
            y, aux = nnx.merge(graphdef, params)(x)
            return jnp.sum(jnp.sin(y)) + aux["load_balancing_loss"] + aux["router_z_loss"], (y, aux)

        results[name] = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    (g_e, (y_e, aux_e)), (g_d, (y_d, aux_d)) = results["einsum"], results["dropless"]
    assert float(aux_e["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(y_e, y_d, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_e), jax.tree.leaves(g_d)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for name in ("load_balancing_loss", "router_z_loss", "routing_entropy", "expert_load"):
        np.testing.assert_allclose(aux_e[name], aux_d[name], rtol=1e-6)


@pytest.mark.parametrize("kw", CASES)
def test_gradients_reach_the_router(kw):
    model = MoEFeedForward(6, 8, 4, rngs=nnx.Rngs(0), **kw)
    _randomise(model, seed=4)
    graphdef, params = nnx.split(model)
    x = jax.random.normal(jax.random.key(0), (2, 5, 6))

    names = ["router_z_loss"] + (["load_balancing_loss"] if kw.get("routing") != "expert_choice" else [])

    @jax.jit
    def grads(params):  # of the output and of each auxiliary loss (expert choice has no balancing loss)
        def loss(params, name):
            y, aux = nnx.merge(graphdef, params)(x, key=jax.random.key(1))
            return jnp.sum(jnp.square(y)) if name == "y" else aux[name]
        return {name: jax.grad(loss)(params, name) for name in ["y"] + names}

    for name, g in grads(params).items():
        assert float(jnp.abs(g["router"].value).max()) > 0, name
    if kw.get("routing") == "noisy_top_k":
        assert float(jnp.abs(grads(params)["y"]["noise"].value).max()) > 0


def test_noisy_routing_is_key_driven():
    model = MoEFeedForward(6, 8, 6, routing="noisy_top_k", rngs=nnx.Rngs(0))
    _randomise(model, seed=5)
    clean = MoEFeedForward(6, 8, 6, routing="top_k", normalize=True, rngs=nnx.Rngs(0))
    for name in ("router", "w_gate", "w_up", "w_down"):
        getattr(clean, name).value = getattr(model, name).value
    x = jax.random.normal(jax.random.key(0), (2, 8, 6))
    (g_noisy, s_noisy), (g_clean, s_clean) = nnx.split(model), nnx.split(clean)

    @jax.jit
    def outputs(s_noisy, s_clean, key_a, key_b, key_c):
        noisy = nnx.merge(g_noisy, s_noisy)
        return [noisy(x, key=key)[0] for key in (key_a, key_b, key_c, None)] + [nnx.merge(g_clean, s_clean)(x)[0]]

    a, a_again, b, no_key, top_k = outputs(s_noisy, s_clean, jax.random.key(1), jax.random.key(1), jax.random.key(2))
    np.testing.assert_array_equal(a, a_again)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(no_key, top_k)  # key=None: no noise


@pytest.mark.parametrize("dispatch", ["einsum", "dropless"])
def test_training_reduces_loss(dispatch):
    """Toy regression y = piecewise-linear map of x, with the Switch and ST-MoE auxiliary losses."""
    d = 8
    model = MoEFeedForward(d, 16, 4, k=2, dispatch=dispatch, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 16, d))
    w1, w2 = jax.random.normal(jax.random.key(2), (2, d, d)) / np.sqrt(d)
    target = jnp.where(x[..., :1] > 0, x @ w1, jnp.tanh(x @ w2))

    def loss_fn(m):
        y, aux = m(x)
        return jnp.mean(jnp.square(y - target)) + 1e-2 * aux["load_balancing_loss"] + 1e-3 * aux["router_z_loss"]

    losses = adam_losses(model, loss_fn, 25)
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("kw, match", [
    (dict(routing="hash"), "routing='hash' is not valid; choose one of"),
    (dict(dispatch="scatter"), "dispatch='scatter' is not valid; choose one of"),
    (dict(routing="expert_choice", dispatch="dropless"), "routing 'expert_choice' needs dispatch 'einsum'"),
    (dict(k=5), r"k must be an int in \[1, num_experts=4\], got 5"),
    (dict(capacity_factor=0.0), "capacity_factor must be > 0"),
    (dict(priority="random"), "priority='random' is not valid; choose one of"),
    (dict(implementation="triton"), "implementation='triton' is not valid"),
    (dict(routing="expert_choice", capacity_factor=5.0), "expert_choice needs capacity_factor <= num_experts = 4"),
])
def test_constructor_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEFeedForward(8, 16, 4, rngs=nnx.Rngs(0), **kw)


def test_call_errors():
    model = MoEFeedForward(8, 16, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must be \(batch, length, embed_dim=8\), got \(2, 3, 6\)"):
        model(jnp.zeros((2, 3, 6)))
    with pytest.raises(ValueError, match=r"x must be \(batch, length, embed_dim=8\), got \(3, 8\)"):
        model(jnp.zeros((3, 8)))
