import functools
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from jaxmodels.ops import attention, dispatch
from jaxmodels.ops.attention import IMPLEMENTATIONS, dot_product_attention, select_implementation


def _np_attention(q, k, v, bias=None, mask=None, *, scale=None, is_causal=False, segment_ids=None,
                  local_window_size=None):
    """float64 attention, one (batch, head, query) row at a time, over the keys that row may see.

    Returns (out (B, T, N, H), valid (B, T, N)): valid says whether the row saw any key; rows that
    saw none are zero.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(H) if scale is None else scale
    bias = np.broadcast_to(0.0 if bias is None else np.asarray(bias, np.float64), (B, N, T, S))
    mask = np.broadcast_to(True if mask is None else np.asarray(mask), (B, N, T, S))
    q_ids, kv_ids = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    left, right = ((local_window_size,) * 2 if isinstance(local_window_size, int) else local_window_size or (0, 0))

    def sees(b, n, i, j):
        return (mask[b, n, i, j] and (not is_causal or j <= i)
                and (segment_ids is None or q_ids[b, i] == kv_ids[b, j])
                and (local_window_size is None or i - left <= j <= i + right))

    out, valid = np.zeros((B, T, N, H)), np.zeros((B, T, N), bool)
    for b, n, i in itertools.product(range(B), range(N), range(T)):
        kv_head = n // (N // K)
        keys = [j for j in range(S) if sees(b, n, i, j)]
        if not keys:
            continue
        logits = np.array([q[b, i, n] @ k[b, j, kv_head] * scale + bias[b, n, i, j] for j in keys])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[b, i, n] = sum(p_j * v[b, j, kv_head] for p_j, j in zip(p, keys))
        valid[b, i, n] = True
    return out, valid


# (B, T, S, N, K, H) and options; mask/bias entries are shapes to draw at random.
CASES = {
    "mha": dict(dims=(2, 5, 5, 2, 2, 8)),
    "gqa_cache_mask": dict(dims=(2, 3, 7, 4, 2, 8), mask=(2, 1, 3, 7)),
    "mqa_bias": dict(dims=(2, 4, 6, 4, 1, 8), bias=(1, 4, 4, 6)),
    "padding_mask_2d_bias": dict(dims=(2, 4, 6, 4, 2, 8), mask=(2, 1, 1, 6), bias=(4, 6)),
    "causal": dict(dims=(1, 6, 6, 4, 2, 8), is_causal=True),
    "causal_t_lt_s": dict(dims=(2, 4, 6, 4, 2, 8), is_causal=True),
    "causal_t_gt_s": dict(dims=(2, 6, 4, 2, 1, 8), is_causal=True),
    "segments": dict(dims=(2, 6, 6, 4, 2, 8), segments="shared"),
    "segment_pair": dict(dims=(2, 4, 6, 2, 2, 8), segments="pair"),
    "window": dict(dims=(1, 7, 7, 2, 1, 8), window=2),
    "window_causal": dict(dims=(2, 7, 7, 4, 2, 8), window=(2, 1), is_causal=True),
    "window_right_t_ne_s": dict(dims=(1, 4, 7, 2, 2, 8), window=(0, 2)),
    "everything": dict(dims=(2, 6, 6, 4, 2, 8), mask=(2, 4, 6, 6), bias=(2, 4, 6, 6), is_causal=True,
                       segments="shared", window=(3, 0), scale=0.3),
}


def _inputs(case, seed, dtype=np.float32):
    """Random q, k, v (rounded to dtype) and the keyword options of a case."""
    rng = np.random.default_rng(seed)
    B, T, S, N, K, H = case["dims"]
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    q, k, v = (np.asarray(jnp.asarray(a, dtype)) for a in (q, k, v))
    kw = {}
    if "mask" in case:
        kw["mask"] = rng.random(case["mask"]) < 0.7
    if "bias" in case:
        kw["bias"] = rng.normal(size=case["bias"]).astype(np.float32)
    if case.get("segments") == "shared":
        kw["segment_ids"] = np.sort(rng.integers(0, 3, (B, T)), axis=1)
    elif case.get("segments") == "pair":
        kw["segment_ids"] = (np.sort(rng.integers(0, 2, (B, T)), axis=1), np.sort(rng.integers(0, 2, (B, S)), axis=1))
    for name, key in (("is_causal", "is_causal"), ("window", "local_window_size"), ("scale", "scale")):
        if name in case:
            kw[key] = case[name]
    return q, k, v, kw


def _attention_fn(implementation, **kw):
    """dot_product_attention with options fixed, jitted: one compilation beats many eager ops."""
    return jax.jit(functools.partial(dot_product_attention, **kw, implementation=implementation))


def _check_against_numpy(q, k, v, kw, implementation, tol):
    arrays = {name: kw[name] for name in ("bias", "mask", "segment_ids") if name in kw}
    options = {name: value for name, value in kw.items() if name not in arrays}
    out = _attention_fn(implementation, **options)(q, k, v, **arrays)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected, valid = _np_attention(q, k, v, **kw)
    out = np.asarray(out, np.float64)
    if implementation == "reference":  # fully masked rows are zeros
        np.testing.assert_allclose(out, expected, atol=tol, rtol=tol)
    else:  # jax.nn fills fully masked rows differently (see test_fully_masked_rows)
        np.testing.assert_allclose(out[valid], expected[valid], atol=tol, rtol=tol)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_numpy_float32(name, implementation):
    for seed in range(2):
        q, k, v, kw = _inputs(CASES[name], seed)
        _check_against_numpy(q, k, v, kw, implementation, tol=1e-5)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
@pytest.mark.parametrize("name", ["gqa_cache_mask", "mqa_bias", "everything"])
def test_matches_numpy_bfloat16(name, implementation):
    q, k, v, kw = _inputs(CASES[name], seed=3, dtype=jnp.bfloat16)
    assert q.dtype == jnp.bfloat16
    _check_against_numpy(q, k, v, kw, implementation, tol=3e-2)


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 5), S=st.integers(1, 5), K=st.integers(1, 2), G=st.integers(1, 2),
       is_causal=st.booleans(), use_mask=st.booleans(), seed=st.integers(0, 2**16))
def test_reference_matches_numpy_random_shapes(B, T, S, K, G, is_causal, use_mask, seed):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, K * G, 4)).astype(np.float32)
    k, v = rng.normal(size=(2, B, S, K, 4)).astype(np.float32)
    mask = rng.random((B, 1, T, S)) < 0.6 if use_mask else None
    bias = rng.normal(size=(1, K * G, T, S)).astype(np.float32)
    kw = dict(bias=bias, mask=mask, is_causal=is_causal)
    _check_against_numpy(q, k, v, kw, "reference", tol=1e-5)


def test_default_implementation_on_cpu_is_xla():
    q, k, v, kw = _inputs(CASES["everything"], seed=0)
    np.testing.assert_array_equal(dot_product_attention(q, k, v, **kw),
                                  dot_product_attention(q, k, v, **kw, implementation="xla"))


@pytest.mark.parametrize("name", ["gqa_cache_mask", "mqa_bias", "window_causal", "everything"])
def test_reference_gradients_float64(name):
    q, k, v, kw = _inputs(CASES[name], seed=5)
    bias = kw.pop("bias", np.zeros((1, 1, 1, 1)))
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(a, jnp.float64) for a in (q, k, v, bias))
        check_grads(_attention_fn("reference", **kw), args, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["gqa_cache_mask", "mqa_bias", "window_causal", "everything"])
def test_xla_gradients_match_reference(name):
    q, k, v, kw = _inputs(CASES[name], seed=6)
    bias = kw.pop("bias", np.zeros((1, 1, 1, 1), np.float32))
    valid = _np_attention(q, k, v, bias, **kw)[1][..., None]  # rows where the implementations agree

    def grads(implementation):
        def loss(q, k, v, bias):
            out = dot_product_attention(q, k, v, bias, **kw, implementation=implementation)
            return jnp.sum(jnp.where(valid, out * jnp.cos(out), 0.0))  # weighs every output differently
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)

    for g_xla, g_ref in zip(grads("xla"), grads("reference")):
        np.testing.assert_allclose(g_xla, g_ref, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows():
    B, T, S, N, K, H = 1, 3, 5, 4, 2, 8
    rng = np.random.default_rng(0)
    q, bias = rng.normal(size=(B, T, N, H)), rng.normal(size=(1, N, T, S))
    k, v = rng.normal(size=(2, B, S, K, H))
    q, k, v, bias = (jnp.asarray(a, jnp.float32) for a in (q, k, v, bias))
    mask = np.ones((B, 1, T, S), bool)
    mask[:, :, 1] = False  # query 1 sees nothing

    # reference: zeros, and no gradient flows from that row
    out = dot_product_attention(q, k, v, bias, mask, implementation="reference")
    np.testing.assert_array_equal(out[:, 1], 0.0)
    expected, valid = _np_attention(q, k, v, bias, mask)
    assert not valid[:, 1].any() and valid[:, [0, 2]].all()
    np.testing.assert_allclose(out, expected, atol=1e-5)
    g = jax.jit(jax.grad(lambda q, k, v, b: dot_product_attention(q, k, v, b, mask, implementation="reference").sum(),
                         argnums=(0, 1, 2, 3)))(q, k, v, bias)
    assert all(np.isfinite(x).all() for x in g)
    np.testing.assert_array_equal(g[0][:, 1], 0.0)
    np.testing.assert_array_equal(g[3][:, :, 1], 0.0)

    # jax.nn "xla" (as of jax 0.10): uniform weights -> the mean of all values, bias ignored
    out = dot_product_attention(q, k, v, bias, mask, implementation="xla")
    np.testing.assert_allclose(out[:, 1], jnp.repeat(v.mean(axis=1), N // K, axis=1), atol=1e-6)
    np.testing.assert_allclose(out[:, [0, 2]], expected[:, [0, 2]], atol=1e-5)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_kv_cache_mask_hides_unwritten_slots_exactly(implementation):
    """Decoding: T new queries at positions index.., a (B, 1, T, S) mask over a cache whose slots
    past the last query hold garbage == attention over the written prefix alone."""
    B, T, S, N, K, H, index = 2, 2, 8, 4, 2, 8, 3
    rng = np.random.default_rng(1)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k, v = rng.normal(size=(2, B, S, K, H)).astype(np.float32)
    k[:, index + T:], v[:, index + T:] = 1e3, -1e3
    q_pos = index + np.arange(T)
    mask = (np.arange(S)[None, :] <= q_pos[:, None])[None, None]

    @jax.jit
    def decode(q, k, v, mask):  # mask traced, as with a traced cache index
        return dot_product_attention(q, k, v, mask=mask, implementation=implementation)

    out = decode(q, k, v, mask)
    prefix = index + T
    expected = dot_product_attention(q, k[:, :prefix], v[:, :prefix], mask=mask[..., :prefix],
                                     implementation=implementation)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)  # the 1e3 garbage adds nothing
    np.testing.assert_allclose(out, _np_attention(q, k, v, mask=mask)[0], atol=1e-5)


def test_select_implementation_where_cudnn_takes_the_inputs():
    """Without the Pallas kernels (pallas_runs=False) the choice is cuDNN's conditions alone."""
    select = functools.partial(select_implementation, q_len=64, kv_len=64, is_causal=False, local_window=None,
                               pallas_runs=False)
    assert select("cuda", jnp.bfloat16, 128) == "cudnn"
    assert select("cuda", jnp.float16, 64) == "cudnn"
    assert select("cuda", np.dtype("float16"), 8) == "cudnn"
    for platform in ("cpu", "tpu", "rocm"):
        assert select(platform, jnp.bfloat16, 64) == "xla"
    assert select("cuda", jnp.float32, 64) == "xla"
    assert select("cuda", jnp.bfloat16, 256) == "xla"
    assert select("cuda", jnp.bfloat16, 60) == "xla"
    # cuDNN needs even lengths (its backward with a bias; jax 0.11.2's cuDNN always)
    assert select("cuda", jnp.bfloat16, 64, q_len=1) == "xla"
    assert select("cuda", jnp.bfloat16, 64, kv_len=63) == "xla"
    assert select("cuda", jnp.bfloat16, 64, kv_len=7, q_len=256) == "xla"
    # cuDNN windows are left-only, unless causality cuts the right side anyway
    assert select("cuda", jnp.bfloat16, 64, local_window=(4, 0)) == "cudnn"
    assert select("cuda", jnp.bfloat16, 64, local_window=(4, 2), is_causal=True) == "cudnn"
    assert select("cuda", jnp.bfloat16, 64, local_window=(4, 2)) == "xla"


LONG, SHORT = 2048, 64  # T·S = 2048² is where "flash" / "pallas" take over from "xla"


# (case, select_implementation's arguments, choice on cuda, choice on cpu / tpu / rocm): the table of
# `select_implementation`'s docstring, from benchmarks/results/flash_attention_h200.json.
SELECTION_TABLE = [
    ("dense causal 16k H128", dict(q_len=16384, kv_len=16384, head_dim=128), "cudnn", "flash"),
    ("dense causal 4k H64", dict(q_len=4096, kv_len=4096, head_dim=64), "cudnn", "flash"),
    ("short dense", dict(), "cudnn", "xla"),
    ("left window 4k at 32k", dict(q_len=32768, kv_len=32768, local_window=(4095, 0)), "cudnn", "flash"),
    ("full-size bias", dict(bias_shape=(1, 4, SHORT, SHORT)), "cudnn", "xla"),
    ("full-size mask", dict(mask_shape=(2, 1, SHORT, SHORT)), "cudnn", "xla"),
    ("one query, full-size mask", dict(q_len=1, mask_shape=(2, 1, 1, SHORT)), "xla", "xla"),
    ("segment ids", dict(segment_ids=True), "pallas", "xla"),
    ("segment ids with a window, long", dict(q_len=LONG, kv_len=LONG, segment_ids=True, local_window=(255, 0)),
     "pallas", "flash"),
    ("ALiBi", dict(alibi=True), "pallas", "xla"),
    ("ALiBi with a window, long", dict(q_len=LONG, kv_len=LONG, alibi=True, local_window=(255, 0)), "pallas", "flash"),
    ("key-padding mask (B, 1, 1, S)", dict(mask_shape=(2, 1, 1, SHORT)), "pallas", "xla"),
    ("bias broadcast in S", dict(bias_shape=(1, 4, SHORT, 1)), "pallas", "xla"),
    ("soft cap", dict(soft_cap=True), "pallas", "reference"),
    ("soft cap, kernels cannot run it", dict(soft_cap=True, pallas_runs=False), "reference", "reference"),
    ("float32, long", dict(dtype=jnp.float32, q_len=LONG, kv_len=LONG), "pallas", "flash"),
    ("float32, short", dict(dtype=jnp.float32), "xla", "xla"),
    ("float32 ALiBi, short", dict(dtype=jnp.float32, alibi=True), "xla", "xla"),
    ("head_dim 256, long", dict(head_dim=256, q_len=LONG, kv_len=LONG), "pallas", "flash"),
    ("odd length, long", dict(q_len=LONG - 1, kv_len=2 * LONG), "pallas", "flash"),
    ("right window without causality, long", dict(q_len=LONG, kv_len=LONG, local_window=(4, 2), is_causal=False),
     "pallas", "flash"),
    ("long, kernels cannot run it", dict(dtype=jnp.float32, q_len=LONG, kv_len=LONG, pallas_runs=False),
     "flash", "flash"),
    ("ALiBi, kernels cannot run it", dict(alibi=True, pallas_runs=False), "cudnn", "xla"),
    ("segment ids, kernels cannot run it", dict(segment_ids=True, pallas_runs=False), "cudnn", "xla"),
]


@pytest.mark.parametrize("case, kwargs, on_cuda, elsewhere", SELECTION_TABLE, ids=[c[0] for c in SELECTION_TABLE])
def test_select_implementation_table(case, kwargs, on_cuda, elsewhere):
    """None's choice per case: "pallas" on an NVIDIA GPU exactly where the H200 measurements put it ahead (a soft
    cap; segment ids, ALiBi or broadcast operands that cuDNN would take as a dense bias; long sequences cuDNN
    cannot take), cuDNN where it takes the case, and on other platforms the choice that was there before."""
    args = dict(dtype=jnp.bfloat16, head_dim=64, q_len=SHORT, kv_len=SHORT, is_causal=True, local_window=None,
                pallas_runs=True) | kwargs
    assert select_implementation("cuda", **args) == on_cuda
    for platform in ("cpu", "tpu", "rocm"):
        assert select_implementation(platform, **args) == elsewhere, platform


def _pallas_spy(monkeypatch, module, name):
    """Replace module.name by a function that records its call and returns zeros like the query."""
    calls = []

    def spy(query, *args, **kwargs):
        calls.append(kwargs)
        return jnp.zeros_like(query)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_none_reaches_the_pallas_kernels_on_cuda_only(monkeypatch):
    """dot_product_attention(implementation=None) passes its case to `select_implementation` and runs its choice:
    the Pallas kernels for ALiBi, segment ids and a long float32 sequence on "cuda", never on the CPU."""
    calls = _pallas_spy(monkeypatch, attention.pallas_kernels, "flash_attention")
    q = jnp.ones((1, 16, 2, 16), jnp.bfloat16)
    long_q = jax.ShapeDtypeStruct((1, LONG, 1, 16), jnp.float32)
    cases = [lambda: dot_product_attention(q, q, q, is_causal=True, alibi_slopes=np.array([0.5, 0.25], np.float32)),
             lambda: dot_product_attention(q, q, q, segment_ids=jnp.zeros((1, 16), jnp.int32)),
             lambda: jax.eval_shape(lambda x: dot_product_attention(x, x, x, is_causal=True), long_q)]
    monkeypatch.setattr(attention, "backend_platform", lambda: "cpu")  # so also on a GPU run
    for case in cases:
        case()
    assert calls == []  # the CPU: "xla" and "flash" as before
    monkeypatch.setattr(attention, "backend_platform", lambda: "cuda")
    for case in cases:
        case()
    assert len(calls) == 3
    assert calls[0]["alibi_slopes"] is not None and calls[0]["is_causal"]
    assert calls[2]["is_causal"]


def test_implementations_listed():
    assert IMPLEMENTATIONS == ("reference", "xla", "cudnn", "flash", "pallas")


@pytest.mark.parametrize("args, kwargs, error, match", [
    (((2, 3, 4), (2, 5, 4, 8), (2, 5, 4, 8)), {}, ValueError, r"query must be 4-D .* got shape \(2, 3, 4\)"),
    (((2, 3, 4, 8), (2, 5, 4, 8), (2, 6, 4, 8)), {}, ValueError, "key and value must have the same shape"),
    (((2, 3, 4, 8), (1, 5, 4, 8), (1, 5, 4, 8)), {}, ValueError, "same batch size"),
    (((2, 3, 4, 8), (2, 5, 4, 16), (2, 5, 4, 16)), {}, ValueError, "same head_dim"),
    (((2, 3, 4, 8), (2, 5, 3, 8), (2, 5, 3, 8)), {}, ValueError, "got 4 query heads and 3 key/value heads"),
    (((2, 3, 4, 8), (2, 5, 2, 8), (2, 5, 2, 8)), dict(implementation="flashy"), ValueError,
     r"implementation='flashy' is not valid; choose one of \[None, 'reference', 'xla', 'cudnn', 'flash', 'pallas'\]"),
    (((2, 3, 4, 8), (2, 5, 2, 8), (2, 5, 2, 8)), dict(mask=np.ones((1, 1, 3, 5))), TypeError, "mask must be boolean"),
    (((2, 3, 4, 8), (2, 5, 2, 8), (2, 5, 2, 8)), dict(mask=np.ones((1, 2, 3, 5), bool)), ValueError,
     r"mask must be broadcastable to \(B, N, T, S\) = \(2, 4, 3, 5\)"),
    (((2, 3, 4, 8), (2, 5, 2, 8), (2, 5, 2, 8)), dict(bias=np.ones((3, 1, 3, 5))), ValueError,
     r"bias must be broadcastable .* got shape \(3, 1, 3, 5\)"),
    (((2, 3, 4, 8), (2, 5, 2, 8), (2, 5, 2, 8)), dict(bias=np.ones((1, 1, 1, 3, 5))), ValueError, "bias must be"),
    (((2, 3, 4, 8), (2, 5, 2, 8), (2, 5, 2, 8)), dict(segment_ids=np.zeros((2, 3), int)), ValueError,
     "single segment_ids array needs T == S, got T=3, S=5"),
    (((2, 3, 4, 8), (2, 5, 2, 8), (2, 5, 2, 8)), dict(segment_ids=(np.zeros((2, 3), int), np.zeros((2, 4), int))),
     ValueError, r"key/value segment_ids must have shape \(2, 5\), got \(2, 4\)"),
    (((2, 3, 4, 8), (2, 3, 2, 8), (2, 3, 2, 8)), dict(segment_ids=np.zeros((3,), int)), ValueError,
     r"query segment_ids must have shape \(2, 3\)"),
    (((2, 3, 4, 8), (2, 3, 2, 8), (2, 3, 2, 8)), dict(segment_ids=np.zeros((2, 3))), TypeError, "integers"),
    (((2, 3, 4, 8), (2, 3, 2, 8), (2, 3, 2, 8)), dict(local_window_size=-1), ValueError,
     "local_window_size must be a non-negative int or a pair"),
    (((2, 3, 4, 8), (2, 3, 2, 8), (2, 3, 2, 8)), dict(local_window_size=(1, 2, 3)), ValueError, "local_window_size"),
    (((2, 3, 4, 8), (2, 3, 2, 8), (2, 3, 2, 8)), dict(local_window_size=1.5), ValueError, "got 1.5"),
])
def test_errors(args, kwargs, error, match):
    q, k, v = (np.zeros(s, np.float32) for s in args)
    with pytest.raises(error, match=match):
        dot_product_attention(q, k, v, **kwargs)


def test_dtype_errors():
    q, k = np.zeros((1, 2, 2, 8), np.float32), np.zeros((1, 2, 2, 8), np.float32)
    with pytest.raises(TypeError, match="one dtype, got bfloat16, float32, float32"):
        dot_product_attention(q.astype(jnp.bfloat16), k, k)
    with pytest.raises(TypeError, match="floating point, got int32"):
        dot_product_attention(*(np.zeros((1, 2, 2, 8), np.int32),) * 3)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the fallback's message names the CPU platform")
def test_cudnn_off_the_gpu_falls_back_with_one_warning():
    rng = np.random.default_rng(30)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 6, 4, 8), (2, 6, 2, 8), (2, 6, 2, 8)))
    dispatch._warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [dot_product_attention(q, k, v, implementation="cudnn") for _ in range(2)]
    assert [str(w.message) for w in caught] == [
        "dot_product_attention: implementation 'cudnn' cannot run this case (cuDNN attention needs an NVIDIA GPU, "
        "the platform is 'cpu'); using 'xla'"]
    for out in outs:
        np.testing.assert_array_equal(out, dot_product_attention(q, k, v, implementation="xla"))


@pytest.mark.parametrize("q_len, kv_len", [(0, 3), (3, 0)])
def test_flash_refuses_empty_sequences(q_len, kv_len):
    q, k = jnp.ones((1, q_len, 2, 4)), jnp.ones((1, kv_len, 2, 4))
    with pytest.raises(ValueError, match=r"'flash' needs query length T >= 1 and key length S >= 1"):
        dot_product_attention(q, k, k, implementation="flash")
    out = dot_product_attention(q, k, k, implementation="reference")  # defined: empty rows, or zeros
    np.testing.assert_array_equal(out, np.zeros((1, q_len, 2, 4)))


@pytest.mark.parametrize("implementation", [None, *IMPLEMENTATIONS])
def test_zero_head_dim_or_heads_is_a_value_error(implementation):
    for shape in ((1, 3, 2, 0), (1, 3, 0, 4)):
        x = jnp.ones(shape)
        with pytest.raises(ValueError, match="heads and head_dim must be >= 1"):
            dot_product_attention(x, x, x, implementation=implementation)


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_float16_under_jit_on_cpu(implementation):
    q, k, v, kw = _inputs(CASES["causal"], seed=4, dtype=jnp.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "xla" falls back to "reference" on the CPU, with a warning
        out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, implementation=implementation, **kw))(q, k, v)
    assert out.dtype == jnp.float16
    expected, _ = _np_attention(q, k, v, **kw)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=1e-2)
    assert select_implementation("cpu", jnp.float16, 64, 64, 64, is_causal=True, local_window=None,
                                 pallas_runs=True) == "reference"
