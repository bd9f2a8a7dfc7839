"""Test-wide setup: the platform the suite runs on, and 8 fake CPU devices so mesh tests run in-process.

JAXMODELS_TEST_PLATFORM picks the platform ("cpu" when unset):

  cpu   `pytest`: JAX_PLATFORMS=cpu (an explicit JAX_PLATFORMS wins), 8 fake CPU devices, XLA's backend
        optimisation level 0 (it halves the CPU compile time, which dominates the end-to-end tests). What CI runs.
        (XLA's persistent compilation cache is left off: reading an entry crashed a worker with a segmentation
        fault once in a full run.)
  gpu   `JAXMODELS_TEST_PLATFORM=gpu pytest -n 0` on a machine with an NVIDIA GPU and jax[cuda12] (with pytest-xdist,
        `-n 4` shares the GPU: preallocation is off). The same tests, on the GPU:
        - JAX_PLATFORMS=cuda,cpu: the GPU is jax's default device; the 8 fake CPU devices stay for jax.devices("cpu").
        - float32 matmuls at full float32 precision: JAX_DEFAULT_MATMUL_PRECISION=highest, the equivalent of
          `jax.default_matmul_precision("highest")` around every test (and in the subprocesses tests start). The
          tests check algorithms against float64 / float32 references to 1e-5; the GPU's default TF32 matmuls
          (10-bit mantissa) are a precision choice of the models, not what the tests are about. Tests that set a
          precision themselves keep theirs.
        - XLA_PYTHON_CLIENT_PREALLOCATE=false: each process takes GPU memory as it needs it.
        - the CPU's optimisation-level flag is not set (GPU code compiles as in training).
        The Pallas kernels then compile for the GPU instead of running in the interpreter.

Tests that need several devices carry `@pytest.mark.devices(n)` (n devices of jax's default backend) or
`@pytest.mark.devices(n, platform="cpu")` (also the CPU as that backend: they name the device kind); they are skipped,
with the reason, where jax has fewer (on one GPU: the CPU run covers them).
"""

import os

import pytest

PLATFORMS = ("cpu", "gpu")
PLATFORM = os.environ.get("JAXMODELS_TEST_PLATFORM", "cpu")
if PLATFORM not in PLATFORMS:
    raise pytest.UsageError(f"JAXMODELS_TEST_PLATFORM must be one of {PLATFORMS}, got {PLATFORM!r}")


def _add_xla_flag(flag: str) -> None:
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


# Must happen before jax initialises its backends (i.e. before any test imports jax).
_add_xla_flag("--xla_force_host_platform_device_count=8")
if PLATFORM == "cpu":
    _add_xla_flag("--xla_backend_optimization_level=0")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
else:
    os.environ.setdefault("JAX_PLATFORMS", "cuda,cpu")
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "devices(n, platform=None): needs n devices of jax's default backend (and "
                                       "that backend to be `platform`); skipped otherwise (tests/conftest.py)")


def missing_devices(n: int, platform: str | None, count: int, backend: str) -> str | None:
    """Why a test marked devices(n, platform) cannot run with `count` devices of jax's default `backend`, or None."""
    if platform is not None and backend != platform:
        return f"needs {n} {platform} devices as jax's default backend, which is {backend}; the CPU run covers it"
    if count < n:
        return f"needs {n} devices, jax has {count} {backend} device{'s' if count > 1 else ''}; the CPU run covers it"
    return None


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("devices")
    if marker is None:
        return
    import jax

    reason = missing_devices(marker.args[0], marker.kwargs.get("platform"), jax.device_count(), jax.default_backend())
    if reason:
        pytest.skip(reason)


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
