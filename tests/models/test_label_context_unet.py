"""LabelContextUNet: shapes, the label context, and the null label of classifier-free guidance."""

import jax.numpy as jnp
import pytest
from flax import nnx

from jaxmodels.models.label_context_unet import LabelContextUNet
from tests.compiled import forward


def test_label_context_unet_shapes():
    model = LabelContextUNet(latent_channels=2, num_classes=10, base_channels=8, context_dim=8, num_levels=1,
                             num_groups=4, rngs=nnx.Rngs(0))
    labels = jnp.array([0, 10])  # a class and the null label
    assert model.context(labels).shape == (2, 1, 8)
    out = forward(model, jnp.ones((2, 4, 4, 2)), jnp.zeros((2,)), labels)
    assert out.shape == (2, 4, 4, 2) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="num_levels=3 is not valid"):
        LabelContextUNet(latent_channels=2, num_classes=10, base_channels=8, context_dim=8, num_levels=3,
                         rngs=nnx.Rngs(0))
