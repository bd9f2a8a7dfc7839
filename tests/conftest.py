"""Test-wide setup: 8 fake CPU devices so mesh tests run in-process on any machine."""

import os

# Must happen before jax initialises its backends (i.e. before any test imports jax).
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
