"""Multi-host start-up: call `jax.distributed.initialize` when this process is one of several, and
check that every process runs the same config on the same devices.

A process is one of several when our launchers say so (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID, set by launch/local.py), or when JAX's own cluster detection finds a cluster of more
than one process: a Cloud TPU VM slice (worker list from the metadata server), GKE, SLURM under
`srun`, Open MPI, Kubernetes. A worker that has not joined within JAXMODELS_INIT_TIMEOUT seconds
(default 300) stops with an error naming the coordinator and what to check.
"""

import hashlib
import json
import os
import sys
import threading
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
TIMEOUT_ENV = "JAXMODELS_INIT_TIMEOUT"
DEFAULT_TIMEOUT_S = 300
JAX_TIMEOUT_MARGIN_S = 30  # JAX aborts the process at its own deadline: ours must come first to explain why
JOIN_FAILED_EXIT_CODE = 3


def launched_multiprocess(environ=os.environ) -> bool:
    """True when environment variables alone say this process is one of several: our launchers'
    variables with JAX_NUM_PROCESSES > 1, SLURM_NTASKS > 1, several TPU_WORKER_HOSTNAMES, or a Megascale
    coordinator. It reads no metadata server; `cluster_from_jax` covers the clusters found that way."""
    if all(k in environ for k in COORDINATOR_ENV):
        return int(environ["JAX_NUM_PROCESSES"]) > 1
    if int(environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return "," in environ.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in environ


def jax_cluster_types() -> list[type]:
    """JAX's cluster environments in the order `jax.distributed.initialize()` tries them.

    JAX has no public API for "would initialize() find a cluster here?"; its registry is the private
    `jax._src.clusters.ClusterEnv._cluster_types` (stable since jax 0.4). This function is the one place
    that reads it. Opt-in environments (mpi4py) are left out, as initialize() leaves them out."""
    from jax._src import clusters

    return [c for c in clusters.ClusterEnv._cluster_types if not c.opt_in_only_method]


def cluster_from_jax() -> type | None:
    """The cluster environment `jax.distributed.initialize()` would use (e.g. GceTpuCluster on a TPU VM
    slice, SlurmCluster under srun), or None. On a TPU VM this asks the metadata server."""
    return next((c for c in jax_cluster_types() if c.is_env_present()), None)


def coordinator_in_use() -> str:
    """The coordinator address `jax.distributed.initialize()` is connecting to, once it has resolved it.

    Read from JAX's private `jax._src.distributed.global_state` (no public API holds it)."""
    from jax._src import distributed

    return getattr(distributed.global_state, "coordinator_address", None) or "(not resolved yet)"


def init_timeout() -> int:
    """Seconds a process waits for all others to join: $JAXMODELS_INIT_TIMEOUT, default 300."""
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={value!r} is not valid; give a positive number of seconds")
    return int(value)


def join_failure_message(*, process: str, source: str, timeout_s: int) -> str:
    """What a worker prints when the others did not join within the timeout, and what to check."""
    coordinator = coordinator_in_use()
    port = coordinator.rsplit(":", 1)[-1]
    return (f"error: the distributed start-up did not complete within {timeout_s}s: process {process} waited "
            f"for the others at coordinator {coordinator} (found through {source}). Check that: every worker "
            "was started with the same command (a worker that failed earlier, e.g. during setup, leaves the "
            f"others waiting: read its log); process 0 runs on the coordinator host and port {port} there is "
            "reachable from this host (firewall, same network); no process of an earlier run still holds that "
            f"port or the accelerator. Set {TIMEOUT_ENV}=SECONDS to wait longer.")


def initialize_within(timeout_s: int, *, process: str, source: str, **kwargs) -> None:
    """`jax.distributed.initialize(**kwargs)`, or exit with JOIN_FAILED_EXIT_CODE and an explanation if
    the processes have not all joined after timeout_s. JAX's own deadline (later by a margin) aborts the
    process with a C++ stack trace and no hint, so a watchdog thread speaks first."""
    def give_up():
        print(join_failure_message(process=process, source=source, timeout_s=timeout_s), file=sys.stderr, flush=True)
        os._exit(JOIN_FAILED_EXIT_CODE)

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(initialization_timeout=timeout_s + JAX_TIMEOUT_MARGIN_S, **kwargs)
    finally:
        watchdog.cancel()


def describe_processes(mesh: jax.sharding.Mesh | None = None) -> str:
    """One line for the start-up log: processes, devices per process, their kind, and the mesh if given,
    e.g. "2 processes x 4 cpu devices = 8 devices; mesh {'data': 8}"."""
    kind = jax.local_devices()[0].device_kind
    line = (f"{jax.process_count()} process{'es' if jax.process_count() > 1 else ''} x {jax.local_device_count()} "
            f"{kind} devices = {jax.device_count()} devices")
    return line + (f"; mesh {dict(mesh.shape)}" if mesh is not None else "")


def start_up_plan() -> tuple[dict, str, str] | None:
    """(initialize() arguments, "process i of n", where the layout came from) when this process is one of
    several, None when it runs alone.

    Our launchers' variables come first; otherwise JAX's cluster detection decides, and a cluster of one
    process is left alone (so a one-task SLURM allocation keeps all its GPUs)."""
    if all(k in os.environ for k in COORDINATOR_ENV):
        count, index = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        kwargs = {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"], "num_processes": count,
                  "process_id": index}
        return (kwargs, f"{index} of {count}", "JAX_COORDINATOR_ADDRESS") if count > 1 else None
    cluster = cluster_from_jax()
    if cluster is None:
        if launched_multiprocess():
            raise RuntimeError("the environment says this process is one of several (SLURM_NTASKS, "
                               "TPU_WORKER_HOSTNAMES or MEGASCALE_COORDINATOR_ADDRESS), but JAX's cluster "
                               "detection found none: under SLURM start each task with `srun`; on TPU VMs "
                               "install JAX's TPU support on every worker (pip install '.[tpu]')")
        return None
    count = cluster.get_process_count()
    return ({}, f"{cluster.get_process_id()} of {count}", f"JAX's {cluster.__name__}") if count > 1 else None


def maybe_initialize() -> bool:
    """Initialise the JAX distributed runtime when this process is one of several (`start_up_plan`);
    True if it did. Never initialises twice. CPU processes use gloo for cross-process collectives. Process
    0 prints `describe_processes()` once all have joined."""
    if jax.distributed.is_initialized():
        return False
    timeout_s = init_timeout()
    plan = start_up_plan()
    if plan is None:
        return False
    kwargs, process, source = plan
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    initialize_within(timeout_s, process=process, source=source, **kwargs)
    if jax.process_index() == 0:
        print(f"distributed start-up through {source}: {describe_processes()}", flush=True)
    return True


def _hash32(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little", signed=True)


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, int]:
    """What every process of one run must agree on, as int32 values: JAX version, process and
    device counts, and hashes of the config's section names and of the whole config."""
    d = config.to_dict()
    return {"jax version (hash)": _hash32(jax.__version__), "jax.process_count()": jax.process_count(),
            "jax.device_count()": jax.device_count(), "jax.local_device_count()": jax.local_device_count(),
            "config sections (hash)": _hash32(_json(sorted(d))), "config (hash)": _hash32(_json(d))}


def section_hashes(config: ml_collections.ConfigDict) -> dict[str, int]:
    """{"config.<section> (hash)": int32 hash} for each top-level section, in sorted order."""
    d = config.to_dict()
    return {f"config.{k} (hash)": _hash32(_json(d[k])) for k in sorted(d)}


def disagreements(names: list[str], table: np.ndarray) -> list[str]:
    """table: (processes, len(names)) values gathered from every process. One line per column whose
    values are not all equal: "name: process 0 has a, process 1 has b"."""
    table = np.asarray(table)
    return [f"{name}: " + ", ".join(f"process {p} has {v}" for p, v in enumerate(table[:, j]))
            for j, name in enumerate(names) if (table[:, j] != table[0, j]).any()]


def check_processes_agree(config: ml_collections.ConfigDict,
                          gather: Callable[[np.ndarray], np.ndarray] = multihost_utils.process_allgather) -> None:
    """Raise ValueError naming what differs when the processes of a multi-process run were started
    with different configs (e.g. different --config overrides), JAX versions or device counts.

    Collective: every process must call it. `gather` maps this process's int32 vector to the
    (processes, n) table of all of them. A differing config is narrowed down to its sections
    (a second gather, taken by all processes alike since they see the same first table).
    """
    ours = fingerprint(config)
    lines = disagreements(list(ours), gather(np.asarray(list(ours.values()), np.int32)))
    if lines and all(line.startswith("config (hash)") for line in lines):
        sections = section_hashes(config)
        lines = disagreements(list(sections), gather(np.asarray(list(sections.values()), np.int32)))
    if lines:
        raise ValueError("the processes of this run disagree (start every process with the same command, "
                         "config and devices): " + "; ".join(lines))
