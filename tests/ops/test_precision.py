"""Precision policies and loss scaling: casts follow the policy, the dynamic loss scale follows a slow reference of
the apex/GradScaler schedule, loss scaling recovers float16 gradients that underflow, and a train step guarded by
`optax.apply_if_finite` skips exactly the overflowing update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmodels.ops import precision as mp


def test_casts_follow_the_policy_on_a_pytree():
    policy = mp.Policy(param="float32", compute="bfloat16", output="float32")
    tree = {"w": jnp.ones((2, 3)), "ids": jnp.arange(3), "mask": jnp.ones(3, bool),
            "nested": [jnp.ones(2, jnp.float16), 1.5]}
    dtypes = lambda t: [getattr(x, "dtype", type(x)) for x in jax.tree.leaves(t)]
    # leaves in key order: ids, mask, nested[0], nested[1], w
    assert dtypes(policy.cast_to_compute(tree)) == [jnp.int32, jnp.bool_, jnp.bfloat16, float, jnp.bfloat16]
    assert dtypes(policy.cast_to_param(tree)) == [jnp.int32, jnp.bool_, jnp.float32, float, jnp.float32]
    assert dtypes(policy.cast_to_output(policy.cast_to_compute(tree))) == dtypes(policy.cast_to_param(tree))
    np.testing.assert_array_equal(policy.cast_to_compute(tree)["ids"], tree["ids"])


def test_output_defaults_to_compute_and_the_policy_is_a_static_argument():
    policy = mp.Policy(param="float32", compute="float16")
    assert (policy.param_dtype, policy.compute_dtype, policy.output_dtype) == (jnp.float32, jnp.float16, jnp.float16)
    assert policy == mp.Policy("float32", "float16", "float16")
    assert hash(policy) == hash(mp.Policy("float32", "float16"))
    out = jax.jit(lambda x, p: p.cast_to_compute(x), static_argnums=1)(jnp.ones(2), policy)
    assert out.dtype == jnp.float16


@pytest.mark.parametrize("policy, needs, state_type", [
    (mp.Policy(), False, mp.NoOpLossScale),
    (mp.Policy(compute="bfloat16"), False, mp.NoOpLossScale),
    (mp.Policy(param="bfloat16", compute="bfloat16"), False, mp.NoOpLossScale),
    (mp.Policy(compute="float16"), True, mp.DynamicLossScale),
    (mp.Policy(param="float16", compute="float16", output="float32"), True, mp.DynamicLossScale),
])
def test_only_float16_needs_loss_scaling(policy, needs, state_type):
    assert policy.needs_loss_scaling == needs
    assert type(mp.loss_scale_for(policy)) is state_type


def _reference_schedule(finite_flags, scale, growth_interval, growth_factor, backoff_factor, min_scale):
    """PyTorch GradScaler's _amp_update_scale_ written out in Python with float32 scalars (as the state holds the
    scale), plus the min_scale floor."""
    scale, growth_factor, backoff_factor = np.float32(scale), np.float32(growth_factor), np.float32(backoff_factor)
    trace, good = [], 0
    for finite in finite_flags:
        if not finite:
            scale, good = max(scale * backoff_factor, np.float32(min_scale)), 0
        else:
            good += 1
            if good == growth_interval:
                scale, good = (scale * growth_factor if np.isfinite(scale * growth_factor) else scale), 0
        trace.append((float(scale), good))
    return trace


@pytest.mark.parametrize("seed, kwargs", [
    (0, dict(growth_interval=3)),
    (1, dict(growth_interval=1, growth_factor=4.0, backoff_factor=0.25, min_scale=8.0)),
    (2, dict(growth_interval=5, growth_factor=1.5, backoff_factor=0.9, min_scale=0.5)),
])
def test_dynamic_schedule_matches_a_slow_reference(seed, kwargs):
    finite_flags = np.random.default_rng(seed).random(60) < 0.8
    step = jax.jit(lambda s, f: mp.update(s, f, **kwargs))
    state, trace = mp.dynamic_loss_scale(64.0), []
    for finite in finite_flags:
        state = step(state, jnp.asarray(finite))
        trace.append((float(state.scale), int(state.good_steps)))
    defaults = dict(growth_factor=2.0, backoff_factor=0.5, min_scale=1.0) | kwargs
    assert trace == _reference_schedule(finite_flags, 64.0, **defaults)


def test_halves_on_overflow_and_grows_after_the_interval():
    state = mp.dynamic_loss_scale(2.0**15)
    state = mp.update(state, True, growth_interval=2)
    assert (float(state.scale), int(state.good_steps)) == (2.0**15, 1)
    state = mp.update(state, False, growth_interval=2)
    assert (float(state.scale), int(state.good_steps)) == (2.0**14, 0)  # halved, counter reset
    state = mp.update(state, True, growth_interval=2)
    state = mp.update(state, True, growth_interval=2)
    assert (float(state.scale), int(state.good_steps)) == (2.0**15, 0)  # doubled after 2 finite steps


def test_scale_stays_finite_and_above_min_scale():
    big = mp.update(mp.dynamic_loss_scale(3e38), True, growth_interval=1)
    assert float(big.scale) == np.float32(3e38) and int(big.good_steps) == 0
    small = mp.update(mp.dynamic_loss_scale(1.5), False, min_scale=1.0)
    assert float(small.scale) == 1.0


def test_static_and_noop_states_are_kept_and_noop_changes_nothing():
    static = mp.static_loss_scale(128.0)
    assert mp.update(static, False) is static and float(mp.scale_loss(jnp.float32(2.0), static)) == 256.0
    noop, loss, grads = mp.NoOpLossScale(), jnp.float32(2.0), {"w": jnp.ones(2)}
    assert mp.update(noop, False) is noop
    assert mp.scale_loss(loss, noop) is loss and mp.unscale_grads(grads, noop) is grads


def test_states_are_pytrees_of_arrays_that_round_trip_through_jit():
    dynamic = mp.dynamic_loss_scale(1024.0)
    leaves = jax.tree.leaves(dynamic)
    assert [(x.dtype, x.shape) for x in leaves] == [(jnp.float32, ()), (jnp.int32, ())]
    assert all(isinstance(x, jax.Array) for x in leaves)
    for state in (dynamic, mp.static_loss_scale(8.0), mp.NoOpLossScale()):
        back = jax.jit(lambda s: s)(state)
        assert type(back) is type(state)
        jax.tree.map(np.testing.assert_array_equal, back, state)
    after = jax.jit(mp.update)(dynamic, jnp.asarray(False))
    assert type(after) is mp.DynamicLossScale and float(after.scale) == 512.0 and after.good_steps.dtype == jnp.int32


def test_all_finite():
    assert bool(mp.all_finite({"a": jnp.ones(3), "b": [jnp.arange(2)]}))
    assert not bool(mp.all_finite({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.inf], jnp.float16)}))
    assert not bool(mp.all_finite([jnp.array([jnp.nan])]))
    assert bool(mp.all_finite({}))
    assert bool(jax.jit(mp.all_finite)({"a": jnp.ones(2)}))


def test_loss_scaling_recovers_float16_gradients_that_underflow():
    """Micikevicius et al. 2018, §3.2: d loss / dw = 1e-8 is below float16's smallest subnormal (6e-8) and flushes to
    0 in a float16 backward pass; scaled by 2^15 it survives and is unscaled onto the float32 master weight."""
    policy, w = mp.Policy(param="float32", compute="float16"), jnp.ones(3)
    loss = lambda w, state: mp.scale_loss(jnp.sum(policy.cast_to_compute(w) * jnp.float16(1e-4)) * 1e-4, state)
    assert float(jax.grad(loss)(w, mp.NoOpLossScale())[0]) == 0.0
    state = mp.dynamic_loss_scale(2.0**15)
    grads = mp.unscale_grads(jax.grad(loss)(w, state), state)
    assert grads.dtype == jnp.float32
    np.testing.assert_allclose(grads, 1e-8, rtol=2e-3)  # float16 rounding of 1e-4 twice


def _train(batches, *, guarded):
    """Momentum SGD on loss = sum(w * x) computed in float16 with dynamic loss scaling when `guarded`
    (the optimizer wrapped in optax.apply_if_finite), plain float32 otherwise. Returns params and scales per step."""
    policy = mp.Policy(param="float32", compute="float16" if guarded else "float32")
    tx = optax.sgd(0.125, momentum=0.5)
    tx = optax.apply_if_finite(tx, max_consecutive_errors=2**30) if guarded else tx
    loss_fn = lambda w, x, state: mp.scale_loss(jnp.sum(policy.cast_to_compute(w) * policy.cast_to_compute(x)), state)

    @jax.jit
    def step(w, opt_state, state, x):
        grads = mp.unscale_grads(jax.grad(loss_fn)(w, x, state), state)
        updates, opt_state = tx.update(grads, opt_state, w)
        return optax.apply_updates(w, updates), opt_state, mp.update(state, mp.all_finite(grads), growth_interval=2)

    w = jnp.ones(4)
    opt_state, state, trace = tx.init(w), mp.loss_scale_for(policy, 2.0**12), []
    for x in batches:
        w, opt_state, state = step(w, opt_state, state, x)
        trace.append((np.asarray(w), float(getattr(state, "scale", 1.0))))
    return trace


def test_a_guarded_step_skips_exactly_the_overflowing_update():
    """Batch 2 holds a value whose scaled float16 gradient (1024 * 2^13 > 65504) overflows to inf: that step must leave
    the weights and the optimizer state as they were and halve the scale; every other step must equal a float32
    run that never saw batch 2 (the values are powers of two, so float16 and the scaling are exact)."""
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.choice([-1.0, -0.5, 0.5, 1.0], 4), jnp.float32) for _ in range(7)]
    batches[2] = batches[2].at[1].set(1024.0)
    guarded, reference = _train(batches, guarded=True), _train(batches[:2] + batches[3:], guarded=False)
    np.testing.assert_array_equal(guarded[2][0], guarded[1][0])  # skipped exactly
    assert [s for _, s in guarded] == [2.0**12, 2.0**13, 2.0**12, 2.0**12, 2.0**13, 2.0**13, 2.0**14]
    for (w, _), (w_ref, _) in zip(guarded[:2] + guarded[3:], reference):
        np.testing.assert_allclose(w, w_ref, rtol=1e-6)


@pytest.mark.parametrize("make, error, match", [
    (lambda: mp.Policy(compute="fp16"), ValueError, "compute='fp16'"),
    (lambda: mp.Policy(param="float64"), ValueError, "param='float64'"),
    (lambda: mp.Policy(output="half"), ValueError, "output='half'"),
    (lambda: mp.dynamic_loss_scale(0.0), ValueError, "scale"),
    (lambda: mp.static_loss_scale(float("inf")), ValueError, "scale"),
    (lambda: mp.update(mp.dynamic_loss_scale(), True, growth_interval=0), ValueError, "growth_interval"),
    (lambda: mp.update(mp.dynamic_loss_scale(), True, growth_interval=2.0), TypeError, "growth_interval"),
    (lambda: mp.update(mp.dynamic_loss_scale(), True, growth_factor=1.0), ValueError, "growth_factor"),
    (lambda: mp.update(mp.dynamic_loss_scale(), True, backoff_factor=1.0), ValueError, "backoff_factor"),
    (lambda: mp.update(mp.dynamic_loss_scale(), True, backoff_factor=0.0), ValueError, "backoff_factor"),
    (lambda: mp.update(mp.dynamic_loss_scale(), True, min_scale=-1.0), ValueError, "min_scale"),
    (lambda: mp.update(mp.NoOpLossScale(), True, growth_factor=0.5), ValueError, "growth_factor"),
])
def test_errors_name_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()
