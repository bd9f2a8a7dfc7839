import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmodels.ops import dispatch
from jaxmodels.ops.scan import (
    chunked_linear_recurrence,
    linear_recurrence,
    segsum,
    selective_scan,
    selective_scan_init_state,
    selective_scan_step,
)


def _np_recurrence(a, b, reverse=False):
    """float64 loop: h_t = a_t h_{t-1} + b_t (or h_t = a_t h_{t+1} + b_t right to left), zero start."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a = np.broadcast_to(a, b.shape)
    h = np.zeros_like(b)
    prev = np.zeros_like(b[:, 0])
    order = range(b.shape[1] - 1, -1, -1) if reverse else range(b.shape[1])
    for t in order:
        prev = a[:, t] * prev + b[:, t]
        h[:, t] = prev
    return h


def _ab(seed, shape, a_shape=None, dtype=np.float32):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 1.0, a_shape or shape).astype(dtype)
    b = rng.standard_normal(shape).astype(dtype)
    return a, b


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape,a_shape", [((2, 13), None), ((2, 17, 3, 4), None), ((2, 9, 3, 4), (1, 9, 3, 1))])
def test_linear_recurrence_matches_loop(shape, a_shape, reverse):
    a, b = _ab(0, shape, a_shape)
    out = linear_recurrence(a, b, reverse=reverse)
    assert out.shape == b.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _np_recurrence(a, b, reverse), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 5, 16, 100])
def test_chunked_linear_recurrence_matches_loop(chunk_size, reverse):
    a, b = _ab(1, (2, 16, 3), (2, 16, 1))
    out = chunked_linear_recurrence(a, b, chunk_size=chunk_size, reverse=reverse)
    assert out.shape == b.shape
    np.testing.assert_allclose(out, _np_recurrence(a, b, reverse), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, linear_recurrence(a, b, reverse=reverse), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_recurrence_gradients_float64(reverse):
    a, b = _ab(2, (1, 5, 2), dtype=np.float64)
    with jax.enable_x64(True):
        a, b = jnp.asarray(a), jnp.asarray(b)
        check_grads(lambda a, b: linear_recurrence(a, b, reverse=reverse), (a, b), order=1, modes=("rev",),
                    atol=1e-6, rtol=1e-6)
        check_grads(lambda a, b: chunked_linear_recurrence(a, b, chunk_size=2, reverse=reverse), (a, b),
                    order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_recurrence_errors():
    with pytest.raises(ValueError, match="broadcast"):
        linear_recurrence(jnp.ones((2, 4, 3)), jnp.ones((2, 5, 3)))
    with pytest.raises(ValueError, match="broadcast"):
        linear_recurrence(jnp.ones((2, 4, 3)), jnp.ones((2, 4, 1)))  # a must not grow b
    with pytest.raises(ValueError, match="2-D"):
        linear_recurrence(jnp.ones(4), jnp.ones(4))
    for bad, error in ((0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError), (None, TypeError)):
        with pytest.raises(error, match=f"chunk_size must be a positive int, got {bad!r}"):
            chunked_linear_recurrence(jnp.ones((1, 4)), jnp.ones((1, 4)), chunk_size=bad)


# ---- selective scan ----

def _np_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """float64, one (batch, position, channel) at a time, from Gu & Dao 2023, Alg. 2 / selective_scan_ref."""
    u, delta, A, B, C = (np.asarray(x, np.float64) for x in (u, delta, A, B, C))
    batch, length, d_inner = u.shape
    n_state = B.shape[-1]
    A = np.broadcast_to(A, (d_inner, n_state))  # A (d_inner, 1): one scalar per channel
    if B.ndim == 3:
        B = B[:, :, None]
    if C.ndim == 3:
        C = C[:, :, None]
    if delta_bias is not None:
        delta = delta + np.asarray(delta_bias, np.float64)
    if delta_softplus:
        delta = np.log1p(np.exp(delta))
    y = np.zeros((batch, length, d_inner))
    h = np.zeros((batch, d_inner, n_state))
    for b in range(batch):
        for c in range(d_inner):
            gb = c // (d_inner // B.shape[2])
            gc = c // (d_inner // C.shape[2])
            for t in range(length):
                for n in range(n_state):
                    h[b, c, n] = (np.exp(delta[b, t, c] * A[c, n]) * h[b, c, n]
                                  + delta[b, t, c] * B[b, t, gb, n] * u[b, t, c])
                y[b, t, c] = sum(C[b, t, gc, n] * h[b, c, n] for n in range(n_state))
                if D is not None:
                    y[b, t, c] += float(D[c]) * u[b, t, c]
                if z is not None:
                    zz = float(z[b, t, c])
                    y[b, t, c] *= zz / (1 + np.exp(-zz))
    return y, h


def _ssm_inputs(seed, batch=2, length=7, d_inner=4, n_state=3, groups_b=None, groups_c=None,
                D=False, z=False, delta_bias=False, dtype=np.float32, scalar_a=False):
    rng = np.random.default_rng(seed)

    def bc(groups):
        shape = (batch, length, n_state) if groups is None else (batch, length, groups, n_state)
        return rng.standard_normal(shape).astype(dtype)

    args = dict(
        u=rng.standard_normal((batch, length, d_inner)).astype(dtype),
        delta=rng.uniform(0.05, 0.5, (batch, length, d_inner)).astype(dtype),
        A=-np.exp(rng.standard_normal((d_inner, 1 if scalar_a else n_state))).astype(dtype),
        B=bc(groups_b), C=bc(groups_c))
    if D:
        args["D"] = rng.standard_normal(d_inner).astype(dtype)
    if z:
        args["z"] = rng.standard_normal((batch, length, d_inner)).astype(dtype)
    if delta_bias:
        args["delta_bias"] = rng.uniform(-0.5, 0.5, d_inner).astype(dtype)
    return args


SSM_CASES = {
    "plain": dict(),
    "D": dict(D=True),
    "z": dict(z=True),
    "bias_softplus": dict(delta_bias=True, softplus=True),
    "softplus": dict(softplus=True),
    "groups1": dict(groups_b=1, groups_c=1, D=True),
    "groups2": dict(groups_b=2, groups_c=2, D=True, z=True),
    "mixed_groups": dict(groups_b=2, groups_c=None, D=True, z=True, delta_bias=True, softplus=True),
}


def _case(name, seed, **kw):
    case = dict(SSM_CASES[name])
    softplus = case.pop("softplus", False)
    return _ssm_inputs(seed, **case, **kw), softplus


@pytest.mark.parametrize("name", list(SSM_CASES))
def test_selective_scan_matches_reference(name):
    args, softplus = _case(name, seed=10)
    y, last = selective_scan(**args, delta_softplus=softplus, return_last_state=True)
    y_ref, h_ref = _np_selective_scan(**args, delta_softplus=softplus)
    assert y.shape == args["u"].shape and y.dtype == jnp.float32
    assert last.shape == (2, 4, 3) and last.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last, h_ref, rtol=1e-5, atol=1e-5)
    y_only = selective_scan(**args, delta_softplus=softplus)
    np.testing.assert_allclose(y_only, y, rtol=1e-6, atol=1e-6)
    y_chunked = selective_scan(**args, delta_softplus=softplus, chunk_size=3)
    np.testing.assert_allclose(y_chunked, y_ref, rtol=1e-5, atol=1e-5)


def test_selective_scan_dtypes():
    args, _ = _case("groups2", seed=11)
    bf16 = {k: jnp.asarray(v, jnp.bfloat16) if k in ("u", "delta", "z") else v for k, v in args.items()}
    y, last = selective_scan(**bf16, return_last_state=True)
    assert y.dtype == jnp.bfloat16 and last.dtype == jnp.float32
    with jax.enable_x64(True):
        args64 = {k: jnp.asarray(v, jnp.float64) for k, v in args.items()}
        y, last = selective_scan(**args64, return_last_state=True)
        assert y.dtype == jnp.float64 and last.dtype == jnp.float64
        np.testing.assert_allclose(y, _np_selective_scan(**args)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["plain", "groups2", "mixed_groups"])
def test_step_matches_scan(name):
    args, softplus = _case(name, seed=12)
    y_ref, last_ref = selective_scan(**args, delta_softplus=softplus, return_last_state=True)
    state = selective_scan_init_state(2, 4, 3)
    step = jax.jit(selective_scan_step, static_argnames="delta_softplus")
    ys = []
    for t in range(args["u"].shape[1]):
        tok = {k: (v[:, t] if k in ("u", "delta", "z", "B", "C") else v) for k, v in args.items()}
        y, state = step(state, **tok, delta_softplus=softplus)
        ys.append(y)
    np.testing.assert_allclose(jnp.stack(ys, 1), y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state, last_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["bias_softplus", "groups2"])
def test_selective_scan_gradients_float64(name):
    args, softplus = _case(name, seed=13, batch=1, length=4, d_inner=2, n_state=2, dtype=np.float64)
    keys = ("u", "delta", "A", "B", "C")
    rest = {k: v for k, v in args.items() if k not in keys}
    with jax.enable_x64(True):
        rest = {k: jnp.asarray(v) for k, v in rest.items()}

        def f(u, delta, A, B, C):
            y, last = selective_scan(u, delta, A, B, C, **rest, delta_softplus=softplus, return_last_state=True)
            return y, last

        check_grads(f, tuple(jnp.asarray(args[k]) for k in keys), order=1, modes=("rev",),
                    atol=1e-6, rtol=1e-6)


def test_selective_scan_errors():
    args = _ssm_inputs(14, groups_b=2, groups_c=2)
    with pytest.raises(ValueError, match="A must have shape"):
        selective_scan(**{**args, "A": args["A"].T})
    with pytest.raises(ValueError, match="A must have shape"):
        selective_scan(**{**args, "A": args["A"][:, 0]})
    with pytest.raises(ValueError, match="divisible"):
        selective_scan(**{**args, "B": np.ones((2, 7, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="C must have shape"):
        selective_scan(**{**args, "C": np.ones((2, 7, 2, 5), np.float32)})
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan(**{**args, "B": np.ones((2, 6, 3), np.float32)})
    with pytest.raises(ValueError, match="delta must have"):
        selective_scan(**{**args, "delta": args["delta"][:, :-1]})
    with pytest.raises(ValueError, match="z must have"):
        selective_scan(**args, z=args["u"][..., :-1])
    with pytest.raises(ValueError, match="D must have"):
        selective_scan(**args, D=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="delta_bias must have"):
        selective_scan(**args, delta_bias=np.ones((1, 4), np.float32))
    with pytest.raises(ValueError, match="3-D"):
        selective_scan(**{**args, "u": args["u"][0]})
    with pytest.raises(TypeError, match="floating"):
        selective_scan(**{**args, "u": args["u"].astype(np.int32)})
    tok = {k: (v[:, 0] if k in ("u", "delta", "B", "C") else v) for k, v in args.items()}
    with pytest.raises(ValueError, match="state must have shape"):
        selective_scan_step(jnp.zeros((2, 4, 2)), **tok)
    with pytest.raises(ValueError, match="2-D"):
        selective_scan_step(jnp.zeros((2, 4, 3)), **{**tok, "u": args["u"]})


@pytest.mark.parametrize("implementation", [None, "associative", "chunked", "fused"])
def test_selective_scan_of_no_positions(implementation):
    """L = 0 is a defined case for every implementation: y is empty and the last state is h_{-1} = 0."""
    u = jnp.ones((2, 0, 8))
    A, B = -jnp.ones((8, 4)), jnp.ones((2, 0, 4))
    y, last = selective_scan(u, u, A, B, B, D=jnp.ones(8), z=u, return_last_state=True, implementation=implementation)
    assert y.shape == (2, 0, 8) and y.dtype == u.dtype
    np.testing.assert_array_equal(last, np.zeros((2, 8, 4)))
    assert selective_scan(u, u, A, B, B, implementation=implementation).shape == (2, 0, 8)


def test_selective_scan_of_no_positions_checks_chunk_size_as_usual():
    u, A, B = jnp.ones((1, 0, 8)), -jnp.ones((8, 4)), jnp.ones((1, 0, 4))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        selective_scan(u, u, A, B, B, chunk_size=0)
    with pytest.raises(ValueError, match="does not apply to implementation 'fused'"):
        selective_scan(u, u, A, B, B, chunk_size=4, implementation="fused")


# ---- SSD: the chunked state-space-dual form for A scalar per channel (Dao & Gu 2024, §6) ----

def _np_segsum(a):
    """float64 loop: out[..., t, s] = Σ_{s<k≤t} a_k below the diagonal and on it, -inf above."""
    a = np.asarray(a, np.float64)
    size = a.shape[-1]
    out = np.full(a.shape + (size,), -np.inf)
    for t in range(size):
        for s in range(t + 1):
            out[..., t, s] = a[..., s + 1:t + 1].sum(-1)
    return out


def test_segsum_matches_loop_and_stays_exact_for_large_sums():
    a = np.random.default_rng(30).uniform(-2, 0, (2, 3, 6)).astype(np.float32)
    np.testing.assert_allclose(segsum(a), _np_segsum(a), rtol=1e-6, atol=1e-6)
    # prefix sums of -1e6 per step: cumsum_t - cumsum_s would lose the single -1 step to float32 rounding
    big = np.array([-1e6] * 4 + [-1.0, -1.0], np.float32)
    out = np.asarray(segsum(big))
    assert out[5, 4] == -1.0 and out[5, 3] == -2.0 and out[4, 4] == 0.0 and np.isneginf(out[2, 3])
    with pytest.raises(ValueError, match="at least 1-D"):
        segsum(jnp.float32(1.0))
    with pytest.raises(TypeError, match="real floating"):
        segsum(jnp.arange(3))


_jit_scan = jax.jit(selective_scan, static_argnames=("delta_softplus", "return_last_state", "chunk_size",
                                                     "implementation"))  # compiled once: cheaper than op by op


SSD_CASES = {  # (case, chunk sizes): L = 7, so 2, 3 and 4 leave a partial last chunk; 16 is one padded chunk
    "plain": ("plain", 3),
    "one_position_chunks": ("D", 1),
    "z_chunk_4": ("z", 4),
    "bias_softplus_whole": ("bias_softplus", 7),
    "groups2_chunk_2": ("groups2", 2),
    "mixed_groups_chunk_16": ("mixed_groups", 16),
}


@pytest.mark.parametrize("name", list(SSD_CASES))
def test_ssd_matches_reference_and_associative(name):
    case, chunk = SSD_CASES[name]
    args, softplus = _case(case, seed=31, scalar_a=True)
    y, last = _jit_scan(**args, delta_softplus=softplus, return_last_state=True, implementation="ssd",
                             chunk_size=chunk)
    y_ref, h_ref = _np_selective_scan(**args, delta_softplus=softplus)
    assert y.shape == args["u"].shape and y.dtype == jnp.float32
    assert last.shape == (2, 4, 3) and last.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last, h_ref, rtol=1e-5, atol=1e-5)
    y_assoc, last_assoc = _jit_scan(**args, delta_softplus=softplus, return_last_state=True)
    np.testing.assert_allclose(y, y_assoc, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last, last_assoc, rtol=1e-5, atol=1e-5)


def test_ssd_default_chunk_dtypes_and_jit():
    args, _ = _case("groups2", seed=32, scalar_a=True, length=70)  # default Q = 16: four full chunks, one partial
    y_ref = _np_selective_scan(**args)[0]
    ssd = jax.jit(lambda a: selective_scan(**a, implementation="ssd"))
    np.testing.assert_allclose(ssd(args), y_ref, rtol=1e-5, atol=1e-5)
    bf16 = {k: jnp.asarray(v, jnp.bfloat16) if k in ("u", "delta", "B", "C") else v for k, v in args.items()}
    y, last = _jit_scan(**bf16, return_last_state=True, implementation="ssd", chunk_size=8)
    assert y.dtype == jnp.bfloat16 and last.dtype == jnp.float32
    with jax.enable_x64(True):
        args64 = {k: jnp.asarray(v, jnp.float64) for k, v in args.items()}
        y, last = _jit_scan(**args64, return_last_state=True, implementation="ssd", chunk_size=8)
        assert y.dtype == jnp.float64 and last.dtype == jnp.float64
        np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)


def test_ssd_gradients_match_associative_float64():
    """d/d every input (u, delta, A, B, C, D, z, delta_bias) of y and the last state, L = 5 in chunks of 2."""
    args, _ = _case("mixed_groups", seed=33, scalar_a=True, length=5)
    keys = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    with jax.enable_x64(True):
        inputs = tuple(jnp.asarray(args[k], jnp.float64) for k in keys)
        rng = np.random.default_rng(34)
        w_y, w_h = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 4, 3))

        def loss(implementation, chunk_size):
            def f(*a):
                y, last = selective_scan(*a, delta_softplus=True, return_last_state=True,
                                         implementation=implementation, chunk_size=chunk_size)
                return jnp.sum(y * w_y) + jnp.sum(last * w_h)
            return f

        grads = jax.jit(jax.grad(loss("ssd", 2), argnums=range(len(keys))))(*inputs)
        grads_ref = jax.jit(jax.grad(loss("associative", None), argnums=range(len(keys))))(*inputs)
        for key, g, r in zip(keys, grads, grads_ref):  # the associative scan's gradients: check_grads, above
            assert g.shape == r.shape, key
            np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-9, err_msg=key)


def test_ssd_state_continues_with_selective_scan_step():
    """Decoding after an SSD prefill: the last state fed to selective_scan_step gives the full scan's outputs."""
    args, softplus = _case("groups2", seed=35, scalar_a=True, length=9)
    y_full = _jit_scan(**args, delta_softplus=softplus, implementation="ssd", chunk_size=4)
    prefix = {k: (v[:, :6] if k in ("u", "delta", "z", "B", "C") else v) for k, v in args.items()}
    y, state = _jit_scan(**prefix, delta_softplus=softplus, return_last_state=True, implementation="ssd",
                              chunk_size=4)
    ys = [y]
    for t in range(6, 9):
        tok = {k: (v[:, t] if k in ("u", "delta", "z", "B", "C") else v) for k, v in args.items()}
        y_t, state = jax.jit(selective_scan_step, static_argnames="delta_softplus")(state, **tok,
                                                                                    delta_softplus=softplus)
        ys.append(y_t[:, None])
    np.testing.assert_allclose(jnp.concatenate(ys, 1), y_full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state, _np_selective_scan(**args, delta_softplus=softplus)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["associative", "chunked", "fused"])
def test_scalar_a_broadcasts_over_n_in_every_implementation(implementation):
    args = _ssm_inputs(36, batch=1, length=5, d_inner=8, n_state=4, D=True, scalar_a=True)
    wide = dict(args, A=np.broadcast_to(args["A"], (8, 4)))
    y, last = _jit_scan(**args, return_last_state=True, implementation=implementation)
    y_wide, last_wide = _jit_scan(**wide, return_last_state=True, implementation=implementation)
    np.testing.assert_allclose(y, y_wide, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(last, last_wide, rtol=1e-6, atol=1e-6)


def test_ssd_falls_back_for_a_with_n_columns():
    args, _ = _case("D", seed=37)  # A (d_inner, N): not scalar per channel, decided from the shape alone
    dispatch._warn_once.cache_clear()
    with pytest.warns(UserWarning, match=r"selective_scan: implementation 'ssd' cannot run this case \(A of shape "
                                         r"\(4, 3\) is not scalar per channel, shape \(d_inner, 1\)\); using "
                                         r"'associative'"):
        y = _jit_scan(**args, implementation="ssd")
    np.testing.assert_array_equal(y, _jit_scan(**args))
    with pytest.raises(ValueError, match=r"A must have shape \(d_inner=4, N\) or \(d_inner=4, 1\)"):
        selective_scan(**dict(args, A=args["A"][:3, :1]), implementation="ssd")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        selective_scan(**dict(args, A=args["A"][:, :1]), implementation="ssd", chunk_size=0)


def test_ssd_of_no_positions():
    u, A, B = jnp.ones((2, 0, 8)), -jnp.ones((8, 1)), jnp.ones((2, 0, 4))
    y, last = selective_scan(u, u, A, B, B, D=jnp.ones(8), z=u, return_last_state=True, implementation="ssd")
    assert y.shape == (2, 0, 8) and last.shape == (2, 8, 4)
    np.testing.assert_array_equal(last, np.zeros((2, 8, 4)))
