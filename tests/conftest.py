"""Test-wide setup: 8 fake CPU devices so mesh tests run in-process on any machine."""

import os

# Must happen before jax initialises its backends (i.e. before any test imports jax). The
# optimisation level halves XLA's CPU compile time, which dominates the end-to-end tests.
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
