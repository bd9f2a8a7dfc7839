"""Multi-host start-up: call `jax.distributed.initialize` when launched by a multi-process launcher."""

import os

import jax

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
