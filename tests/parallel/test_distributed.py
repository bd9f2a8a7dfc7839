"""Multi-host start-up: when `maybe_initialize` joins a cluster (JAX's cluster detection mocked, the
Cloud TPU VM metadata server faked: no test reaches the network), the join timeout's error, and the check
that every process of a run has the same config and devices (the all-gather replaced by a table built
from a second, simulated process)."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax._src.clusters import ClusterEnv, cloud_tpu_cluster

from jaxmodels.parallel import distributed
from jaxmodels.parallel.distributed import (
    check_processes_agree,
    describe_processes,
    disagreements,
    fingerprint,
    maybe_initialize,
    section_hashes,
    start_up_plan,
)
from tests.tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID", "SLURM_NTASKS",
               "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri",
               "KUBERNETES_SERVICE_HOST", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
               "MEGASCALE_COORDINATOR_ADDRESS", "JAXMODELS_INIT_TIMEOUT")


def _no_metadata_server(key):
    raise AssertionError(f"a test asked the GCE metadata server for {key!r}")


@pytest.fixture
def calls(monkeypatch):
    """No cluster around, no metadata server; jax.distributed.initialize records its arguments instead."""
    for name in CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", _no_metadata_server)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    recorded = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: recorded.append(kwargs))
    return recorded


def _tpu_vm(monkeypatch, worker: int, endpoints: str):
    """This process on worker `worker` of a Cloud TPU VM slice whose metadata lists `endpoints`: no
    TPU_WORKER_HOSTNAMES in the environment, as on a GCE TPU VM."""
    metadata = {"agent-worker-number": str(worker), "worker-network-endpoints": endpoints, "tpu-env": ""}
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    monkeypatch.delenv("TPU_SKIP_MDS_QUERY", raising=False)  # set by jax on machines without a TPU
    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", lambda key: (metadata[key], 200))


@pytest.mark.devices(8, platform="cpu")
def test_a_tpu_vm_slice_found_through_metadata_initialises(monkeypatch, calls, capsys):
    _tpu_vm(monkeypatch, worker=1, endpoints="10.0.0.2,10.0.0.3")
    assert start_up_plan() == ({}, "1 of 2", "JAX's GceTpuCluster")
    assert maybe_initialize()
    assert calls == [{"initialization_timeout": 300 + distributed.JAX_TIMEOUT_MARGIN_S}]
    assert "distributed start-up through JAX's GceTpuCluster: 1 process x 8 cpu devices" in capsys.readouterr().out
    # What initialize() itself resolves from the same metadata: worker 0 coordinates, port 8482.
    assert ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, 5) == (
        "10.0.0.2:8482", 2, 1, None)


def test_a_single_host_tpu_vm_runs_alone(monkeypatch, calls):
    _tpu_vm(monkeypatch, worker=0, endpoints="10.0.0.2")
    assert start_up_plan() is None and not maybe_initialize() and calls == []


def test_slurm_tasks_under_srun_initialise(monkeypatch, calls):
    for k, v in {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "2",
                 "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("JAXMODELS_INIT_TIMEOUT", "20")
    assert maybe_initialize() and calls == [{"initialization_timeout": 20 + distributed.JAX_TIMEOUT_MARGIN_S}]
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert start_up_plan() is None


def test_sbatch_without_srun_is_an_error_that_names_srun(monkeypatch, calls):
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(RuntimeError, match="start each task with `srun`"):
        maybe_initialize()


def test_launcher_variables_are_passed_explicitly(monkeypatch, calls):
    env = {"JAX_COORDINATOR_ADDRESS": "10.1.2.3:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert maybe_initialize()
    assert calls == [{"coordinator_address": "10.1.2.3:1234", "num_processes": 2, "process_id": 1,
                      "initialization_timeout": 300 + distributed.JAX_TIMEOUT_MARGIN_S}]
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    assert start_up_plan() is None


def test_nothing_to_join_and_never_twice(monkeypatch, calls):
    assert start_up_plan() is None and not maybe_initialize()
    monkeypatch.setenv("SLURM_NTASKS", "4")  # would be an error, but the runtime is already up
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert not maybe_initialize() and calls == []


def test_a_bad_timeout_is_named(monkeypatch, calls):
    monkeypatch.setenv("JAXMODELS_INIT_TIMEOUT", "5m")
    with pytest.raises(ValueError, match="JAXMODELS_INIT_TIMEOUT='5m' is not valid"):
        maybe_initialize()


def test_a_worker_that_never_joins_stops_with_the_coordinator_and_what_to_check(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID="0", JAXMODELS_INIT_TIMEOUT="2", PYTHONPATH=ROOT)
    code = "from jaxmodels.parallel.distributed import maybe_initialize; maybe_initialize()"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == distributed.JOIN_FAILED_EXIT_CODE, r.stderr[-2000:]
    assert ("the distributed start-up did not complete within 2s: process 0 of 2 waited for the others at "
            f"coordinator 127.0.0.1:{port} (found through JAX_COORDINATOR_ADDRESS)") in r.stderr
    assert "every worker was started with the same command" in r.stderr and "JAXMODELS_INIT_TIMEOUT" in r.stderr


@pytest.mark.devices(8, platform="cpu")
def test_describe_processes_names_processes_devices_and_mesh():
    mesh = jax.make_mesh((4, 2), ("data", "tensor"))
    assert describe_processes(mesh) == "1 process x 8 cpu devices = 8 devices; mesh {'data': 4, 'tensor': 2}"


def _with_second_process(other_rounds):
    """A `gather` that stacks this process's vector on the simulated one of the same round."""
    rounds = iter(other_rounds)
    return lambda ours: np.stack([ours, np.asarray(list(next(rounds).values()), np.int32)])


def test_disagreements_name_the_differing_columns_and_values():
    table = np.array([[1, 8, 5], [1, 4, 5], [1, 8, 5]])
    assert disagreements(["a", "local devices", "c"], table) == [
        "local devices: process 0 has 8, process 1 has 4, process 2 has 8"]
    assert disagreements(["a", "b", "c"], table[[0, 2]]) == []


def test_same_config_passes():
    config = tiny_config()
    check_processes_agree(config, gather=_with_second_process([fingerprint(tiny_config())]))


def test_different_config_names_the_section():
    config, other = tiny_config(), tiny_config(model__num_layers=2)
    with pytest.raises(ValueError, match=r"disagree .*: config\.model \(hash\): process 0 has -?\d+, process 1 has"):
        check_processes_agree(config, gather=_with_second_process([fingerprint(other), section_hashes(other)]))


def test_different_device_counts_are_named():
    config, ours = tiny_config(), jax.local_device_count()  # 8 fake CPU devices; 1 on one GPU
    other = dict(fingerprint(config), **{"jax.local_device_count()": ours + 3})
    expected = rf"jax.local_device_count\(\): process 0 has {ours}, process 1 has {ours + 3}"
    with pytest.raises(ValueError, match=expected):
        check_processes_agree(config, gather=_with_second_process([other]))
