import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.models.mmdit import MMDiT
from tests.models.test_dit import _apply, _eval_shape, _perturbed, matmul_dtypes

CONFIG = dict(input_size=8, patch_size=2, in_channels=2, context_dim=12, pooled_dim=6, hidden_dim=32, depth=2,
              num_heads=2)
X = jax.random.normal(jax.random.key(0), (2, 8, 8, 2))
T = jnp.array([10.0, 700.0])
CTX = jax.random.normal(jax.random.key(1), (2, 5, 12))
POOLED = jax.random.normal(jax.random.key(2), (2, 6))


@pytest.fixture(scope="module")
def model():
    return nnx.jit(lambda: MMDiT(**CONFIG, rngs=nnx.Rngs(0)))()


@pytest.fixture(scope="module")
def moved(model):
    return _perturbed(model, 3)


def test_shapes_dtypes_and_zero_output_at_init(model):
    out = _apply(model, X, T, CTX, POOLED)
    assert out.shape == X.shape and out.dtype == jnp.float32
    assert not np.any(np.asarray(out))  # adaLN-Zero and the zero-initialised final linear
    assert matmul_dtypes(model, X, T, CTX, POOLED) == {"float32"}
    bf16 = nnx.eval_shape(lambda: MMDiT(**CONFIG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert matmul_dtypes(bf16, X, T, CTX, POOLED) == {"bfloat16"}
    assert _eval_shape(bf16, X, T, CTX, POOLED).dtype == jnp.float32


def test_the_context_stream_changes_the_output(moved):
    out = _apply(moved, X, T, CTX, POOLED)
    assert not np.allclose(out, _apply(moved, X, T, CTX.at[:, 0].add(1.0), POOLED))
    assert not np.allclose(out, _apply(moved, X, T, CTX, POOLED + 1.0))
    # Per example: changing example 1's context leaves example 0 alone.
    np.testing.assert_allclose(_apply(moved, X, T, CTX.at[1].add(1.0), POOLED)[0], out[0], rtol=1e-5, atol=1e-6)


def test_the_last_context_stream_is_pre_only(model):
    last, first = model.blocks[-1].context, model.blocks[0].context
    assert last.pre_only and not first.pre_only
    assert not hasattr(last, "mlp") and hasattr(first, "mlp")
    abstract = nnx.eval_shape(lambda: MMDiT(**{**CONFIG, "pooled_dim": 0}, rngs=nnx.Rngs(0)))
    assert _eval_shape(abstract, X, T, CTX).shape == X.shape


def test_bad_inputs_are_rejected(model):
    with pytest.raises(ValueError, match="context must be"):
        model(X, T, CTX[..., :4], POOLED)
    with pytest.raises(ValueError, match="pooled must be"):
        model(X, T, CTX)
    with pytest.raises(ValueError, match="divisible by 4"):
        MMDiT(**{**CONFIG, "num_heads": 16}, rngs=nnx.Rngs(0))
