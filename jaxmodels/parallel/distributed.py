"""Multi-host start-up: call `jax.distributed.initialize` when launched by a multi-process launcher,
and check that every process runs the same config on the same devices."""

import hashlib
import json
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def launched_multiprocess(environ=os.environ) -> bool:
    """True under our launchers (explicit coordinator env), SLURM with >1 task, or a multi-host TPU slice."""
    if all(k in environ for k in COORDINATOR_ENV):
        return int(environ["JAX_NUM_PROCESSES"]) > 1
    if int(environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return "," in environ.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in environ


def maybe_initialize(environ=os.environ) -> None:
    """Initialise the JAX distributed runtime when this process is one of several; no-op otherwise.

    With JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set (launch/local.py sets
    them) those are used; on SLURM and TPU pods JAX detects the cluster itself. CPU processes use
    gloo for cross-process collectives.
    """
    if not launched_multiprocess(environ):
        return
    if jax.config.jax_platforms in (None, "", "cpu") or environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if all(k in environ for k in COORDINATOR_ENV):
        jax.distributed.initialize(coordinator_address=environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()


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
