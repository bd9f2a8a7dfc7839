import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from jaxmodels.models import check_model_config, make_model
from jaxmodels.models.vit import ViT, vit_flops_per_example, vit_parameter_count
from jaxmodels.ops.losses import softmax_cross_entropy
from tests.models.test_dit import matmul_flops

SMALL = dict(image_size=8, patch_size=4, in_channels=1, num_classes=3, hidden_dim=16, depth=1, num_heads=2,
             mlp_dim=32)


def _count(module):
    return sum(p.size for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def test_shapes_parameter_count_and_zero_head():
    for pooling in ("cls", "mean"):  # abstract models: counting needs no compilation
        abstract = nnx.eval_shape(lambda: ViT(**SMALL, pooling=pooling, rngs=nnx.Rngs(0)))
        assert _count(abstract) == vit_parameter_count(**SMALL, pooling=pooling)
    model = nnx.jit(lambda: ViT(**SMALL, pooling="cls", rngs=nnx.Rngs(0)))()
    logits = _forward(*nnx.split(model), jnp.ones((2, 8, 8, 1)))
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, 0.0)  # zero-initialised head
    with pytest.raises(ValueError, match=r"x must be \(batch, 8, 8, 1\)"):
        model(jnp.ones((2, 8, 8, 3)))


def test_flops_match_timm_and_the_traced_matmuls():
    b16 = dict(image_size=224, patch_size=16, in_channels=3, num_classes=1000, hidden_dim=768, depth=12, num_heads=12,
               mlp_dim=3072)
    flops = vit_flops_per_example(**b16)
    assert abs(flops / 2 / 17.58e9 - 1) < 0.005  # timm's ViT-B/16: 17.58 GMACs (fvcore), ours 17.56
    for pooling in ("cls", "mean"):
        model = nnx.eval_shape(lambda: ViT(**SMALL, pooling=pooling, rngs=nnx.Rngs(0)))
        assert matmul_flops(model, jnp.zeros((1, 8, 8, 1))) == vit_flops_per_example(**SMALL, pooling=pooling)
        assert model.train_flops_per_example() == 3 * vit_flops_per_example(**SMALL, pooling=pooling)


def test_a_few_adam_steps_fit_a_tiny_batch():
    config = ml_collections.ConfigDict(dict(name="vit", dtype="float32", param_dtype="float32", **SMALL,
                                            pooling="mean"))
    model = nnx.jit(lambda: make_model(config, nnx.Rngs(1)))()  # one compilation instead of one per parameter
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    x, labels = jnp.asarray(rng.normal(size=(6, 8, 8, 1)), jnp.float32), jnp.asarray(rng.integers(0, 3, 6))
    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(
            lambda p: softmax_cross_entropy(nnx.merge(graphdef, p)(x), labels).mean())(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    losses = []
    for _ in range(30):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[0] == pytest.approx(np.log(3), rel=1e-5)
    assert losses[-1] < 0.5 * losses[0]


def test_config_is_checked_before_building():
    good = dict(name="vit", dtype="float32", param_dtype="float32", **SMALL, pooling="cls")
    check_model_config(ml_collections.ConfigDict(good))
    with pytest.raises(ValueError, match=r"config.model.pooling='max' is not valid; choose one of \['cls', 'mean'\]"):
        check_model_config(ml_collections.ConfigDict({**good, "pooling": "max"}))
    with pytest.raises(ValueError, match="config.model.image_size=10 must be divisible by config.model.patch_size=4"):
        check_model_config(ml_collections.ConfigDict({**good, "image_size": 10}))
    with pytest.raises(ValueError, match="config.model.hidden_dim=15 must be divisible"):
        check_model_config(ml_collections.ConfigDict({**good, "hidden_dim": 15}))
    with pytest.raises(ValueError, match="config.model.depth"):
        check_model_config(ml_collections.ConfigDict({**good, "depth": 0}))
