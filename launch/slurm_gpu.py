"""Submit the entry point as a SLURM job on GPU nodes: one process per node driving all its GPUs.

    python -m launch.slurm_gpu --nodes 2 --gpus_per_node 8 --partition gpu --time 04:00:00 -- \
        --config experiments/configs/lm_tiny.py --workdir /shared/runs/lm_tiny \
        --config.model.dtype=bfloat16

Writes an sbatch script (printed first), then submits it with `sbatch`. Inside the job, `srun`
starts one task per node; `jax.distributed.initialize()` reads SLURM's environment to find the
coordinator and process ids. The workdir must be on a file system every node sees.
--dry-run prints the script without submitting.
"""

import argparse
import os
import shlex
import subprocess
import sys
import tempfile

from launch import split_args


def sbatch_script(*, nodes: int, gpus_per_node: int, partition: str | None, time_limit: str, job_name: str,
                  repo_dir: str, main_args: list[str], setup: str = "") -> str:
    """The batch script text."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={gpus_per_node}",
             f"#SBATCH --time={time_limit}", "#SBATCH --output=%x-%j.out"]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += ["set -euo pipefail", f"cd {shlex.quote(repo_dir)}"]
    if setup:
        lines.append(setup)
    lines.append("srun " + shlex.join(["python3", "-m", "jaxmodels.main", *main_args]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    own, main_args = split_args(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default="01:00:00")
    p.add_argument("--job_name", default="jaxmodels")
    p.add_argument("--repo_dir", default=os.getcwd())
    p.add_argument("--setup", default="", help="shell line run before srun (e.g. 'source .venv/bin/activate')")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(own)
    if not main_args:
        p.error("give the entry point's arguments after `--`")
    script = sbatch_script(nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition,
                           time_limit=args.time, job_name=args.job_name, repo_dir=args.repo_dir,
                           main_args=main_args, setup=args.setup)
    print("[launch.slurm_gpu] sbatch script:\n" + script, flush=True)
    if args.dry_run:
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
        f.write(script)
    return subprocess.call(["sbatch", f.name])


if __name__ == "__main__":
    sys.exit(main())
