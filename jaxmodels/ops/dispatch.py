"""The one kernel-dispatch convention of `ops` (DESIGN.md, "Kernels").

A family's public function (`attention.dot_product_attention`, `scan.selective_scan`,
`moe.grouped_matmul`) takes `implementation=None` or one of its module's `IMPLEMENTATIONS` (a tuple of
names, None not among them). None picks the fastest correct implementation for the backend and the
shapes. An explicitly requested kernel that cannot run the case falls back to the family's portable
implementation with a warning, given once per (family, requested, reason).
"""

import functools
import warnings
from collections.abc import Collection

import jax
import jax.extend

from jaxmodels.ops.checks import one_of


def check_implementation(value, valid: Collection[str], name: str = "implementation"):
    """Return `value` if it is None or in `valid` (a module's IMPLEMENTATIONS), else the ValueError of
    `checks.one_of`."""
    return one_of(name, value, (None, *valid))


def backend_platform() -> str:
    """The default backend's platform for choosing kernels: "cpu", "tpu", or "gpu" told apart into "cuda" /
    "rocm" (as jax's own cuDNN check does, from the backend's platform_version)."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    return "cuda" if "cuda" in jax.extend.backend.get_backend().platform_version.lower() else "rocm"


def fall_back(family: str, requested: str, reason: str, instead: str) -> str:
    """Return `instead`, the implementation to run because `requested` cannot run the case (`reason`),
    warning (UserWarning) the first time this (family, requested, reason) occurs in the process."""
    _warn_once(f"{family}: implementation {requested!r} cannot run this case ({reason}); using {instead!r}")
    return instead


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)
