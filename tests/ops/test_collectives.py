"""Each ring collective equals its lax counterpart on 8 fake CPU devices (tests/conftest.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxmodels.ops import collectives as C

pytestmark = pytest.mark.devices(8)  # meshes of up to 8 devices


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _run(fn, x, mesh, in_spec, out_spec):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_spec, out_specs=out_spec, check_vma=False))(x)


def _data(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        return jnp.asarray(rng.integers(-100, 100, shape), dtype)
    return jnp.asarray(rng.normal(size=shape), dtype)


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_reduce_scatter_all_gather_all_reduce_equal_lax(n, bidirectional, dtype):
    mesh = _mesh((n,), ("x",))
    x = _data((n * n * 4, 6), dtype, seed=n)  # per device: (n*4, 6)
    spec = P("x")
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)

    rs = _run(lambda a: C.ring_reduce_scatter(a, "x", bidirectional=bidirectional), x, mesh, spec, spec)
    close(rs, _run(lambda a: lax.psum_scatter(a, "x", scatter_dimension=0, tiled=True), x, mesh, spec, spec))

    ag = _run(lambda a: C.ring_all_gather(a, "x", bidirectional=bidirectional), x, mesh, spec, spec)
    np.testing.assert_array_equal(ag, _run(lambda a: lax.all_gather(a, "x", axis=0, tiled=True), x, mesh, spec, spec))

    ar = _run(lambda a: C.ring_all_reduce(a, "x", bidirectional=bidirectional), x, mesh, spec, spec)
    close(ar, _run(lambda a: lax.psum(a, "x"), x, mesh, spec, spec))


@pytest.mark.parametrize("shape", [(8 * 3,), (8 * 5, 7), (8, 1, 3)])
def test_all_reduce_any_shape_needs_padding(shape):
    mesh = _mesh((8,), ("x",))
    x = _data(shape, np.float32, seed=sum(shape))
    out = _run(lambda a: C.ring_all_reduce(a, "x", bidirectional=True), x, mesh, P("x"), P("x"))
    ref = _run(lambda a: lax.psum(a, "x"), x, mesh, P("x"), P("x"))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_hierarchical_all_reduce_equals_psum_over_both_axes():
    mesh = _mesh((2, 4), ("node", "gpu"))
    x = _data((8 * 5, 3), np.float32, seed=7)
    spec = P(("node", "gpu"))
    out = _run(lambda a: C.hierarchical_all_reduce(a, "gpu", "node"), x, mesh, spec, spec)
    ref = _run(lambda a: lax.psum(a, ("node", "gpu")), x, mesh, spec, spec)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_gradient_of_ring_all_reduce_matches_psum():
    mesh = _mesh((4,), ("x",))
    x = _data((4 * 6,), np.float32, seed=3)

    def loss(fn):
        f = jax.shard_map(lambda a: fn(a * a, "x"), mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=False)
        return lambda a: jnp.sum(jnp.sin(f(a)))

    np.testing.assert_allclose(jax.jit(jax.grad(loss(C.ring_all_reduce)))(x), jax.jit(jax.grad(loss(lax.psum)))(x),
                               rtol=1e-5)


def test_reduce_scatter_rejects_indivisible_leading_dim():
    mesh = _mesh((4,), ("x",))
    with pytest.raises(ValueError, match="divisible by the 4 devices"):
        _run(lambda a: C.ring_reduce_scatter(a, "x"), jnp.zeros((4 * 3, 2)), mesh, P("x"), P("x"))


def test_ring_all_gather_refuses_a_scalar():
    mesh = _mesh((1,), ("x",))
    with pytest.raises(ValueError, match=r"x must have a leading dim to gather along \(at least 1-D\), got a scalar"):
        _run(lambda a: C.ring_all_gather(a[0], "x"), jnp.ones((1,)), mesh, P("x"), P())
