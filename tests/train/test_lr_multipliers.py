"""Per-parameter learning-rate multipliers (`scale_by_multipliers`, `make_optimizer(lr_multipliers=...)`) against
NumPy, and the trainer applying a muP model's (`Model.lr_multipliers`)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxmodels.train.optimizer import make_optimizer, scale_by_multipliers
from tests.tiny import tiny_config


def _config(**kw):
    return ml_collections.ConfigDict(dict(learning_rate=0.1, warmup_steps=0, schedule="constant", min_lr_ratio=1.0,
                                          b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0) | kw)


def _tree(key):
    ka, kb, kc = jax.random.split(key, 3)
    return {"a": jax.random.normal(ka, (3, 4)), "b": {"c": jax.random.normal(kb, (5,)),
                                                      "d": jax.random.normal(kc, (2, 2, 2))}}


def test_scale_by_multipliers_multiplies_each_leaf():
    updates, multipliers = _tree(jax.random.key(0)), {"a": 0.25, "b": {"c": 1.0, "d": 3.0}}
    tx = scale_by_multipliers(multipliers)
    scaled, _ = tx.update(updates, tx.init(updates))
    flat = lambda t: {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(t)}
    got, x = flat(scaled), flat(updates)
    for name, m in flat(multipliers).items():
        np.testing.assert_allclose(got[name], m * np.asarray(x[name], np.float64), rtol=1e-6)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), updates)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(tx.update(half, ())[0]))


def test_multipliers_scale_adams_step_and_not_the_weight_decay():
    """update = -lr (m * adam + wd * p) (the mup package's MuAdamW keeps lr * weight_decay), over 3 steps with
    clipping; multipliers of 1 give AdamW itself."""
    params, m = _tree(jax.random.key(1)), {"a": 0.25, "b": {"c": 1.0, "d": 4.0}}
    grads = [_tree(jax.random.key(i)) for i in range(2, 5)]
    ones = jax.tree.map(lambda _: 1.0, m)
    for multipliers, reference in ((ones, None), (m, m)):
        tx, plain = make_optimizer(_config(), 3, lr_multipliers=multipliers), make_optimizer(_config(), 3)
        adam_only = make_optimizer(_config(weight_decay=0.0), 3)
        states = [t.init(params) for t in (tx, plain, adam_only)]
        for g in grads:
            (u, states[0]), (u_plain, states[1]), (u_adam, states[2]) = (
                t.update(g, s, params) for t, s in zip((tx, plain, adam_only), states))
            if reference is None:
                jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), u, u_plain)
            else:
                expected = jax.tree.map(lambda mult, a, p: mult * np.asarray(a, np.float64) - 0.1 * 0.1 * p *
                                        (np.ndim(p) >= 2), reference, u_adam, params)
                jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), u, expected)


@pytest.mark.parametrize("multipliers, match", [
    ({"a": 0.0, "b": {"c": 1.0, "d": 1.0}}, r"multipliers\['a'\]"),
    ({"a": 1.0, "b": {"c": float("nan"), "d": 1.0}}, r"multipliers\['b'\]\['c'\]"),
    ({"a": 1.0, "b": {"c": float("inf"), "d": 1.0}}, r"multipliers\['b'\]\['c'\]"),
])
def test_bad_multipliers_raise_naming_the_leaf(multipliers, match):
    with pytest.raises(ValueError, match=match):
        scale_by_multipliers(multipliers)


def test_multipliers_of_another_structure_raise():
    tx = scale_by_multipliers({"a": 1.0})
    with pytest.raises(ValueError, match="multipliers must have the structure of the updates"):
        tx.update(_tree(jax.random.key(0)), ())


def test_trainer_applies_the_models_mup_learning_rates(tmp_path):
    """A muP run at width_mult 2 (embed_dim 32, base 16): Adam's first step moves every entry by about lr times its
    multiplier, so the blocks' matrices move half as far as the embedding."""
    from jaxmodels.train.loop import Trainer
    config = tiny_config(model__parametrization="mup", model__mup_base_width=16, optimizer__warmup_steps=0,
                         optimizer__schedule="constant", optimizer__weight_decay=0.0, optimizer__grad_clip_norm=0.0,
                         optimizer__learning_rate=1e-3)
    trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:1])
    _, state = trainer.restore_or_init()
    before = jax.device_get(state["params"])
    state, _ = trainer.train_step(state, trainer.global_batch(next(trainer.task.train_batches(0, 0, 1))))
    after = jax.device_get(state["params"])
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), after, before)
    assert moved["embed"]["embedding"] == pytest.approx(1e-3, rel=1e-3)
    for name in ("w_q", "w_k", "w_v", "w_o"):
        assert moved["blocks"][0]["attn"][name] == pytest.approx(0.5e-3, rel=1e-3), name
    assert moved["w_out"] == pytest.approx(1e-3, rel=1e-3)  # the readout: Table 8's learning rate 1
