import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.nn.layers import MLP, Embed, LayerNorm, RMSNorm, make_norm


def test_rmsnorm_matches_numpy():
    x = np.random.default_rng(0).normal(size=(2, 3, 16)).astype(np.float32) * 3
    norm = RMSNorm(16, rngs=nnx.Rngs(0))
    norm.scale.value = jnp.asarray(np.linspace(0.5, 2, 16), jnp.float32)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * np.linspace(0.5, 2, 16)
    np.testing.assert_allclose(norm(jnp.asarray(x)), ref, rtol=1e-5)


def test_layernorm_matches_numpy_and_bf16_policy():
    x = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32) + 5
    ln = LayerNorm(8, rngs=nnx.Rngs(0))
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(ln(jnp.asarray(x)), ref, rtol=1e-4, atol=1e-5)
    ln16 = LayerNorm(8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert ln16(jnp.asarray(x)).dtype == jnp.bfloat16
    assert ln16.scale.value.dtype == jnp.float32


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_mlp_matches_numpy(kind):
    mlp = MLP(6, 10, kind=kind, rngs=nnx.Rngs(0))
    x = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
    up = x @ np.asarray(mlp.w_up.value)
    if kind == "swiglu":
        g = x @ np.asarray(mlp.w_gate.value)
        h = g / (1 + np.exp(-g)) * up
    else:
        h = np.asarray(jax.nn.gelu(jnp.asarray(up)))
    np.testing.assert_allclose(mlp(jnp.asarray(x)), h @ np.asarray(mlp.w_down.value), rtol=1e-4, atol=1e-5)
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(mlp, nnx.Param)))
    assert n_params == 6 * 10 * (3 if kind == "swiglu" else 2)


def test_init_variance_is_fan_in_scaled():
    mlp = MLP(512, 512, kind="gelu", rngs=nnx.Rngs(0))
    assert abs(float(jnp.std(mlp.w_up.value)) * np.sqrt(512) - 1.0) < 0.05


def test_embed_and_errors():
    emb = Embed(10, 4, rngs=nnx.Rngs(0))
    ids = jnp.array([[1, 9]])
    np.testing.assert_array_equal(emb(ids), emb.embedding.value[ids])
    with pytest.raises(ValueError, match="valid"):
        make_norm("batch", 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="valid"):
        MLP(4, 4, kind="relu", rngs=nnx.Rngs(0))
