import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.models.controlnet import ControlledUNet, ControlNet, HintEncoder
from tests.models.test_dit import _apply, _perturbed
from tests.models.test_unet import C, T, X, Y, make_unet

HINT = jax.random.normal(jax.random.key(7), (2, 8, 8, 3))


@pytest.fixture(scope="module")
def unet():
    # A UNet with every parameter moved off its init, so that its output is not trivially 0.
    return _perturbed(make_unet(), 1)


@pytest.fixture(scope="module")
def controlled(unet):
    control = nnx.jit(lambda u: ControlNet.from_unet(u, hint_channels=3, rngs=nnx.Rngs(1)))(unet)
    return ControlledUNet(unet, control)


def test_from_unet_copies_the_encoder(unet, controlled):
    copied, source = nnx.state(controlled.controlnet.encoder, nnx.Param), nnx.state(unet.encoder, nnx.Param)
    assert jax.tree.structure(copied) == jax.tree.structure(source)
    for a, b in zip(jax.tree.leaves(copied), jax.tree.leaves(source)):
        np.testing.assert_array_equal(a, b)
    assert controlled.controlnet.encoder.config == unet.encoder.config
    # Copies, not shared buffers: a train step that donates the ControlNet must not free the frozen UNet's.
    eager = ControlNet.from_unet(unet, hint_channels=3, rngs=nnx.Rngs(1))
    for a, b in zip(jax.tree.leaves(nnx.state(eager.encoder, nnx.Param)), jax.tree.leaves(source)):
        assert a is not b


def test_output_equals_the_plain_unet_at_init(unet, controlled):
    plain = _apply(unet, X, T, Y, C)
    assert np.abs(np.asarray(plain)).max() > 1e-3
    np.testing.assert_array_equal(_apply(controlled, X, T, HINT, Y, C), plain)
    # Once the zero convolutions move, the hint does reach the output.
    graphdef, state = nnx.split(controlled)
    moved = nnx.merge(graphdef, state)
    moved.controlnet = _perturbed(moved.controlnet, 2)
    assert not np.allclose(_apply(moved, X, T, HINT, Y, C), plain)


def test_residual_shapes_and_gradients_reach_the_zero_convolutions(controlled):
    graphdef, state = nnx.split(controlled.controlnet)
    skips, middle = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(X, T, HINT, Y, C), state)
    assert [s.shape for s in skips] == [(2, 8, 8, 16), (2, 8, 8, 16), (2, 4, 4, 16), (2, 4, 4, 32)]
    assert middle.shape == (2, 4, 4, 32)

    def is_zero_conv(path, _):
        return any("zero_conv" in str(key) for key in path)

    graphdef, zero_convs, rest = nnx.split(controlled.controlnet, is_zero_conv, ...)

    def loss(z):
        skips, middle = nnx.merge(graphdef, z, rest)(X, T, HINT, Y, C)
        return sum(jnp.sum(jnp.sin(r)) for r in skips) + jnp.sum(jnp.sin(middle))

    kernels = [g for path, g in nnx.to_flat_state(jax.jit(jax.grad(loss))(zero_convs)) if path[-1] == "kernel"]
    # Zero convolutions have zero weights but non-zero gradients (Zhang et al. 2023, §3.1): they learn.
    assert len(kernels) == 5
    for g in kernels:
        assert np.abs(np.asarray(g.value if hasattr(g, "value") else g)).max() > 0


def test_hint_encoder_downsampling_and_checks():
    encoder = nnx.eval_shape(lambda: HintEncoder(3, 16, hidden=(8, 8, 16), downsample=2, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(encoder)
    assert jax.eval_shape(lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, 32, 32, 3))), state).shape == (1, 8, 8, 16)
    with pytest.raises(ValueError, match="downsample"):
        HintEncoder(3, 16, hidden=(8,), downsample=1, rngs=nnx.Rngs(0))


def test_wrong_hint_resolution_is_rejected(controlled):
    with pytest.raises(ValueError, match="hint"):
        controlled.controlnet(X, T, jnp.zeros((2, 16, 16, 3)), Y, C)
