"""SSM layers: shapes, dtypes, parameter counts, inits, parallel/conv mode == recurrent mode, and a
float64 NumPy reference of the Mamba mixer."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.nn.ssm import LRULayer, MambaBlock, ResidualBlock, S4DLayer, S4Layer


def _n_params(module):
    return sum(p.size for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _make(factory):
    """Builds a module under `nnx.jit` (one compilation instead of many eager ones)."""
    return nnx.jit(factory)()


def _apply(module, fn, *args):
    """fn(module, *args) jitted (the module split into graphdef and state)."""
    graphdef, params = nnx.split(module)
    return jax.jit(lambda p, *a: fn(nnx.merge(graphdef, p), *a))(params, *args)


def _call(module, *args):
    return _apply(module, lambda m, *a: m(*a), *args)


def _run_steps(layer, x, state=None):
    """The layer's recurrent form over x (batch, L, ...) by `lax.scan` of `step`, jitted once."""
    graphdef, params = nnx.split(layer)

    @jax.jit
    def run(params, x, state):
        model = nnx.merge(graphdef, params)

        def body(s, x_t):
            y, s = model.step(s, x_t)
            return s, y

        state, ys = jax.lax.scan(body, state, jnp.swapaxes(x, 0, 1))
        return jnp.swapaxes(ys, 0, 1), state

    return run(params, x, layer.init_state(x.shape[0]) if state is None else state)


def _x(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("init,discretization", [("lin", "zoh"), ("inv", "bilinear")])
def test_s4d_layer_conv_equals_recurrent_and_shapes(init, discretization):
    H, N, L = 3, 4, 12
    layer = _make(lambda: S4DLayer(H, N, init=init, discretization=discretization, rngs=nnx.Rngs(0)))
    x = _x(1, (2, L, H))
    y = _call(layer, x)
    assert y.shape == (2, L, H) and y.dtype == jnp.float32
    assert _n_params(layer) == H + 2 * H * N + H + H * H + 2 * H * N   # log_step, C, D, W_out, Λ
    np.testing.assert_allclose(_run_steps(layer, x)[0], y, rtol=2e-4, atol=2e-5)
    n = np.arange(N)
    expected = np.pi * n if init == "lin" else 2 * N / np.pi * (2 * N / (2 * n + 1) - 1)   # paper's N = 2 modes
    np.testing.assert_allclose(layer.A_imag.value[0], expected, rtol=1e-6)
    step = np.exp(layer.log_step.value)
    assert np.all((step >= 1e-3) & (step <= 0.1))


def test_s4d_bidirectional_sums_forward_and_reversed_kernels():
    H, N, L = 2, 3, 9
    layer = _make(lambda: S4DLayer(H, N, bidirectional=True, rngs=nnx.Rngs(2)))
    x = _x(3, (1, L, H))
    K = np.asarray(_apply(layer, lambda m: m.kernel(L)), np.float64)
    assert K.shape == (2, H, L)
    u = np.asarray(x, np.float64)
    # Non-causal conv: y_t = Σ_{s<=t} K0_{t-s} u_s + Σ_{s>=t} K1_{s-t} u_s.
    y = np.zeros_like(u)
    for t in range(L):
        for s in range(L):
            if s <= t:
                y[:, t] += K[0, :, t - s] * u[:, s]
            if s >= t:
                y[:, t] += K[1, :, s - t] * u[:, s]
    y = y + np.asarray(layer.D.value) * u
    y = np.asarray(jax.nn.gelu(y)) @ np.asarray(layer.w_out.value)
    np.testing.assert_allclose(_call(layer, x), y, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no recurrent"):
        layer.step(layer.init_state(1), x[:, 0])


def test_s4_layer_conv_equals_recurrent():
    H, N, L = 2, 4, 10
    layer = _make(lambda: S4Layer(H, N, l_max=L, rngs=nnx.Rngs(4)))
    x = _x(5, (2, L, H))
    y = _call(layer, x)
    assert y.shape == (2, L, H) and y.dtype == jnp.float32
    assert _n_params(layer) == H + 2 * H * N + H + H * H + 6 * H * N   # + Λ, P, B (re, im)
    np.testing.assert_allclose(_run_steps(layer, x)[0], y, rtol=1e-3, atol=1e-4)
    # A shorter input uses the l_max kernel truncated (the layer is causal); a longer one has no C̃.
    np.testing.assert_allclose(_call(layer, x[:, :6]), y[:, :6], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exceeds l_max = 10"):
        _call(layer, _x(5, (1, L + 1, H)))
    # Without l_max, C̃ belongs to each input's length: the kernel is Algorithm 1 at L, and step needs l_max.
    free = _make(lambda: S4Layer(H, N, rngs=nnx.Rngs(4)))
    np.testing.assert_allclose(_call(free, x), y, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="needs l_max"):
        free.step(free.init_state(2), x[:, 0])


def test_s4_layer_gradients_conv_mode_equal_recurrent_mode():
    """d loss / d every parameter by the convolution mode (Cauchy + Woodbury, learned C̃) == by the
    recurrent mode (dense Ā, powers and solves for C = C̃ (I - Ā^L)⁻¹, a scan), at a tiny size."""
    H, N, L = 2, 4, 8
    layer = _make(lambda: S4Layer(H, N, l_max=L, dt_min=0.05, dt_max=0.2, rngs=nnx.Rngs(16)))
    x = _x(17, (2, L, H))
    graphdef, params = nnx.split(layer)

    def loss(p, recurrent):
        model = nnx.merge(graphdef, p)
        if recurrent:
            def body(s, x_t):
                y, s = model.step(s, x_t)
                return s, y
            y = jnp.swapaxes(jax.lax.scan(body, model.init_state(2), jnp.swapaxes(x, 0, 1))[1], 0, 1)
        else:
            y = model(x)
        return jnp.sum(jnp.sin(y))

    grads = jax.jit(jax.grad(loss), static_argnums=1)
    conv, rec = grads(params, False), grads(params, True)
    for (path, g), g_rec in zip(jax.tree_util.tree_leaves_with_path(conv), jax.tree.leaves(rec), strict=True):
        np.testing.assert_allclose(g, g_rec, rtol=1e-4, atol=1e-4 * np.abs(g).max(), err_msg=str(path))


def test_s4_stack_train_step_is_lapack_free_and_fast():
    """Two S4 layers at the digits size (H = N = L = 64): the jitted gradient calls no LAPACK routine and
    compiles and runs in seconds. (Before: a dense (H, N, N) LU per layer formed C̃; jaxlib 0.10's batched
    CPU LU waits on the thread pool it runs on, and the two layers' LUs deadlocked a 2-core CPU.)"""
    layers = _make(lambda: nnx.List([S4Layer(64, 64, l_max=64, rngs=nnx.Rngs(i)) for i in range(2)]))
    graphdef, params = nnx.split(layers)
    x = _x(18, (4, 64, 64))

    def loss(p):
        h = x
        for layer in nnx.merge(graphdef, p):
            h = h + layer(h)
        return jnp.mean(h ** 2)

    start = time.perf_counter()
    lowered = jax.jit(jax.grad(loss)).lower(params)
    assert "lapack" not in lowered.as_text()
    grads = jax.block_until_ready(lowered.compile()(params))
    assert time.perf_counter() - start < 60
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_s4_stack_steps_under_jit_with_unbatched_lapack_calls():
    """Four S4 layers stepped in one jitted program: on CPU every LAPACK call of the recurrent setup is
    unbatched (one channel at a time), and it runs. (Before: each layer's batched (H, N, N) solves; with
    a stack, jaxlib 0.10's batched CPU LAPACK kernels deadlocked the 2-core CPU.)"""
    layers = _make(lambda: nnx.List([S4Layer(64, 64, l_max=64, rngs=nnx.Rngs(i)) for i in range(4)]))
    graphdef, params = nnx.split(layers)

    def step(p, states, x):
        new_states = []
        for layer, state in zip(nnx.merge(graphdef, p), states):
            x, state = layer.step(state, x)
            new_states.append(state)
        return x, new_states

    states = [layer.init_state(2) for layer in layers]
    x = _x(19, (2, 64))
    lowered = jax.jit(step).lower(params, states, x)
    calls = [line for line in lowered.as_text().splitlines() if "@lapack_" in line]
    assert calls and all('num_batch_dims = "0"' in line for line in calls)
    start = time.perf_counter()
    y, _ = jax.block_until_ready(lowered.compile()(params, states, x))
    assert time.perf_counter() - start < 60 and np.isfinite(y).all()
    expected = x
    for layer, state in zip(layers, states):  # eagerly, layer by layer
        expected, _ = layer.step(state, expected)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_lru_layer_parallel_chunked_recurrent():
    H, N, L = 3, 5, 11
    layer = _make(lambda: LRULayer(H, N, r_min=0.5, r_max=0.95, rngs=nnx.Rngs(6)))
    x = _x(7, (2, L, H))
    y = _call(layer, x)
    assert y.shape == (2, L, H) and _n_params(layer) == 3 * N + 4 * N * H + H
    layer.chunk_size = 4
    np.testing.assert_allclose(_call(layer, x), y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_run_steps(layer, x)[0], y, rtol=1e-5, atol=1e-5)
    radius = np.exp(-np.exp(np.asarray(layer.nu_log.value)))
    assert np.all((radius >= 0.5 - 1e-6) & (radius <= 0.95 + 1e-6))


def _np_mamba(block, x):
    """float64 NumPy loop of the Mamba mixer (Gu & Dao 2023, mamba_simple.Mamba, step by step)."""
    p = {k: np.asarray(v.value, np.float64) for k, v in nnx.state(block, nnx.Param).items()}
    silu = lambda v: v / (1 + np.exp(-v))
    softplus = lambda v: np.log1p(np.exp(v))
    x = np.asarray(x, np.float64)
    b, L, _ = x.shape
    xz = x @ p["in_proj"]
    x_in, z = xz[..., :block.d_inner], xz[..., block.d_inner:]
    A = -np.exp(p["A_log"])
    h = np.zeros((b, block.d_inner, block.d_state))
    R, N = block.dt_rank, block.d_state
    out = np.zeros((b, L, block.d_inner))
    for t in range(L):
        xc = p["conv_bias"].copy()
        for k in range(block.d_conv):       # weight k = d_conv - 1 multiplies the current input
            s = t - (block.d_conv - 1) + k
            if s >= 0:
                xc = xc + p["conv_weight"][k] * x_in[:, s]
        xc = silu(xc)
        dbl = xc @ p["x_proj"]
        delta = softplus(dbl[:, :R] @ p["dt_proj"] + p["dt_bias"])
        B, C = dbl[:, R:R + N], dbl[:, R + N:]
        h = np.exp(delta[..., None] * A) * h + delta[..., None] * B[:, None] * xc[..., None]
        y = np.einsum("bdn,bn->bd", h, C) + p["D"] * xc
        out[:, t] = y * silu(z[:, t])
    return out @ p["out_proj"]


def test_mamba_block_matches_numpy_reference_and_recurrent_form():
    d, N, L = 8, 4, 10
    block = _make(lambda: MambaBlock(d, d_state=N, d_conv=3, expand=2, rngs=nnx.Rngs(8)))
    assert block.dt_rank == 1 and block.d_inner == 16
    x = _x(9, (2, L, d))
    y = _call(block, x)
    assert y.shape == (2, L, d) and y.dtype == jnp.float32
    ref = _np_mamba(block, x)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    y_steps, state = _run_steps(block, x)
    np.testing.assert_allclose(y_steps, ref, rtol=1e-4, atol=1e-5)
    # Prefill from a non-zero state (first 4 tokens by steps, the rest in parallel) == all by steps.
    _, mid = _run_steps(block, x[:, :4])
    y_rest, end = _call(block, x[:, 4:], mid)
    np.testing.assert_allclose(y_rest, ref[:, 4:], rtol=1e-4, atol=1e-5)
    for key in ("conv", "ssm"):
        np.testing.assert_allclose(end[key], state[key], rtol=1e-4, atol=1e-5)
    block.chunk_size = 3
    np.testing.assert_allclose(_call(block, x), y, rtol=1e-5, atol=1e-6)


def test_mamba_block_init_and_parameter_count():
    d, N, conv, di, R = 32, 8, 4, 64, 2
    block = _make(lambda: MambaBlock(d, d_state=N, d_conv=conv, dt_min=0.002, dt_max=0.05, rngs=nnx.Rngs(10)))
    assert block.dt_rank == R
    expected = d * 2 * di + conv * di + di + di * (R + 2 * N) + R * di + di + di * N + di + di * d
    assert _n_params(block) == expected
    dt = np.asarray(jax.nn.softplus(block.dt_bias.value))
    assert np.all((dt >= 0.002 * 0.999) & (dt <= 0.05 * 1.001))
    np.testing.assert_allclose(np.exp(block.A_log.value), np.tile(np.arange(1, N + 1), (di, 1)), rtol=1e-6)
    np.testing.assert_array_equal(block.D.value, np.ones(di))
    assert np.abs(block.dt_proj.value).max() <= R ** -0.5


def test_bfloat16_compute_float32_params_and_residual_block():
    block = _make(lambda: MambaBlock(8, d_state=4, dtype=jnp.bfloat16, rngs=nnx.Rngs(11)))
    x = _x(12, (1, 6, 8)).astype(jnp.bfloat16)
    assert _call(block, x).dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(block, nnx.Param)))
    res = _make(lambda: ResidualBlock(S4DLayer(8, 4, rngs=nnx.Rngs(13)), 8, mlp_dim=16, rngs=nnx.Rngs(14)))
    x = _x(15, (2, 7, 8))

    def by_hand(m, x):
        h = x + m.mixer(m.norm(x))
        return h + m.mlp(m.mlp_norm(h))

    y = _call(res, x)
    np.testing.assert_allclose(y, _apply(res, by_hand, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_run_steps(res, x)[0], y, rtol=2e-4, atol=2e-5)


def test_bad_shapes_and_options_raise():
    s4d = _make(lambda: S4DLayer(3, 4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"input must be \(batch, length, 3\)"):
        _call(s4d, jnp.zeros((1, 5, 2)))
    with pytest.raises(ValueError, match="x_t must be"):
        _apply(s4d, lambda m, x: m.step(m.init_state(1), x), jnp.zeros((1, 2)))
    mamba = _make(lambda: MambaBlock(8, d_state=2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="input must be"):
        _call(mamba, jnp.zeros((2, 8)))
    with pytest.raises(ValueError, match=r"init='legs' is not valid; choose one of \['lin', 'inv'\]"):
        S4DLayer(3, 4, init="legs", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dt_min"):
        S4DLayer(3, 4, dt_min=0.1, dt_max=0.01, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dt_rank"):
        MambaBlock(8, dt_rank=0, rngs=nnx.Rngs(0))


def test_mamba_block_scan_implementations_agree():
    x = jnp.asarray(np.random.default_rng(12).standard_normal((2, 6, 8)), jnp.float32)
    outputs = {}
    for impl in ("associative", "chunked", "fused"):  # fused: the Pallas kernel, interpreted on CPU
        block = MambaBlock(8, d_state=4, scan_implementation=impl, rngs=nnx.Rngs(13))
        outputs[impl] = block(x)
    for impl in ("chunked", "fused"):
        np.testing.assert_allclose(outputs[impl], outputs["associative"], rtol=1e-5, atol=1e-5, err_msg=impl)
    with pytest.raises(ValueError, match=r"scan_implementation='cuda' is not valid; "
                                         r"choose one of \[None, 'associative', 'chunked', 'fused', 'ssd'\]"):
        MambaBlock(8, scan_implementation="cuda", rngs=nnx.Rngs(0))


def test_mamba_block_scalar_a_with_the_ssd_scan():
    """scalar_A: A_log (d_inner, 1) from log U[1, 16]; the "ssd" scan equals the associative one, the recurrent
    form and a prefill from a state."""
    d, N, L = 8, 4, 10
    block = _make(lambda: MambaBlock(d, d_state=N, d_conv=3, scalar_A=True, scan_implementation="ssd",
                                     rngs=nnx.Rngs(14)))
    A = np.exp(np.asarray(block.A_log.value))
    assert A.shape == (16, 1) and np.all((A >= 1) & (A <= 16)) and np.unique(A).size == 16
    full = _make(lambda: MambaBlock(d, d_state=N, d_conv=3, rngs=nnx.Rngs(14)))
    assert _n_params(full) - _n_params(block) == 16 * (N - 1)
    x = _x(15, (2, L, d))
    y = _call(block, x)
    block.scan_implementation = "associative"
    np.testing.assert_allclose(y, _call(block, x), rtol=1e-5, atol=1e-6)
    y_steps, state = _run_steps(block, x)
    np.testing.assert_allclose(y_steps, y, rtol=1e-4, atol=1e-5)
    _, mid = _run_steps(block, x[:, :4])
    y_rest, end = _call(block, x[:, 4:], mid)
    np.testing.assert_allclose(y_rest, y[:, 4:], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(end["ssm"], state["ssm"], rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="scalar_A must be a bool, got 1"):
        MambaBlock(d, scalar_A=1, rngs=nnx.Rngs(0))
