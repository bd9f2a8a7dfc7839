"""Preemption on several hosts: SIGTERM to one of two processes stops both at JAX's preemption sync point, where
orbax's preemption policy saves the same step on both (no per-step all-gather of a stop flag)."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

from tests.tiny import cli_overrides

ROOT = pathlib.Path(__file__).parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_to_one_host_stops_both_at_the_same_saved_step(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
               JAX_NUM_PROCESSES="2", XLA_FLAGS="--xla_force_host_platform_device_count=4 "
                                                "--xla_backend_optimization_level=0")
    cmd = [sys.executable, "-m", "jaxmodels.main", "--config", "experiments/configs/lm_tiny.py",
           "--workdir", str(tmp_path), *cli_overrides(train__num_steps=400, train__checkpoint_every=1000)]
    procs = [subprocess.Popen(cmd, env=dict(env, JAX_PROCESS_ID=str(i)), cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    metrics, deadline = tmp_path / "metrics.jsonl", time.monotonic() + 240
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], errors[0][-2000:] + errors[1][-2000:]
    saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
    assert len(saved) == 1 and 0 < saved[0] < 400  # the sync point, not an interval
    assert all(f"Reached preemption sync point, step={saved[0]}" in e for e in errors)
