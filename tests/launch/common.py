"""What the launcher tests share: the tiniest training run, fake cluster commands put first on PATH,
and the environment of simulated hosts (fake CPU devices, fast compiles)."""

import os
import stat

from tests.tiny import cli_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One layer, 16 tokens, 2 steps, one checkpoint at the end: the least a multi-host run must get through.
TINY_RUN = dict(data__seq_len=16, train__num_steps=2, train__log_every=1, train__checkpoint_every=2)


def entry_args(workdir) -> list[str]:
    """The entry point's arguments for the tiniest run in `workdir`."""
    return ["--config", "experiments/configs/lm_tiny.py", f"--workdir={workdir}", *cli_overrides(**TINY_RUN)]


def fake_command(bin_dir, name: str, text: str) -> None:
    """Write the executable bash script `bin_dir/name`: a stand-in for gcloud, sbatch or srun."""
    os.makedirs(bin_dir, exist_ok=True)
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
        f.write("#!/bin/bash\n" + text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


def hosts_env(bin_dir, devices_per_host: int, **extra) -> dict:
    """This environment with the fakes in `bin_dir` first on PATH and `devices_per_host` fake CPU devices
    per process, compiled at optimisation level 0. The runs import jaxmodels from the folder they start
    in, as `python -m` does on a worker."""
    return dict(os.environ, JAX_PLATFORMS="cpu", PATH=os.pathsep.join([str(bin_dir), os.environ["PATH"]]),
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_host} "
                          "--xla_backend_optimization_level=0", **extra)


def checkpoint_steps(workdir) -> list[int]:
    """The steps with a checkpoint in `workdir`."""
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []
