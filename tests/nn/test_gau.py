import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxmodels.nn.gau import GAU
from jaxmodels.parallel.mesh import make_mesh
from jaxmodels.parallel.sharding import DEFAULT_RULES, param_specs
from tests.fitting import adam_losses
from tests.ops.test_gau import _np_gau, _np_mixed_chunk


def _np_silu(x):
    return x / (1 + np.exp(-x))


def _randomise(model, seed):
    """Random values for every parameter (γ = 1, β = 0 and a zero bias would hide wiring mistakes)."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            var.value = jnp.asarray(rng.normal(size=var.value.shape) * 0.5, var.value.dtype)


def _np_gau_module(model, x):
    """float64 forward of a GAU with position="relative_bias" from the paper's equations."""
    p = {name: np.asarray(getattr(model, name).value, np.float64)
         for name in ("w_u", "w_v", "w_z", "w_o", "gamma", "beta", "relative_bias")}
    x = np.asarray(x, np.float64)
    u, v, z = (_np_silu(x @ p[w]) for w in ("w_u", "w_v", "w_z"))
    qk = [z * p["gamma"][i] + p["beta"][i] for i in range(len(p["gamma"]))]
    r = model.max_relative_distance
    n = x.shape[1] if model.chunk_size is None else model.chunk_size
    bias = np.array([[p["relative_bias"][np.clip(j - i, -r, r) + r] for j in range(n)] for i in range(n)])
    if model.chunk_size is None:
        o = _np_gau(*qk, v, scores=model.scores, causal=model.causal, bias=bias)
    else:
        o = _np_mixed_chunk(*qk, v, chunk_size=model.chunk_size, causal=model.causal, bias=bias)
    return (u * o) @ p["w_o"]


@pytest.mark.parametrize("kw", [dict(causal=True), dict(causal=False, scores="softmax"),
                                dict(causal=True, chunk_size=3), dict(causal=False, chunk_size=4)])
def test_matches_numpy_forward(kw):
    model = GAU(8, 12, 6, position="relative_bias", max_relative_distance=2, rngs=nnx.Rngs(0), **kw)
    _randomise(model, seed=1)
    x = np.random.default_rng(2).normal(size=(2, 7, 8)).astype(np.float32)
    y = _forward(model, x)
    assert y.shape == (2, 7, 8) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, _np_gau_module(model, x), rtol=1e-4, atol=1e-4)


def _forward(model, x):
    """model(x, arange(T)), jitted (one compilation beats many eager ops)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, jnp.arange(x.shape[1])))(state, x)


def _num_params(model):
    return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("position", ["rope", "relative_bias", None])
def test_parameter_count_and_defaults(position, chunk_size):
    d, s, r = 16, 8, 5
    model = nnx.eval_shape(lambda: GAU(d, shared_dim=s, causal=True, chunk_size=chunk_size, position=position,
                                       max_relative_distance=r, rngs=nnx.Rngs(0)))
    e = 2 * d  # default expansion
    h = 2 if chunk_size is None else 4  # (q, k) or (q_quad, k_quad, q_lin, k_lin) scale/offset pairs
    expected = 3 * d * e + d * s + 2 * h * s + (2 * r + 1 if position == "relative_bias" else 0)
    assert _num_params(model) == expected
    assert nnx.eval_shape(lambda: GAU(d, causal=False, rngs=nnx.Rngs(0))).w_z.value.shape == (d, 128)  # s = 128


@pytest.mark.devices(8)
def test_logical_axes_shard_like_the_library():
    model = nnx.eval_shape(lambda: GAU(16, 32, 8, causal=True, chunk_size=4, rngs=nnx.Rngs(0)))
    specs = param_specs(model, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), DEFAULT_RULES)
    assert specs["w_u"] == specs["w_v"] == P("fsdp", "tensor")
    assert specs["w_o"] == P("tensor", "fsdp")
    assert specs["w_z"] == P("fsdp", None)
    assert specs["gamma"] == specs["beta"] == P(None, None)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_bfloat16_compute_float32_params(chunk_size):
    x = jax.random.normal(jax.random.key(0), (2, 10, 16))
    model16 = GAU(16, shared_dim=8, causal=True, chunk_size=chunk_size, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    model32 = GAU(16, shared_dim=8, causal=True, chunk_size=chunk_size, rngs=nnx.Rngs(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    y16, y32 = _forward(model16, x), _forward(model32, x)
    assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=0.1, atol=0.05)
    bf16_params = GAU(16, shared_dim=8, causal=True, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert bf16_params.w_u.value.dtype == jnp.bfloat16


@pytest.mark.parametrize("kw", [dict(), dict(chunk_size=4), dict(chunk_size=4, position="relative_bias"),
                                dict(scores="softmax")])
def test_causal_module_does_not_leak(kw):
    model = GAU(16, shared_dim=8, causal=True, rngs=nnx.Rngs(0), **kw)
    _randomise(model, seed=3)
    T, t = 11, 5
    x = np.random.default_rng(4).normal(size=(2, T, 16)).astype(np.float32)
    x2 = x.copy()
    x2[:, t + 1:] = np.random.default_rng(5).normal(size=x2[:, t + 1:].shape) * 5
    y, y2 = _forward(model, x), _forward(model, x2)
    np.testing.assert_allclose(y2[:, :t + 1], y[:, :t + 1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(y2[:, t + 1:], y[:, t + 1:])


def test_flash_training_reduces_loss():
    """A causal FLASH unit learns to copy the previous token (y_t = x_{t-1}), which needs attention."""
    T, D = 12, 16
    model = GAU(D, shared_dim=16, causal=True, chunk_size=4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, T, D))
    target = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :T]
    losses = adam_losses(model, lambda m: jnp.mean(jnp.square(m(x, jnp.arange(T)) - target)), 30)
    assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("kw, match", [
    (dict(scores="sigmoid"), "scores='sigmoid' is not valid; choose one of"),
    (dict(scores="softmax", chunk_size=4), "uses relu2 scores"),
    (dict(position="alibi"), "position='alibi' is not valid; choose one of"),
    (dict(shared_dim=7), "shared_dim must be even"),
])
def test_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        GAU(8, causal=True, rngs=nnx.Rngs(0), **kw)
