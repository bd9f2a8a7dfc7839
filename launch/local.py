"""Run the entry point as N processes on this machine, each with its own fake CPU devices,
joined by JAX's distributed runtime — a laptop-sized rehearsal of a multi-host run.

    python -m launch.local --num_processes 2 --devices_per_process 4 -- \
        --config experiments/configs/lm_tiny.py --workdir /tmp/mp --config.train.num_steps=20

Everything after `--` goes to `python -m jaxmodels.main`. Process 0 writes metrics and logs;
all processes write their shards of checkpoints. Add --dry-run to print the commands only.
"""

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time

from launch import split_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, *, port: int, num_processes: int, process_id: int, devices_per_process: int) -> dict:
    """Environment for process `process_id`: coordinator address, process count and id, and
    `devices_per_process` fake CPU devices (replacing any device-count flag already set)."""
    flags = [f for f in base.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    return {**base, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags),
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(num_processes),
            "JAX_PROCESS_ID": str(process_id)}


def launch(num_processes: int, devices_per_process: int, main_args: list[str], *, dry_run: bool = False,
           timeout: float | None = None) -> int:
    """Start the processes, stream process 0's output, wait for all; returns the first non-zero exit code."""
    port = free_port()
    cmd = [sys.executable, "-m", "jaxmodels.main", *main_args]
    envs = [process_env(dict(os.environ), port=port, num_processes=num_processes, process_id=i,
                        devices_per_process=devices_per_process) for i in range(num_processes)]
    for i, env in enumerate(envs):
        shown = " ".join(f"{k}={shlex.quote(env[k])}" for k in
                         ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS"))
        print(f"[launch.local] process {i}: {shown} {shlex.join(cmd)}", flush=True)
    if dry_run:
        return 0
    procs = [subprocess.Popen(cmd, env=env, stdout=None if i == 0 else subprocess.DEVNULL,
                              stderr=None if i == 0 else subprocess.PIPE) for i, env in enumerate(envs)]
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or (deadline and time.monotonic() > deadline):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
    codes = [p.returncode for p in procs]
    for i, p in enumerate(procs[1:], start=1):
        if codes[i]:
            print(f"[launch.local] process {i} exited {codes[i]}:\n{p.stderr.read().decode()[-3000:]}", file=sys.stderr)
    return next((c for c in codes if c), 0)


def main(argv=None) -> int:
    own, main_args = split_args(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument("--devices_per_process", type=int, default=4)
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = p.parse_args(own)
    if not main_args:
        p.error("give the entry point's arguments after `--`")
    return launch(args.num_processes, args.devices_per_process, main_args, dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
