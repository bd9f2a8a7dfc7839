"""The fused Pallas selective scan (interpreted on CPU) against the float64 loop and selective_scan, and
selective_scan's choice of implementation."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops import dispatch
from jaxmodels.ops.kernels.fused_scan import fused_selective_scan, supports
from jaxmodels.ops.scan import CHUNK, IMPLEMENTATIONS, selective_scan
from tests.ops.test_scan import _np_selective_scan, _ssm_inputs

SHAPE = dict(batch=2, length=9, d_inner=32, n_state=4)
CASES = {
    "plain": dict(),
    "D_z": dict(D=True, z=True),
    "bias_softplus": dict(delta_bias=True, D=True, softplus=True),
}


def _args(name, seed):
    case = dict(CASES[name])
    softplus = case.pop("softplus", False)
    return _ssm_inputs(seed, **SHAPE, **case), softplus


@pytest.mark.parametrize("name", list(CASES))
def test_fused_matches_float64_loop(name):
    args, softplus = _args(name, seed=20)
    y, last = fused_selective_scan(**args, delta_softplus=softplus, return_last_state=True)
    y_ref, h_ref = _np_selective_scan(**args, delta_softplus=softplus)
    assert y.dtype == jnp.float32 and last.shape == (2, 32, 4)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last, h_ref, rtol=1e-5, atol=1e-5)
    # 9 steps: prefetched iterations and a remainder; unroll > L: the remainder loop only; one channel per program
    for options in (dict(unroll=4), dict(unroll=16), dict(unroll=3, block_d=1)):
        np.testing.assert_allclose(fused_selective_scan(**args, delta_softplus=softplus, **options), y,
                                   rtol=1e-6, atol=1e-6, err_msg=str(options))


def test_fused_bfloat16_inputs_give_bfloat16_outputs():
    args, _ = _args("D_z", seed=21)
    bf16 = {k: jnp.asarray(v, jnp.bfloat16) if k in ("u", "delta", "z", "B", "C") else v for k, v in args.items()}
    y = fused_selective_scan(**bf16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), selective_scan(**bf16).astype(jnp.float32),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("length,gated", [(9, True), (24, False)])  # chunks of 1 and 8 (x3)
def test_fused_gradients_match_selective_scan(length, gated):
    args = _ssm_inputs(22 + length, **dict(SHAPE, length=length), D=True, delta_bias=True, z=gated)
    rng = np.random.default_rng(24)
    cot = jnp.asarray(rng.standard_normal(args["u"].shape), jnp.float32)
    cot_last = jnp.asarray(rng.standard_normal((2, 32, 4)), jnp.float32)

    def loss(fn, **kw):  # through y and the last state
        y, last = fn(**kw, delta_softplus=True, return_last_state=True)
        return jnp.sum(y * cot) + jnp.sum(last * cot_last)

    # Chunks of 1 (length 9): the loads-ahead loop never runs; of 8: two iterations of the default 4 positions.
    grads = jax.jit(jax.grad(lambda kw: loss(fused_selective_scan, **kw)))(args)
    expected = jax.grad(lambda kw: loss(selective_scan, **kw))(args)
    for name in args:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_unsupported_inputs_are_named():
    args, _ = _args("plain", seed=25)
    assert supports(jnp.asarray(args["u"]), jnp.asarray(args["B"]), jnp.asarray(args["C"])) is None
    grouped = dict(args, B=args["B"][:, :, None, :])
    with pytest.raises(ValueError, match="grouped B/C"):
        fused_selective_scan(**grouped)
    narrow = _ssm_inputs(26, batch=1, length=3, d_inner=12, n_state=4)
    with pytest.raises(ValueError, match="d_inner=12 is not a multiple of 8"):
        fused_selective_scan(**narrow)
    with pytest.raises(ValueError, match="delta must have u's shape"):  # checked before the kernel is chosen
        selective_scan(**dict(args, delta=args["delta"][:, :-1]), implementation="fused")


def test_selective_scan_implementations_agree():
    assert IMPLEMENTATIONS == ("associative", "chunked", "fused", "ssd") and CHUNK == 256
    args, _ = _args("D_z", seed=27)
    # "ssd" needs A of shape (d_inner, 1): tested in tests/ops/test_scan.py
    y = {name: selective_scan(**args, implementation=name) for name in IMPLEMENTATIONS if name != "ssd"}
    for name in ("chunked", "fused"):
        np.testing.assert_allclose(y[name], y["associative"], rtol=1e-5, atol=1e-5, err_msg=name)
    # None picks the fused kernel on a GPU and the associative scan elsewhere, bit for bit; the default
    # implementation is the associative scan everywhere
    picked = "fused" if jax.default_backend() == "gpu" else "associative"
    np.testing.assert_array_equal(selective_scan(**args, implementation=None), y[picked])
    np.testing.assert_array_equal(selective_scan(**args), y["associative"])
    with pytest.raises(ValueError, match=r"implementation='cuda' is not valid; choose one of \[None, 'associative'"):
        selective_scan(**args, implementation="cuda")
    with pytest.raises(ValueError, match="chunk_size=4 does not apply to implementation 'fused'"):
        selective_scan(**args, implementation="fused", chunk_size=4)


def test_fused_falls_back_with_one_warning():
    narrow = _ssm_inputs(28, batch=1, length=3, d_inner=12, n_state=4)
    expected = selective_scan(**narrow, implementation="associative")
    dispatch._warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = selective_scan(**narrow, implementation="fused")
        second = selective_scan(**narrow, implementation="fused")
    messages = [str(w.message) for w in caught]
    assert messages == ["selective_scan: implementation 'fused' cannot run this case (d_inner=12 is not a multiple "
                        "of 8); using 'associative'"]
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second, expected)
