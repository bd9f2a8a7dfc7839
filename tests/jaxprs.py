"""Walking a jaxpr, for the tests that check what a computation forms (no score matrix, no weight gradient)."""

from collections.abc import Iterator

from jax.extend import core as jax_core


def equations(jaxpr: jax_core.Jaxpr) -> Iterator[jax_core.JaxprEqn]:
    """Every equation of `jaxpr` and of the jaxprs nested in it (jit, remat, scan, cond, custom-VJP calls)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = sub.jaxpr if isinstance(sub, jax_core.ClosedJaxpr) else sub
                if isinstance(sub, jax_core.Jaxpr):
                    yield from equations(sub)
