"""jaxmodels.ops.moe against per-token loops (float64 NumPy or naive JAX), hand-made capacity cases,
the papers' loss formulas, and expert parallelism on 8 fake CPU devices (tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from jaxmodels.ops import moe


def _rng(seed):
    return np.random.default_rng(seed)


def _weights(seed, E, d, f, scale=0.5):
    rng = _rng(seed)
    return tuple(jnp.asarray(rng.normal(size=s) * scale, jnp.float32) for s in ((E, d, f), (E, d, f), (E, f, d)))


def _np_swiglu(x, wg, wu, wd):
    g = x @ wg
    return (g / (1 + np.exp(-g)) * (x @ wu)) @ wd


def _np_priority_positions(gates, experts, E, priority):
    """Slot of every assignment (t, j) by walking the assignments in priority order, -1 if none."""
    T, k = experts.shape
    tokens = range(T) if priority == "slot" else sorted(range(T), key=lambda t: (-gates[t].max(), t))
    filled, pos = [0] * E, -np.ones((T, k), int)
    for j in range(k):
        for t in tokens:
            pos[t, j] = filled[experts[t, j]]
            filled[experts[t, j]] += 1
    return pos


def _np_dispatch_combine(gates, experts, E, C, priority):
    T, k = experts.shape
    pos = _np_priority_positions(gates, experts, E, priority)
    dispatch, combine = np.zeros((T, E, C), bool), np.zeros((T, E, C))
    for t in range(T):
        for j in range(k):
            if pos[t, j] < C:
                dispatch[t, experts[t, j], pos[t, j]] = True
                combine[t, experts[t, j], pos[t, j]] = gates[t, j]
    return dispatch, combine


def _np_moe(x, gates, experts, kept, w):
    """float64 y_t = Σ_{kept (t, j)} gates[t, j] * SwiGLU_{experts[t, j]}(x_t), one token at a time."""
    x, gates = np.asarray(x, np.float64), np.asarray(gates, np.float64)
    w = [np.asarray(a, np.float64) for a in w]
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            if kept[t, j]:
                e = experts[t, j]
                y[t] += gates[t, j] * _np_swiglu(x[t], w[0][e], w[1][e], w[2][e])
    return y


def _loop_moe(x, gates, experts, w_gate, w_up, w_down):
    """Naive JAX loop over tokens and choices (no dropping), differentiable: the gradient oracle."""
    rows = []
    for t in range(x.shape[0]):
        y = 0.0
        for j in range(experts.shape[1]):
            e = int(experts[t, j])
            y = y + gates[t, j] * (jax.nn.silu(x[t] @ w_gate[e]) * (x[t] @ w_up[e])) @ w_down[e]
        rows.append(y)
    return jnp.stack(rows)


_capacity_dispatch = jax.jit(moe.capacity_dispatch, static_argnums=(2, 3), static_argnames=("priority",))


def _random_routing(seed, T, E, k):
    rng = _rng(seed)
    logits = jnp.asarray(rng.normal(size=(T, E)) * 2, jnp.float32)
    return moe.top_k_routing(logits, k, normalize=True)


# ------------------------------------------------------------------------------------------------
# routers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,E,k,normalize", [(7, 4, 1, False), (9, 5, 2, True), (6, 8, 3, False)])
def test_top_k_routing_matches_numpy(T, E, k, normalize):
    logits = _rng(T * E + k).normal(size=(T, E)).astype(np.float32)
    gates, experts, probs = moe.top_k_routing(jnp.asarray(logits), k, normalize=normalize)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    idx = np.argsort(-p, axis=1)[:, :k]
    g = np.take_along_axis(p, idx, 1)
    if normalize:
        g /= g.sum(1, keepdims=True)
    assert gates.dtype == probs.dtype == jnp.float32 and experts.dtype == jnp.int32
    np.testing.assert_array_equal(experts, idx)
    np.testing.assert_allclose(gates, g, rtol=1e-5)
    np.testing.assert_allclose(probs, p, rtol=1e-5)
    check_grads(jax.jit(lambda l: moe.top_k_routing(l, k, normalize=normalize).gates), (jnp.asarray(logits),), order=1,
                modes=("rev",), atol=1e-2, rtol=1e-2)


def test_noisy_top_k_matches_formula_and_is_key_driven():
    T, E, k = 16, 6, 2
    rng = _rng(3)
    logits, noise_logits = (jnp.asarray(rng.normal(size=(T, E)), jnp.float32) for _ in range(2))
    key = jax.random.key(5)
    gates, experts, probs = moe.noisy_top_k_routing(logits, noise_logits, k, key=key)
    eps = np.asarray(jax.random.normal(key, (T, E), jnp.float32), np.float64)
    H = np.asarray(logits, np.float64) + eps * np.log1p(np.exp(np.asarray(noise_logits, np.float64)))
    idx = np.argsort(-H, axis=1)[:, :k]
    kept = np.take_along_axis(H, idx, 1)
    G = np.exp(kept - kept.max(1, keepdims=True))  # softmax over the kept entries only
    np.testing.assert_array_equal(experts, idx)
    np.testing.assert_allclose(gates, G / G.sum(1, keepdims=True), rtol=1e-5)
    again = moe.noisy_top_k_routing(logits, noise_logits, k, key=jax.random.key(5))
    np.testing.assert_array_equal(again.experts, experts)
    np.testing.assert_array_equal(again.gates, gates)
    other = moe.noisy_top_k_routing(logits, noise_logits, k, key=jax.random.key(6))
    assert np.any(np.asarray(other.experts) != np.asarray(experts))
    silent = moe.noisy_top_k_routing(logits, jnp.full((T, E), -30.0), k, key=key)  # softplus(-30) ~ 0: no noise
    np.testing.assert_array_equal(silent.experts, moe.top_k_routing(logits, k).experts)


@pytest.mark.parametrize("T,E,C", [(10, 4, 3), (5, 3, 5)])
def test_expert_choice_each_expert_takes_its_top_capacity_tokens(T, E, C):
    logits = _rng(T + E + C).normal(size=(T, E)).astype(np.float32)
    dispatch, combine, probs = moe.expert_choice_routing(jnp.asarray(logits), C)
    assert dispatch.shape == combine.shape == (T, E, C) and dispatch.dtype == jnp.bool_
    d = np.asarray(dispatch)
    np.testing.assert_array_equal(d.sum(axis=(0, 2)), C)  # every expert: exactly C tokens
    np.testing.assert_array_equal(d.sum(axis=0), 1)  # every slot holds exactly one token
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for e in range(E):
        order = np.argsort(-p[:, e], kind="stable")[:C]
        for c, t in enumerate(order):
            assert d[t, e, c]
            np.testing.assert_allclose(combine[t, e, c], p[t, e], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(combine).sum(), sum(np.sort(p[:, e])[-C:].sum() for e in range(E)),
                               rtol=1e-5)
    check_grads(jax.jit(lambda l: moe.expert_choice_routing(l, C)[1]), (jnp.asarray(logits),), order=1, modes=("rev",),
                atol=1e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------------------
# capacity and dropping
# ------------------------------------------------------------------------------------------------


def test_expert_capacity_formula_and_errors():
    assert moe.expert_capacity(64, 8, 2, 1.0) == 16
    assert moe.expert_capacity(64, 8, 1, 1.25) == 10
    assert moe.expert_capacity(10, 4, 1, 1.0) == 3  # ceil(2.5)
    assert moe.expert_capacity(8, 10, 1, 1.25) == 1  # 1.25 * 8 / 10 = 1 exactly despite float rounding
    assert moe.expert_capacity(12, 4, 2, 2.0) == 12  # capacity_factor = E / k: C = T
    with pytest.raises(ValueError, match=r"expert capacity .* = 0 < 1"):
        moe.expert_capacity(8, 4, 1, 0.0)
    with pytest.raises(ValueError, match="num_tokens must be a positive int"):
        moe.expert_capacity(0, 4, 1, 1.0)


def test_capacity_dispatch_hand_made_slot_and_gate_priority():
    # 4 tokens, 3 experts, k = 2, C = 2.
    experts = jnp.array([[0, 1], [0, 2], [0, 1], [1, 0]], jnp.int32)
    gates = jnp.array([[0.6, 0.4], [0.5, 0.3], [0.9, 0.1], [0.7, 0.2]], jnp.float32)
    # slot: first choices t0->0@0, t1->0@1, t2->0 dropped, t3->1@0; then t0->1@1, t1->2@0, t2->1 and t3->0 dropped.
    dispatch, combine = _capacity_dispatch(gates, experts, 3, 2)
    kept = {(0, 0, 0), (1, 0, 1), (3, 1, 0), (0, 1, 1), (1, 2, 0)}
    assert {tuple(i) for i in np.argwhere(np.asarray(dispatch))} == kept
    assert combine[0, 1, 1] == np.float32(0.4) and combine[1, 2, 0] == np.float32(0.3)
    assert float(moe.dropped_fraction(dispatch, 2)) == pytest.approx(3 / 8)
    assert float(moe.unrouted_fraction(dispatch)) == pytest.approx(1 / 4)  # token 2 got nothing
    # gate (V-MoE BPR): token order by max gate t2, t3, t0, t1: t2->0@0, t3->1@0, t0->0@1, t1->0 dropped;
    # then t2->1@1, t3->0 dropped, t0->1 dropped, t1->2@0.
    dispatch, _ = _capacity_dispatch(gates, experts, 3, 2, priority="gate")
    kept = {(2, 0, 0), (3, 1, 0), (0, 0, 1), (2, 1, 1), (1, 2, 0)}
    assert {tuple(i) for i in np.argwhere(np.asarray(dispatch))} == kept
    assert float(moe.dropped_fraction(dispatch, 2)) == pytest.approx(3 / 8)


@pytest.mark.parametrize("T,E,k,C", [(12, 4, 2, 3), (9, 3, 1, 2), (10, 5, 3, 4)])
def test_capacity_dispatch_matches_numpy_loop(T, E, k, C):
    gates, experts, _ = _random_routing(T * E + k + C, T, E, k)
    for priority in moe.PRIORITIES:
        dispatch, combine = _capacity_dispatch(gates, experts, E, C, priority=priority)
        d_ref, c_ref = _np_dispatch_combine(np.asarray(gates, np.float64), np.asarray(experts), E, C, priority)
        np.testing.assert_array_equal(dispatch, d_ref)
        np.testing.assert_allclose(combine, c_ref, rtol=1e-6)
        assert float(moe.dropped_fraction(dispatch, k)) == pytest.approx(1 - d_ref.sum() / (T * k))
        assert 0 < d_ref.sum() < T * k  # some dropped, some kept
        np.testing.assert_array_less(np.asarray(dispatch).sum(axis=(0, 2)), C + 1)  # no expert above capacity


# ------------------------------------------------------------------------------------------------
# experts: einsum form, grouped matmul, dropless form
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,E,k,C,d,f", [(10, 4, 2, 3, 6, 5), (8, 3, 1, 2, 4, 7)])
def test_moe_einsum_matches_per_token_loop(T, E, k, C, d, f):
    gates, experts, _ = _random_routing(T + C, T, E, k)
    w = _weights(T, E, d, f)
    x = jnp.asarray(_rng(T + 1).normal(size=(T, d)), jnp.float32)
    dispatch, combine = _capacity_dispatch(gates, experts, E, C)
    y = moe.moe_einsum(x, dispatch, combine, *w)
    kept = _np_priority_positions(np.asarray(gates), np.asarray(experts), E, "slot") < C
    assert not kept.all()  # the case drops something
    np.testing.assert_allclose(y, _np_moe(x, gates, np.asarray(experts), kept, w), rtol=1e-4, atol=1e-5)


def _group_case(seed, sizes, d=5, f=3, extra=2):
    rng = _rng(seed)
    M = sum(sizes) + extra
    x = jnp.asarray(rng.normal(size=(M, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(len(sizes), d, f)), jnp.float32)
    return x, w, jnp.asarray(sizes, jnp.int32)


@pytest.mark.parametrize("sizes", [(3, 0, 5, 1), (4,), (0, 0, 6)])
def test_grouped_matmul_ragged_dot_equals_reference_and_loop(sizes):
    x, w, gs = _group_case(sum(sizes), sizes)
    ref = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for e, n in enumerate(sizes):
        ref[start:start + n] = np.asarray(x[start:start + n], np.float64) @ np.asarray(w[e], np.float64)
        start += n
    for impl in (None, "ragged_dot", "reference"):
        np.testing.assert_allclose(moe.grouped_matmul(x, w, gs, implementation=impl), ref, rtol=1e-5, atol=1e-5)
    ct = jnp.asarray(_rng(1).normal(size=ref.shape), jnp.float32)
    grads = {impl: jax.jit(jax.grad(lambda x, w: jnp.sum(moe.grouped_matmul(x, w, gs, implementation=impl) * ct),
                                    argnums=(0, 1)))(x, w) for impl in ("ragged_dot", "reference")}
    for a, b in zip(grads["ragged_dot"], grads["reference"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    check_grads(jax.jit(lambda x, w: moe.grouped_matmul(x, w, gs)), (x, w), order=1, modes=("rev",),
                atol=1e-2, rtol=1e-2)
    bf16 = moe.grouped_matmul(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), gs)
    assert bf16.dtype == jnp.bfloat16


def test_sort_by_expert_groups_in_token_order():
    experts = jnp.array([[2, 0], [0, 1], [2, 1]], jnp.int32)
    order, sizes = moe.sort_by_expert(experts, 4)
    np.testing.assert_array_equal(order, [1, 2, 3, 5, 0, 4])  # flat index t * k + j
    np.testing.assert_array_equal(sizes, [2, 2, 2, 0])


@pytest.mark.parametrize("T,E,k,loop", [(4, 4, 2, True), (7, 6, 3, False)])
def test_dropless_equals_einsum_without_drops_and_loop_gradients(T, E, k, loop):
    """Values against the float64 loop; gradients of every form against the naive JAX loop (small case)
    or against each other (the einsum and grouped forms share no code but the SwiGLU)."""
    d, f = 4, 6
    gates, experts, _ = _random_routing(T * k, T, E, k)
    w = _weights(E, E, d, f)
    x = jnp.asarray(_rng(T).normal(size=(T, d)), jnp.float32)
    ct = jnp.asarray(_rng(T + 7).normal(size=(T, d)), jnp.float32)

    def einsum_form(x, gates, *w):  # C = T: nothing can drop
        return moe.moe_einsum(x, *moe.capacity_dispatch(gates, experts, E, T), *w)

    forms = {"einsum": einsum_form}
    if loop:
        forms["loop"] = lambda x, g, *w: _loop_moe(x, g, np.asarray(experts), *w)
    for impl in ("ragged_dot", "reference"):
        forms[impl] = lambda x, g, *w, impl=impl: moe.moe_dropless(x, g, experts, *w, implementation=impl)
    ref = _np_moe(x, gates, np.asarray(experts), np.ones((T, k), bool), w)

    @jax.jit
    def values_and_grads(x, gates, *w):  # one compilation for every form
        return {name: jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * ct), argnums=tuple(range(5)))(x, gates, *w)
                + (fn(x, gates, *w),) for name, fn in forms.items()}

    out = values_and_grads(x, gates, *w)
    for name, (_, grads, y) in out.items():
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5, err_msg=name)
        for a, b in zip(grads, out["loop" if loop else "einsum"][1]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


# ------------------------------------------------------------------------------------------------
# losses and metrics
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_load_balancing_loss_is_one_at_perfect_balance(k):
    E, T = 4, 8
    probs = jnp.full((T, E), 1 / E)
    experts = jnp.asarray([[(t + j) % E for j in range(k)] for t in range(T)], jnp.int32)  # each expert T k / E times
    assert float(moe.load_balancing_loss(probs, experts)) == pytest.approx(1.0)


def test_load_balancing_loss_hand_made_and_gradient():
    probs = jnp.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1]], jnp.float32)
    experts = jnp.array([[0, 1], [0, 1], [2, 0], [0, 1]], jnp.int32)
    f = np.array([4, 3, 1]) / 8
    P_ = np.asarray(probs).mean(0)
    assert float(moe.load_balancing_loss(probs, experts)) == pytest.approx(3 * np.sum(f * P_), rel=1e-6)
    top1 = float(moe.load_balancing_loss(probs, experts[:, :1]))
    assert top1 == pytest.approx(3 * np.sum(np.array([3, 0, 1]) / 4 * P_))
    grad = jax.jit(jax.grad(moe.load_balancing_loss))(probs, experts)
    np.testing.assert_allclose(grad, np.broadcast_to(3 * f / 4, (4, 3)), rtol=1e-6)  # dL/dp_ti = N f_i / T
    np.testing.assert_allclose(moe.expert_load(experts, 3), f)


def test_router_z_loss_and_entropy_formulas():
    logits = _rng(0).normal(size=(7, 5)) * 3
    z = np.log(np.exp(logits).sum(1))
    z_loss = float(jax.jit(moe.router_z_loss)(jnp.asarray(logits, jnp.float32)))
    assert z_loss == pytest.approx(np.mean(z ** 2), rel=1e-5)
    p = np.exp(logits - z[:, None])
    grad = jax.jit(jax.grad(moe.router_z_loss))(jnp.asarray(logits, jnp.float32))
    np.testing.assert_allclose(grad, 2 * z[:, None] * p / len(z), rtol=1e-4, atol=1e-6)  # d z_t / d l_ti = p_ti
    assert float(jax.jit(moe.routing_entropy)(jnp.asarray(p, jnp.float32))) == pytest.approx(
        np.mean(-(p * np.log(p)).sum(1)), rel=1e-5)
    assert float(moe.routing_entropy(jnp.full((3, 4), 0.25))) == pytest.approx(np.log(4), rel=1e-6)
    assert float(moe.routing_entropy(jnp.eye(4))) == 0.0


def test_moe_flops_per_token():
    assert moe.moe_flops_per_token(512, 1024, 2, 1) == 6 * 512 * 1024 * 3


# ------------------------------------------------------------------------------------------------
# expert parallelism (8 fake CPU devices)
# ------------------------------------------------------------------------------------------------


@pytest.mark.devices(8)
@pytest.mark.parametrize("E,C", [(8, 2), (16, 12)])
def test_expert_parallel_equals_single_device(E, C):
    n, T_local, k, d, f = 8, 6, 2, 4, 5
    mesh = jax.make_mesh((n,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
    T = n * T_local
    gates, experts, _ = _random_routing(E + C, T, E, k)
    w = _weights(E + 1, E, d, f)
    x = jnp.asarray(_rng(E).normal(size=(T, d)), jnp.float32)
    ct = jnp.asarray(_rng(E + 2).normal(size=(T, d)), jnp.float32)

    def parallel(x, gates, *w):
        fn = jax.shard_map(lambda x, g, e, *w: moe.expert_parallel_moe(x, g, e, *w, axis_name="expert", capacity=C),
                           mesh=mesh, in_specs=P("expert"), out_specs=P("expert"))
        return fn(x, gates, experts, *w)

    def per_group(x, gates, *w):  # the unsharded layer applied to each device's tokens (its GShard group)
        def group(x, g, e):
            return moe.moe_einsum(x, *moe.capacity_dispatch(g, e, E, C), *w)
        split = lambda a: a.reshape(n, T_local, -1)
        return jax.vmap(group)(split(x), split(gates), split(experts)).reshape(T, d)

    y = jax.jit(parallel)(x, gates, *w)
    np.testing.assert_allclose(y, jax.jit(per_group)(x, gates, *w), rtol=1e-5, atol=1e-5)
    g_par = jax.jit(jax.grad(lambda *a: jnp.sum(parallel(*a) * ct), argnums=tuple(range(5))))(x, gates, *w)
    g_ref = jax.jit(jax.grad(lambda *a: jnp.sum(per_group(*a) * ct), argnums=tuple(range(5))))(x, gates, *w)
    for a, b in zip(g_par, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    if C >= T_local:  # nothing dropped: equal to the dropless layer over all T tokens at once
        np.testing.assert_allclose(y, moe.moe_dropless(x, gates, experts, *w), rtol=1e-4, atol=1e-5)
    else:
        assert not np.allclose(y, moe.moe_dropless(x, gates, experts, *w), atol=1e-3)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def test_clear_errors():
    logits = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, num_experts=3\], got 4"):
        moe.top_k_routing(logits, 4)
    with pytest.raises(ValueError, match=r"logits must be \(num_tokens, num_experts\)"):
        moe.top_k_routing(jnp.zeros((2, 4, 3)), 1)
    with pytest.raises(ValueError, match="noise_logits must have the shape"):
        moe.noisy_top_k_routing(logits, jnp.zeros((4, 2)), 1, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"capacity must be an int in \[1, num_tokens=4\], got 5"):
        moe.expert_choice_routing(logits, 5)
    gates, experts = jnp.ones((4, 2)), jnp.zeros((4, 2), jnp.int32)
    with pytest.raises(ValueError, match="capacity must be a positive int, got 0"):
        moe.capacity_dispatch(gates, experts, 3, 0)
    with pytest.raises(ValueError, match="gates and experts must both be"):
        moe.capacity_dispatch(gates, experts[:, :1], 3, 2)
    with pytest.raises(ValueError, match="k must be an int"):
        moe.capacity_dispatch(jnp.ones((4, 4)), jnp.zeros((4, 4), jnp.int32), 3, 2)
    with pytest.raises(ValueError, match="priority='random' is not valid; choose one of \\['slot', 'gate'\\]"):
        moe.capacity_dispatch(gates, experts, 3, 2, priority="random")
    with pytest.raises(TypeError, match="experts must be integer"):
        moe.capacity_dispatch(gates, gates, 3, 2)
    x, w, gs = _group_case(0, (2, 3))
    with pytest.raises(ValueError, match=r"implementation='triton' is not valid; "
                                         r"choose one of \[None, 'reference', 'ragged_dot', 'pallas'\]"):
        moe.grouped_matmul(x, w, gs, implementation="triton")
    with pytest.raises(ValueError, match=r"expected x_sorted \(M, d\), w \(E, d, f\)"):
        moe.grouped_matmul(x[:, :2], w, gs)
    w3 = _weights(0, 3, 4, 5)
    with pytest.raises(ValueError, match=r"w_down \(E, f, d\) with d = x.shape\[-1\] = 6"):
        moe.moe_dropless(jnp.zeros((4, 6)), gates, experts, *w3)
    with pytest.raises(ValueError, match=r"dispatch and combine must be \(T, E, C\)"):
        moe.moe_einsum(jnp.zeros((4, 4)), jnp.zeros((4, 2, 2), bool), jnp.zeros((4, 2, 2)), *w3)


def test_permute_rows_values_and_gather_gradient():
    rng = np.random.default_rng(7)
    order = jnp.asarray(rng.permutation(12), jnp.int32)
    inverse = moe.inverse_permutation(order)
    np.testing.assert_array_equal(np.asarray(inverse)[np.asarray(order)], np.arange(12))
    x = jnp.asarray(rng.standard_normal((12, 5)), jnp.float32)
    np.testing.assert_array_equal(moe.permute_rows(x, order, inverse), np.asarray(x)[np.asarray(order)])
    ct = jnp.asarray(rng.standard_normal((12, 5)), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(moe.permute_rows(x, order, inverse) * ct))(x)
    np.testing.assert_array_equal(grad, jax.grad(lambda x: jnp.sum(x[order] * ct))(x))


def _expert_weights(E=3, d=4, f=5, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((E, d, f), (E, d, f), (E, f, d)))


@pytest.mark.parametrize("bad", [3, -1])
def test_expert_ids_out_of_range_are_refused_when_concrete(bad):
    experts = jnp.array([[0, 1], [2, bad]], jnp.int32)
    gates = jnp.full((2, 2), 0.5)
    x = jnp.ones((2, 4))
    calls = {"capacity_dispatch": lambda: moe.capacity_dispatch(gates, experts, 3, 2),
             "sort_by_expert": lambda: moe.sort_by_expert(experts, 3),
             "expert_load": lambda: moe.expert_load(experts, 3),
             "moe_dropless": lambda: moe.moe_dropless(x, gates, experts, *_expert_weights())}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"experts must hold values in \[0, 3\)"):
            call()
            pytest.fail(f"{name} accepted expert id {bad}")


def test_expert_ids_out_of_range_under_jit_are_dropped():
    """Under a trace the ids cannot be refused; the documented behaviour: the assignment is dropped."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4)), jnp.float32)
    gates = jnp.array([[0.6, 0.4], [0.7, 0.3]])
    bad, valid = jnp.array([[0, 1], [2, 7]], jnp.int32), jnp.array([[0, 1], [2, 0]], jnp.int32)
    weights = _expert_weights()
    load = jax.jit(moe.expert_load, static_argnums=1)(jnp.array([[0, -1], [2, 7]]), 3)
    np.testing.assert_allclose(load, [0.25, 0.0, 0.25])
    dispatch, combine = jax.jit(moe.capacity_dispatch, static_argnums=(2, 3))(gates, bad, 3, 2)
    assert int(dispatch[1].sum()) == 1 and dispatch[1, 2].any()  # token 1 keeps only its valid expert, 2
    out = jax.jit(moe.moe_dropless)(x, gates, bad, *weights)
    dropped_gates = gates.at[1, 1].set(0.0)  # the same tokens with the bad assignment's weight zeroed
    np.testing.assert_allclose(out, moe.moe_dropless(x, dropped_gates, valid, *weights), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sizes", [[-1, 3], [3, 2]])
def test_grouped_matmul_refuses_bad_group_sizes(sizes):
    x, w = jnp.ones((4, 2)), jnp.ones((2, 2, 3))
    with pytest.raises(ValueError, match=r"group_sizes must be >= 0 and sum to at most M = 4"):
        moe.grouped_matmul(x, w, jnp.array(sizes, jnp.int32))


@pytest.mark.parametrize("implementation", ["reference", "ragged_dot"])
def test_grouped_matmul_clamps_traced_group_sizes(implementation):
    """Under jit: a negative size counts as 0, groups are cut at row M."""
    rng = np.random.default_rng(2)
    x, w = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32), jnp.asarray(rng.normal(size=(2, 2, 3)), jnp.float32)
    gmm = jax.jit(lambda s: moe.grouped_matmul(x, w, s, implementation=implementation))
    np.testing.assert_allclose(gmm(jnp.array([-1, 3], jnp.int32)), gmm(jnp.array([0, 3], jnp.int32)), rtol=1e-6)
    np.testing.assert_allclose(gmm(jnp.array([3, 2], jnp.int32)), gmm(jnp.array([3, 1], jnp.int32)), rtol=1e-6)
