"""Test-wide setup: 8 fake CPU devices so mesh tests run in-process on any machine."""

import os

# Must happen before jax initialises its backends (i.e. before any test imports jax). The
# optimisation level halves XLA's CPU compile time, which dominates the end-to-end tests.
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _write_each_checkpoint_array_from_one_replica():
    """Orbax saves a replicated array cooperatively by default: each replica writes a slice of it
    ("replica-parallel"), cut by a `jit(slice)` compiled per array shape. On the 8 fake CPU devices that is
    about 7 s of compilation in every in-process run that saves a checkpoint, and nothing the tests check
    depends on it. In-process tests therefore write each array from replica 0 (orbax's
    `use_replica_parallel=False`); the tests that train in subprocesses (tests/experiments/test_main.py,
    tests/train/test_preemption.py, tests/launch/) keep orbax's default."""
    import jax
    import orbax.checkpoint as ocp

    default = ocp.type_handlers.get_type_handler(jax.Array)
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        use_replica_parallel=False, array_metadata_store=default._array_metadata_store), override=True)


_write_each_checkpoint_array_from_one_replica()
