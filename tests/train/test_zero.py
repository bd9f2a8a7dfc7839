"""The ZeRO step (explicit reduce-scatter / all-gather in shard_map) == the plain step, on 8 fake devices."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxmodels.parallel import sharding as sh
from jaxmodels.parallel import zero
from jaxmodels.parallel.mesh import make_mesh
from jaxmodels.parallel.strategy import ZeRO
from jaxmodels.train.checkpoint import Checkpointer, abstract_with_shardings
from jaxmodels.train.optimizer import decay_mask, make_optimizer
from jaxmodels.train.step import make_train_step


class Affine(nnx.Module):
    """15 + 5 parameters: neither divides by 8, so every leaf is padded."""

    def __init__(self):
        self.w = nnx.Param(jnp.arange(15.0).reshape(3, 5) / 10 - 0.5)
        self.b = nnx.Param(jnp.linspace(-1.0, 1.0, 5))


def loss_fn(model, batch):
    loss = jnp.mean((batch[:, :3] @ model.w.value + model.b.value - batch[:, 3:]) ** 2)
    return loss, {"loss": loss}


def _opt_config(**kw):
    # grad_clip_norm 1: some steps are clipped, others not.
    return ml_collections.ConfigDict(dict(learning_rate=0.1, warmup_steps=0, schedule="constant", min_lr_ratio=1.0,
                                          b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0) | kw)


def _zero_setup(collectives, accum, n=8):
    mesh = make_mesh({"data": n}, jax.devices()[:n])
    graphdef, params = nnx.split(Affine())
    params = params.to_pure_dict()
    strategy = ZeRO(mesh, collectives)
    tx = make_optimizer(_opt_config(), 10, decay=decay_mask(params), axis_name=strategy.update_axis)
    opt_state = tx.init(strategy.opt_layout(params))
    specs = {"step": P(), "params": jax.tree.map(lambda _: P(), params),
             "opt_state": sh.opt_state_specs(tx, opt_state, jax.tree.map(lambda _: P("data"), params))}
    batch_spec = P(("data", "fsdp"), None)
    step = make_train_step(graphdef, loss_fn, tx, optax.constant_schedule(0.1), accum, strategy=strategy,
                           state_specs=specs, batch_spec=batch_spec)
    state = jax.device_put({"step": jnp.int32(0), "params": params, "opt_state": opt_state}, sh.named(mesh, specs))
    return jax.jit(step), state, sh.named(mesh, batch_spec)


def _reference():
    graphdef, params = nnx.split(Affine())
    params = params.to_pure_dict()
    tx = make_optimizer(_opt_config(), 10)
    step = jax.jit(make_train_step(graphdef, loss_fn, tx, optax.constant_schedule(0.1)))
    return step, {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params)}


def _batches(k):
    return [jax.random.normal(jax.random.key(i), (32, 8)) for i in range(k)]


@pytest.mark.devices(8)
@pytest.mark.parametrize("collectives,accum", [("ring", 1), ("xla", 2)])
def test_zero_step_equals_the_plain_step(collectives, accum):
    step, state = _reference()
    zstep, zstate, batch_sharding = _zero_setup(collectives, accum)
    norms = []
    for batch in _batches(4):
        state, m = step(state, batch)
        zstate, zm = zstep(zstate, jax.device_put(batch, batch_sharding))
        for k in ("loss", "grad_norm", "learning_rate", "nonfinite"):
            np.testing.assert_allclose(zm[k], m[k], rtol=1e-5, err_msg=k)
        for k in state["params"]:
            np.testing.assert_allclose(zstate["params"][k], state["params"][k], rtol=1e-5, atol=1e-6, err_msg=k)
        norms.append(float(m["grad_norm"]))
    assert max(norms) > 1.0 > min(norms)  # clipping both active and inactive
    # The optimiser state is stored sharded: each device holds (c,) = (2,) and (1,) rows of mu and nu.
    mu = zstate["opt_state"][1][0].mu
    assert mu["w"].shape == (16,) and mu["w"].sharding.spec == P("data")
    assert {s.data.shape for s in mu["w"].addressable_shards} == {(2,)}
    # Globally it is the flattened, zero-padded moment of the plain step.
    ref_mu = zero.padded_flat(state["opt_state"][1][0].mu["w"], 8)
    np.testing.assert_allclose(mu["w"], ref_mu, rtol=1e-5, atol=1e-7)


@pytest.mark.devices(8)
def test_zero_step_keeps_the_state_when_the_loss_is_not_finite():
    zstep, zstate, batch_sharding = _zero_setup("ring", 1)
    zstate, _ = zstep(zstate, jax.device_put(_batches(1)[0], batch_sharding))
    before = jax.device_get(zstate)
    bad = jax.device_put(jnp.ones((32, 8)).at[3, 0].set(jnp.nan), batch_sharding)
    zstate, m = zstep(zstate, bad)
    assert int(m["nonfinite"]) == 1 and int(zstate["step"]) == 2
    for a, b in zip(jax.tree.leaves(before["params"]) + jax.tree.leaves(before["opt_state"]),
                    jax.tree.leaves(zstate["params"]) + jax.tree.leaves(zstate["opt_state"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.devices(8)
def test_zero_state_checkpoints_round_trip_onto_the_same_shards(tmp_path):
    zstep, zstate, batch_sharding = _zero_setup("ring", 1)
    zstate, _ = zstep(zstate, jax.device_put(_batches(1)[0], batch_sharding))
    ck = Checkpointer(str(tmp_path), every=1, keep=1)
    ck.save(1, zstate)
    ck.wait()
    shardings = jax.tree.map(lambda x: x.sharding, zstate)
    step, restored = ck.restore_latest(abstract_with_shardings(jax.eval_shape(lambda: zstate), shardings))
    assert step == 1
    for a, b in zip(jax.tree.leaves(zstate), jax.tree.leaves(restored)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(a, b)
    ck.close()


def test_bucket_round_trip_and_shards():
    tree = {"a": jnp.arange(7.0), "b": jnp.arange(6, dtype=jnp.int32).reshape(2, 3)}
    rows = zero.bucket(tree, 4)  # a: c = 2, b: c = 2
    assert rows.shape == (4, 4)
    back = zero.unbucket(rows, tree)
    assert back["b"].dtype == jnp.int32
    for k in tree:
        np.testing.assert_array_equal(back[k], tree[k])
    shard = zero.split_row(rows[3], tree, 4)
    np.testing.assert_array_equal(shard["a"], [6.0, 0.0])  # the last row holds the padding
    np.testing.assert_array_equal(zero.local_shard(tree, 4, 3)["a"], shard["a"])
