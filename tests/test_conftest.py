"""tests/conftest.py's platform switch: the devices marker's rule, and the CPU default."""

import os

import jax

from tests.conftest import missing_devices


def test_missing_devices():
    assert missing_devices(8, None, 8, "cpu") is None
    assert missing_devices(2, None, 8, "gpu") is None
    assert missing_devices(8, None, 1, "gpu") == "needs 8 devices, jax has 1 gpu device; the CPU run covers it"
    assert missing_devices(8, None, 4, "gpu") == "needs 8 devices, jax has 4 gpu devices; the CPU run covers it"
    assert missing_devices(8, "cpu", 8, "cpu") is None
    assert missing_devices(8, "cpu", 8, "gpu") == ("needs 8 cpu devices as jax's default backend, which is gpu; the "
                                                   "CPU run covers it")


def test_the_platform_the_suite_runs_on():
    """Unset JAXMODELS_TEST_PLATFORM (CI): the CPU, with fake devices (8 unless XLA_FLAGS says otherwise); =gpu:
    the GPU, the 8 fake CPU devices beside it, float32 matmuls at full precision."""
    assert "--xla_force_host_platform_device_count=" in os.environ["XLA_FLAGS"]
    if os.environ.get("JAXMODELS_TEST_PLATFORM", "cpu") == "cpu":
        assert jax.default_backend() == "cpu"
    else:
        assert jax.default_backend() == "gpu" and len(jax.devices("cpu")) == 8
        assert jax.config.jax_default_matmul_precision == "highest"
