"""DETR and Deformable DETR: output shapes, the auxiliary outputs are the earlier decoder layers' predictions, config
checks."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxmodels.models import check_model_config
from jaxmodels.models.detr import DETR, inverse_sigmoid, level_centres

SMALL = dict(image_size=16, in_channels=3, num_classes=3, hidden_dim=16, num_heads=2, mlp_dim=16,
             num_encoder_layers=1, num_decoder_layers=2, num_queries=4, backbone_channels=(8, 8), num_points=2)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def random_model(seed=0, **kwargs) -> DETR:
    """A DETR with parameters drawn on the host (no compiled initialisers): N(0, 1/fan_in) matrices, norms' scales
    1 + N(0, 0.1^2), other vectors N(0, 0.1^2)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DETR(**kwargs, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        if x.ndim >= 2:
            return jnp.asarray(rng.normal(size=x.shape) / np.sqrt(np.prod(x.shape[:-1])), x.dtype)
        return jnp.asarray(("scale" in str(path[-1])) + 0.1 * rng.normal(size=x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


@pytest.mark.parametrize("deformable,backbone,levels", [(False, "patch", 1), (True, "cnn", 3)])
def test_outputs_of_every_decoder_layer_and_the_aux_ones_are_earlier_layers(deformable, backbone, levels):
    model = random_model(**SMALL, deformable=deformable, backbone=backbone, num_feature_levels=levels)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    out = _forward(*nnx.split(model), x)
    graphdef, state = nnx.split(model)
    assert out["logits"].shape == (2, 2, 4, 4) and out["boxes"].shape == (2, 2, 4, 4)
    assert out["logits"].dtype == out["boxes"].dtype == jnp.float32
    assert ((out["boxes"] > 0) & (out["boxes"] < 1)).all()
    assert not np.allclose(out["boxes"][0], out["boxes"][1])  # the two decoder layers predict differently
    assert not np.allclose(out["boxes"][-1, 0], out["boxes"][-1, 1])  # the images differ
    sizes = [m.shape[1:3] for m in jax.eval_shape(lambda s: nnx.merge(graphdef, s).feature_levels(x), state)]
    # cnn: the stride-2 and stride-4 stages, then a stride-2 convolution; patch: the stride-4 patches
    assert sizes == ([(8, 8), (4, 4), (2, 2)] if deformable else [(4, 4)])
    model.decoder = nnx.List(list(model.decoder)[:1])  # the first layer alone: the aux output of the full model
    first = _forward(*nnx.split(model), x)
    np.testing.assert_allclose(first["logits"][0], out["logits"][0], atol=1e-5)
    np.testing.assert_allclose(first["boxes"][0], out["boxes"][0], atol=1e-6)


def test_structure_of_a_deformable_model():
    model = nnx.eval_shape(lambda: DETR(**SMALL, deformable=True, rngs=nnx.Rngs(0)))
    assert model.num_levels == 3 and len(model.encoder) == 1 and len(model.decoder) == 2
    assert model.query_embed.value.shape == (4, 32)  # position and initial state of each query
    assert model.class_head.kernel.value.shape == (16, 4)  # 3 classes + no object


def test_helpers():
    np.testing.assert_allclose(jax.nn.sigmoid(inverse_sigmoid(jnp.asarray([0.1, 0.5, 0.93]))), [0.1, 0.5, 0.93],
                               rtol=1e-5)
    np.testing.assert_allclose(level_centres(2, 4), [[0.125, 0.25], [0.375, 0.25], [0.625, 0.25], [0.875, 0.25],
                                                     [0.125, 0.75], [0.375, 0.75], [0.625, 0.75], [0.875, 0.75]])


def _section(**overrides):
    fields = dict(name="detr", dtype="float32", param_dtype="float32", backbone="cnn", patch_size=4, deformable=False,
                  num_feature_levels=3) | SMALL | overrides
    return ml_collections.ConfigDict(fields)


@pytest.mark.parametrize("overrides,match", [
    (dict(backbone="resnet"), "backbone='resnet'"),
    (dict(hidden_dim=18), "hidden_dim=18 must be divisible"),
    (dict(backbone_channels=(8, 12)), "multiples of 8"),
    (dict(image_size=14), "divisible by the backbone's stride 4"),
    (dict(backbone="patch", patch_size=3), "stride 3"),
    (dict(deformable=1), "deformable must be True or False"),
    (dict(deformable=True, hidden_dim=12, num_heads=3), "multiple of 8 when deformable"),
    (dict(num_queries=0), "num_queries"),
])
def test_bad_configs_name_the_field(overrides, match):
    check_model_config(_section())
    with pytest.raises(ValueError, match=match):
        check_model_config(_section(**overrides))
