"""Swin classifier: Swin-T's parameter count and FLOPs against the paper and timm, the stage layout, shapes, config
errors, and a tiny overfit; the ConvNet baseline's FLOPs and config."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxmodels.models import check_model_config, make_model
from jaxmodels.models.classifier import DigitClassifier, convnet_flops_per_example
from jaxmodels.models.swin import SWIN_T, Swin, swin_flops_per_example, swin_parameter_count, swin_stages
from jaxmodels.ops.losses import softmax_cross_entropy
from tests.fitting import adam_losses
from tests.models.test_dit import matmul_flops

SMALL = dict(image_size=16, patch_size=2, in_channels=1, num_classes=3, embed_dim=8, depths=(2, 1),
             num_heads=(2, 4), window_size=4, mlp_ratio=2.0)
# timm's swin_tiny_patch4_window7_224 (the official model, qkv and MLP biases included) has 28,288,354 parameters;
# ours has no bias in qkv (3d), the output projection (d) and the MLP (4d + d): 9·d per block fewer.
TIMM_SWIN_T_PARAMETERS = 28_288_354


def _count(module):
    return sum(p.size for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_swin_t_parameters_and_flops_match_the_paper():
    abstract = nnx.eval_shape(lambda: Swin(**SWIN_T, rngs=nnx.Rngs(0)))
    count = _count(abstract)
    assert count == swin_parameter_count(**SWIN_T)
    dims = [96 * 2**i for i in range(4)]
    assert count + sum(9 * d * n for d, n in zip(dims, SWIN_T["depths"])) == TIMM_SWIN_T_PARAMETERS
    assert abs(count / 28e6 - 1) < 0.01  # the paper's "28M"
    flops = swin_flops_per_example(**SWIN_T)
    assert abs(flops / 2 / 4.5e9 - 1) < 0.01  # the paper's "4.5G" are multiply-adds; ours 4.491G
    # Every matmul Swin-T traces on one image: the projections, window attention, MLPs, merges, embedding, head.
    assert matmul_flops(abstract, jnp.zeros((1, 224, 224, 3))) == flops
    assert abstract.train_flops_per_example() == 3 * flops


def test_stage_layout_clamps_the_window_to_small_grids_and_shifts_by_half():
    # Swin-T: grids 56, 28, 14, 7, windows 7, shift 3 but in the last stage (one window covers it: no shift).
    assert swin_stages(224, 4, (2, 2, 6, 2), (3, 6, 12, 24), 7, 96) == [(56, 7, 3), (28, 7, 3), (14, 7, 3), (7, 7, 0)]
    # MNIST with patch 2: 14 then 7; 8x8 digits with patch 1 and window 4: 8 then 4; a window larger than the grid.
    assert swin_stages(28, 2, (2, 2), (2, 4), 7, 32) == [(14, 7, 3), (7, 7, 0)]
    assert swin_stages(8, 1, (1, 1), (1, 1), 16, 4) == [(8, 8, 0), (4, 4, 0)]
    model = nnx.eval_shape(lambda: Swin(**SMALL, rngs=nnx.Rngs(0)))  # grids 8 (window 4, shift 2), 4 (whole)
    assert [[(b.window_size, b.shift_size) for b in stage] for stage in model.stages] == [[(4, 0), (4, 2)], [(4, 0)]]


def test_small_swin_shapes_count_and_input_check():
    model = nnx.eval_shape(lambda: Swin(**SMALL, rngs=nnx.Rngs(0)))
    assert _count(model) == swin_parameter_count(**SMALL)
    graphdef, state = nnx.split(model)
    logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jnp.ones((2, 16, 16, 1)))
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    with pytest.raises(ValueError, match=r"x must be \(batch, 16, 16, 1\)"):
        model(jnp.ones((2, 12, 12, 1)))


@pytest.mark.parametrize("change, message", [
    ({"image_size": 15}, r"config.model.image_size=15 must be divisible by config.model.patch_size=2"),
    ({"window_size": 3}, r"stage 0's token grid 8 x 8 is not divisible by config.model.window_size=3"),
    ({"image_size": 12, "window_size": 3, "depths": (1, 1, 1), "num_heads": (1, 1, 1)},
     r"stage 1's token grid 3 x 3 .* is odd"),
    ({"depths": (2,)}, r"config.model.depths=\(2,\) and config.model.num_heads=\(2, 4\) must give one entry"),
    ({"num_heads": (3, 4)}, r"stage 0 has dim config.model.embed_dim·2\^0 = 8, not divisible by "
                            r"config.model.num_heads\[0\]=3"),
    ({"depths": (2, 0)}, r"config.model.depths\[1\] must be a positive int"),
])
def test_config_errors_name_the_field(change, message):
    good = dict(name="swin", dtype="float32", param_dtype="float32", **SMALL)
    check_model_config(ml_collections.ConfigDict(good))
    with pytest.raises(ValueError, match=message):
        check_model_config(ml_collections.ConfigDict({**good, **change}))
    with pytest.raises(ValueError, match=message.replace("config.model.", "")):  # the constructor checks too
        nnx.eval_shape(lambda: Swin(**{**SMALL, **change}, rngs=nnx.Rngs(0)))


def test_a_few_adam_steps_fit_a_tiny_batch():
    config = ml_collections.ConfigDict(dict(name="swin", dtype="float32", param_dtype="float32", **SMALL))
    model = nnx.jit(lambda: make_model(config, nnx.Rngs(1)))()
    rng = np.random.default_rng(0)
    x, labels = jnp.asarray(rng.normal(size=(6, 16, 16, 1)), jnp.float32), jnp.asarray(rng.integers(0, 3, 6))
    losses = adam_losses(model, lambda m: softmax_cross_entropy(m(x), labels).mean(), 20, learning_rate=3e-3)
    assert losses[0] == pytest.approx(np.log(3), rel=1e-5)  # the zero-initialised head
    assert losses[-1] < 0.5 * losses[0]


def test_convnet_flops_and_config():
    shape = dict(in_channels=1, channels=4, feature_dim=8, num_classes=10)
    for stages in (1, 2):
        model = nnx.eval_shape(lambda: DigitClassifier(**shape, num_stages=stages, image_size=7, rngs=nnx.Rngs(0)))
        flops = convnet_flops_per_example(image_size=7, num_stages=stages, **shape)
        assert matmul_flops(model, jnp.zeros((1, 7, 7, 1))) == flops
        assert model.train_flops_per_example() == 3 * flops
    assert flops == 2 * (9 * (49 * 4 + 16 * 4 * 8 + 16 * 8 * 8 + 4 * 8 * 16 + 4 * 16 * 16) + 16 * 8 + 8 * 10)
    assert nnx.eval_shape(lambda: DigitClassifier(rngs=nnx.Rngs(0))).train_flops_per_example() is None  # any size
    with pytest.raises(ValueError, match=r"x must be \(batch, 7, 7, 1\)"):
        model(jnp.zeros((1, 8, 8, 1)))
    good = dict(name="convnet", dtype="float32", param_dtype="float32", image_size=None, **shape)
    check_model_config(ml_collections.ConfigDict(good))
    for field in ("channels", "num_stages"):
        with pytest.raises(ValueError, match=f"config.model.{field}"):
            check_model_config(ml_collections.ConfigDict({**good, field: 0}))
