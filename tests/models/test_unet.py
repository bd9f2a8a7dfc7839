import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.models.unet import UNet
from jaxmodels.nn.diffusion import MultiHeadAttention
from tests.models.test_dit import RAMP, _apply, _eval_shape, _perturbed, assert_training_reduces_loss, matmul_dtypes

# Attention (self + cross) in the middle block only, to keep compile times small.
CONFIG = dict(in_channels=1, base_channels=16, channel_mult=(1, 2), attention_levels=(), num_heads=2, num_classes=10,
              context_dim=8)
X = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
T = jnp.array([3.0, 500.0])
Y = jnp.array([1, 10])
C = jax.random.normal(jax.random.key(1), (2, 3, 8))


# One compile instead of one per parameter shape; test_controlnet reuses it (and its jit cache).
make_unet = nnx.jit(lambda: UNet(**CONFIG, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def unet():
    return make_unet()


@pytest.fixture(scope="module")
def moved(unet):
    return _perturbed(unet, 1)


def test_shapes_dtypes_and_zero_output_at_init(unet):
    out = _apply(unet, X, T, Y, C)
    assert out.shape == (2, 8, 8, 1) and out.dtype == jnp.float32
    assert not np.any(np.asarray(out))  # conv_out is zero-initialised (ADM)
    assert matmul_dtypes(unet, X, T, Y, C) == {"float32"}
    bf16 = nnx.eval_shape(lambda: UNet(**CONFIG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert matmul_dtypes(bf16, X, T, Y, C) == {"bfloat16"}  # every conv and matmul
    assert _eval_shape(bf16, X, T, Y, C).dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))


def test_bad_inputs_are_rejected(unet):
    with pytest.raises(ValueError, match="context"):
        unet(X, T, Y)
    with pytest.raises(ValueError, match="divisible"):
        unet(jnp.zeros((2, 7, 7, 1)), T, Y, C)
    with pytest.raises(ValueError, match="t must be"):
        unet(X, jnp.zeros((2, 1)), Y, C)
    with pytest.raises(ValueError, match="attention_levels"):
        UNet(**{**CONFIG, "attention_levels": (2,)}, rngs=nnx.Rngs(0))


def test_labels_context_and_noise_level_change_the_output(moved):
    out = _apply(moved, X, T, Y, C)
    assert not np.allclose(out, _apply(moved, X, T, jnp.array([2, 10]), C))
    assert not np.allclose(out, _apply(moved, X, T, Y, C + 1))
    assert not np.allclose(out, _apply(moved, X, T + 100, Y, C))
    np.testing.assert_array_equal(_apply(moved, X, T, None, C)[1], out[1])  # None = the null label 10
    # Each example's output depends on its own inputs only.
    np.testing.assert_allclose(_apply(moved, X, T, jnp.array([1, 3]), C)[0], out[0], rtol=1e-5, atol=1e-6)


def test_skip_and_middle_residuals_are_added(unet, moved):
    graphdef, state = nnx.split(unet.encoder)
    _, skips, _ = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(X, T, Y, C), state)
    assert [s.shape[-1] for s in skips] == list(unet.encoder.skip_channels) == [16, 16, 16, 32]
    zeros = [jnp.zeros(s.shape) for s in skips]
    out = _apply(moved, X, T, Y, C)
    graphdef, state = nnx.split(moved)

    @jax.jit
    def with_residuals(state, residuals, middle):
        return nnx.merge(graphdef, state)(X, T, Y, C, skip_residuals=residuals, middle_residual=middle)

    middle = jnp.zeros((2, 4, 4, 32))
    np.testing.assert_allclose(with_residuals(state, zeros, middle), out, rtol=1e-6, atol=1e-6)
    assert not np.allclose(with_residuals(state, zeros[:-1] + [zeros[-1] + 1], middle), out)
    assert not np.allclose(with_residuals(state, zeros, middle + 1), out)
    with pytest.raises(ValueError, match="one array per skip"):
        moved(X, T, Y, C, skip_residuals=zeros[:-1])


def test_resampling_variants_and_levels():
    config = dict(in_channels=3, out_channels=2, base_channels=16, channel_mult=(1, 1, 2), attention_levels=(2,),
                  num_res_blocks=2, upsample="pixel_shuffle", downsample="avg_pool")
    model = nnx.eval_shape(lambda: UNet(**config, rngs=nnx.Rngs(0)))
    assert _eval_shape(model, jnp.zeros((2, 16, 8, 3)), jnp.zeros(2)).shape == (2, 16, 8, 2)


def test_cross_attention_matches_numpy():
    attn = nnx.eval_shape(lambda: MultiHeadAttention(8, 2, context_dim=6, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    w = {name: rng.normal(size=getattr(attn, name).value.shape) / 3 for name in ("w_q", "w_k", "w_v", "w_o")}
    for name, value in w.items():
        getattr(attn, name).value = jnp.asarray(value, jnp.float32)
    x, ctx = rng.normal(size=(2, 5, 8)), rng.normal(size=(2, 3, 6))
    q = np.einsum("bld,dnh->bnlh", x, w["w_q"])
    k = np.einsum("bsd,dnh->bnsh", ctx, w["w_k"])
    v = np.einsum("bsd,dnh->bnsh", ctx, w["w_v"])
    s = np.einsum("bnlh,bnsh->bnls", q, k) / 2.0
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = np.einsum("bnls,bnsh,nhd->bld", p, v, w["w_o"])
    np.testing.assert_allclose(_apply(attn, jnp.asarray(x, jnp.float32), jnp.asarray(ctx, jnp.float32)), ref,
                               rtol=1e-4, atol=1e-5)


def test_a_few_adam_steps_reduce_the_denoising_loss(unet):
    context = jnp.zeros((RAMP.shape[0], 3, 8))
    assert_training_reduces_loss(unet, lambda m, x, t: m(x, t, None, context), RAMP)
