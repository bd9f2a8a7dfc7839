"""Shared helpers of the vision op tests: torchvision's saved outputs (see torchvision_reference.py) and a
finite-difference gradient check that compiles once."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

TORCHVISION = pathlib.Path(__file__).with_name("data") / "torchvision_ops.npz"


def torchvision_case(name: str) -> tuple[dict, dict]:
    """(arrays, options) of one case of torchvision_ops.npz."""
    with np.load(TORCHVISION) as data:
        arrays = {key.split("/", 1)[1]: data[key] for key in data.files if key.startswith(name + "/")}
    options = json.loads(str(arrays.pop("options"))) if "options" in arrays else {}
    return arrays, options


def check_vjp_against_finite_differences(f, args, argnum, *, eps=1e-4, samples=6, rtol=2e-3, seed=0):
    """<grad f(args)[argnum], v> == (f(x + eps v) - f(x - eps v)) / 2 eps along random directions v, in float64.
    f: scalar function of float64 arrays (jitted here once)."""
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) if np.issubdtype(np.asarray(a).dtype, np.floating) else jnp.asarray(a)
                for a in args]
        f = jax.jit(f)
        grad = np.asarray(jax.jit(jax.grad(f, argnums=argnum))(*args))
        rng = np.random.default_rng(seed)
        for _ in range(samples):
            v = rng.normal(size=grad.shape)
            shifted = [list(args), list(args)]
            shifted[0][argnum] = args[argnum] + eps * v
            shifted[1][argnum] = args[argnum] - eps * v
            numeric = (float(f(*shifted[0])) - float(f(*shifted[1]))) / (2 * eps)
            np.testing.assert_allclose(np.sum(grad * v), numeric, rtol=rtol, atol=rtol * np.abs(grad).sum() * 1e-2)
