"""Property tests over the public ops' argument ranges: random valid arguments give finite results of the
documented shape, random invalid ones raise ValueError or TypeError (never ZeroDivisionError, IndexError ...)."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmodels.ops import diffusion as df
from jaxmodels.ops import moe
from jaxmodels.ops.attention import dot_product_attention
from jaxmodels.ops.scan import selective_scan

FAST = settings(max_examples=10, deadline=None)


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@FAST
@given(b=st.integers(1, 2), t=st.integers(0, 4), s=st.integers(0, 4), k=st.integers(0, 2), group=st.integers(1, 2),
       h=st.integers(0, 4), causal=st.booleans(), implementation=st.sampled_from(["reference", "xla", "flash"]))
def test_dot_product_attention_ranges(b, t, s, k, group, h, causal, implementation):
    q, kv = _normal(0, (b, t, k * group, h)), _normal(1, (b, s, k, h))
    valid = k >= 1 and h >= 1 and (implementation != "flash" or min(t, s) >= 1)
    if not valid:
        with pytest.raises(ValueError):
            dot_product_attention(q, kv, kv, is_causal=causal, implementation=implementation)
        return
    out = dot_product_attention(q, kv, kv, is_causal=causal, implementation=implementation)
    assert out.shape == q.shape and np.isfinite(out).all()


@FAST
@given(length=st.integers(0, 5), d=st.sampled_from([1, 2, 4]), n=st.integers(1, 3), chunk=st.integers(-1, 4),
       implementation=st.sampled_from(["associative", "chunked"]))
def test_selective_scan_ranges(length, d, n, chunk, implementation):
    u, delta = _normal(2, (1, length, d)), _normal(3, (1, length, d))
    A, B, C = -jnp.exp(_normal(4, (d, n))), _normal(5, (1, length, n)), _normal(6, (1, length, n))
    chunk_size = None if chunk == -1 else chunk
    if chunk_size == 0:
        with pytest.raises(ValueError, match="chunk_size"):
            selective_scan(u, delta, A, B, C, chunk_size=chunk_size, implementation=implementation)
        return
    y, last = selective_scan(u, delta, A, B, C, delta_softplus=True, return_last_state=True, chunk_size=chunk_size,
                             implementation=implementation)
    assert y.shape == u.shape and last.shape == (1, d, n)
    assert np.isfinite(y).all() and np.isfinite(last).all()


@FAST
@given(tokens=st.integers(1, 5), k=st.integers(1, 2), num_experts=st.integers(1, 4), shift=st.integers(-2, 2),
       data=st.data())
def test_moe_dropless_expert_id_ranges(tokens, k, num_experts, shift, data):
    k = min(k, num_experts)
    ids = np.array(data.draw(st.lists(st.integers(0, num_experts - 1), min_size=tokens * k, max_size=tokens * k)))
    ids = ids.reshape(tokens, k) + (shift if shift else 0) * (np.arange(tokens * k).reshape(tokens, k) == 0)
    experts, gates = jnp.asarray(ids, jnp.int32), jnp.full((tokens, k), 1.0 / k)
    x, weights = _normal(7, (tokens, 3)), [_normal(8 + i, s) for i, s in enumerate(
        ((num_experts, 3, 2), (num_experts, 3, 2), (num_experts, 2, 3)))]
    if ((ids < 0) | (ids >= num_experts)).any():
        for call in (lambda: moe.sort_by_expert(experts, num_experts), lambda: moe.expert_load(experts, num_experts),
                     lambda: moe.moe_dropless(x, gates, experts, *weights)):
            with pytest.raises(ValueError, match="experts must hold values in"):
                call()
        return
    order, sizes = moe.sort_by_expert(experts, num_experts)
    assert int(sizes.sum()) == tokens * k and sorted(np.asarray(order).tolist()) == list(range(tokens * k))
    np.testing.assert_allclose(moe.expert_load(experts, num_experts).sum(), 1.0, rtol=1e-6)
    assert np.isfinite(moe.moe_dropless(x, gates, experts, *weights)).all()


@FAST
@given(sizes=st.lists(st.integers(-2, 4), min_size=1, max_size=3), rows=st.integers(0, 6),
       implementation=st.sampled_from(["reference", "ragged_dot"]))
def test_grouped_matmul_group_size_ranges(sizes, rows, implementation):
    x, w = _normal(11, (rows, 2)), _normal(12, (len(sizes), 2, 3))
    group_sizes = jnp.asarray(sizes, jnp.int32)
    if min(sizes) < 0 or sum(sizes) > rows:
        with pytest.raises(ValueError, match="group_sizes must be >= 0"):
            moe.grouped_matmul(x, w, group_sizes, implementation=implementation)
        return
    out = moe.grouped_matmul(x, w, group_sizes, implementation=implementation)
    assert out.shape == (rows, 3) and np.isfinite(out).all()
    np.testing.assert_array_equal(out[sum(sizes):], 0.0)


@FAST
@given(t=st.lists(st.integers(-3, 12), min_size=1, max_size=3), target=st.sampled_from(df.DDPM_TARGETS))
def test_ddpm_loss_timestep_ranges(t, target):
    table = df.alphas_cumprod(df.beta_schedule("linear", 10))
    x0 = _normal(13, (len(t), 2))
    call = lambda: df.ddpm_loss(lambda x, s: x, x0, None, table, t=jnp.asarray(t), noise=x0, target=target)
    if min(t) < 0 or max(t) >= 10:
        with pytest.raises(ValueError, match=r"t must hold values in \[0, 10\)"):
            call()
        return
    assert np.isfinite(call()).all()


@FAST
@given(num_steps=st.integers(-1, 6), sigma_min=st.floats(-1.0, 2.0), sigma_max=st.floats(-1.0, 100.0),
       rho=st.one_of(st.floats(-2.0, 10.0), st.just(0), st.just(float("nan"))))
def test_edm_sigmas_ranges(num_steps, sigma_min, sigma_max, rho):
    if num_steps < 1 or not 0 < sigma_min <= sigma_max or not rho > 0:
        with pytest.raises((ValueError, TypeError)):
            df.edm_sigmas(num_steps, sigma_min, sigma_max, rho)
        return
    sigmas = np.asarray(df.edm_sigmas(num_steps, sigma_min, sigma_max, rho))
    assert sigmas.shape == (num_steps + 1,) and np.isfinite(sigmas).all() and sigmas[-1] == 0
    assert np.all(np.diff(sigmas) <= 0)
