"""Submit the entry point as a SLURM job on GPU nodes: one commit, one task per node driving all its GPUs.

    python -m launch.slurm_gpu --nodes 2 --gpus_per_node 8 --partition gpu --time 04:00:00 \\
        --setup 'source ~/venvs/jaxmodels/bin/activate' -- \\
        --config experiments/configs/lm_tiny.py --workdir /shared/runs/lm --config.model.dtype=bfloat16

Everything after `--` goes to `python -m jaxmodels.main`. The launcher writes an sbatch script, prints it
and submits it with `sbatch`. When the job starts, the script

1. checks out one commit: the local HEAD, or --commit. It clones this checkout into --code_dir/COMMIT,
   so the job runs exactly that commit even if the checkout changes while the job waits in the queue.
   Uncommitted changes are refused unless --allow-dirty.
2. runs --setup (e.g. activating a venv that has `pip install -e '.[gpu]'`);
3. starts one task per node with `srun`. JAX reads the coordinator, process count and id from SLURM's
   variables (`jax.distributed.initialize()`; see jaxmodels/parallel/distributed.py).
   JAX_LOCAL_DEVICE_IDS gives each task every GPU of its node, because JAX's SLURM detection would
   otherwise give each task one GPU. Each task writes its own log, --log_dir/NAME-JOBID-taskN.log.

SLURM sends SIGTERM two minutes before the time limit (`--signal=TERM@120`), and the run saves a
checkpoint then. The workdir and --code_dir must be on a file system every node sees. The launcher
prints how to follow the logs and how to stop the run. Running the same command again with the same
workdir resumes from the newest checkpoint. --dry-run prints the script and the sbatch command and
submits nothing.
"""

import argparse
import os
import shlex
import subprocess
import sys
import tempfile

from launch import (
    LaunchError,
    checkout_lines,
    follow_table,
    launcher_parser,
    repo_root,
    resolve_commit,
    run_launcher,
    run_name,
)

SIGNAL_BEFORE_LIMIT_S = 120  # SIGTERM this long before the time limit: time to save a checkpoint


def sbatch_script(*, nodes: int, gpus_per_node: int, partition: str | None, time_limit: str, name: str,
                  url: str, commit: str, code_dir: str, log_dir: str, setup: str, python: str,
                  main_args: list[str]) -> str:
    """The batch script: SBATCH directives, the checkout of `commit`, `setup`, and the srun line."""
    directives = [f"--job-name={name}", f"--nodes={nodes}", "--ntasks-per-node=1", f"--gpus-per-node={gpus_per_node}",
                  f"--time={time_limit}", f"--signal=TERM@{SIGNAL_BEFORE_LIMIT_S}",
                  f"--output={log_dir}/%x-%j.out", *([f"--partition={partition}"] if partition else [])]
    code = shlex.quote(f"{code_dir}/{commit}")
    srun = ["srun", "--kill-on-bad-exit=1", f"--output={log_dir}/%x-%j-task%t.log",
            python, "-m", "jaxmodels.main", *main_args]
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives),
             f"# launch/slurm_gpu.py: run {name!r} at commit {commit}, one task per node with all its GPUs.",
             "set -euo pipefail",
             "# the code: exactly this commit, in a checkout of its own",
             *checkout_lines(url, code, commit, fetch=False), f"cd {code}",
             *([setup] if setup else []),
             "# every task drives all GPUs of its node (JAX's SLURM detection would give each task one)",
             "export JAX_LOCAL_DEVICE_IDS=" + ",".join(str(i) for i in range(gpus_per_node)),
             shlex.join(srun)]
    return "\n".join(lines) + "\n"


def how_to_follow(log_dir: str, name: str, job: str) -> str:
    """The commands to follow the job's logs, see its state and stop it."""
    return follow_table({"follow task 0": f"tail -f {log_dir}/{name}-{job}-task0.log",
                         "job state": f"squeue -j {job}", "stop (checkpoint)": f"scancel --signal=TERM {job}",
                         "stop now": f"scancel {job}"})


def parser() -> argparse.ArgumentParser:
    """This launcher's command line."""
    p = launcher_parser("python -m launch.slurm_gpu", __doc__)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default="01:00:00", help="time limit, HH:MM:SS")
    p.add_argument("--setup", default="", help="shell line run before srun (e.g. 'source ~/venv/bin/activate')")
    p.add_argument("--python", default="python3", help="the interpreter the tasks run")
    p.add_argument("--code_dir", default="~/jaxmodels-code", help="shared folder of per-commit checkouts")
    p.add_argument("--log_dir", default="~/jaxmodels-logs", help="shared folder of the job's and tasks' logs")
    return p


def launch(args: argparse.Namespace, main_args: list[str]) -> int:
    """Print the sbatch script and command, then (unless --dry-run) submit it and say how to follow it."""
    root = repo_root()
    commit = resolve_commit(root, args.commit, allow_dirty=args.allow_dirty)
    name = run_name(main_args, args.name)
    log_dir, code_dir = os.path.expanduser(args.log_dir), os.path.expanduser(args.code_dir)
    script = sbatch_script(nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition,
                           time_limit=args.time, name=name, url=root, commit=commit, code_dir=code_dir,
                           log_dir=log_dir, setup=args.setup, python=args.python, main_args=main_args)
    fd, path = tempfile.mkstemp(prefix=f"jaxmodels-{name}-", suffix=".sbatch")
    with os.fdopen(fd, "w") as f:
        f.write(script)
    submit = ["sbatch", "--parsable", path]
    print(f"[launch.slurm_gpu] sbatch script ({path}):\n{script}\n[launch.slurm_gpu] command:\n{shlex.join(submit)}",
          flush=True)
    if args.dry_run:
        print("[launch.slurm_gpu] dry run: nothing was submitted.\n" + how_to_follow(log_dir, name, "JOBID"))
        return 0
    os.makedirs(log_dir, exist_ok=True)  # SLURM does not create the folder of --output
    try:
        r = subprocess.run(submit, capture_output=True, text=True)
    except FileNotFoundError:
        raise LaunchError("sbatch is not on PATH: run this on a SLURM login node") from None
    if r.returncode:
        raise LaunchError(f"sbatch refused the job: {r.stderr.strip()}\ncheck --partition, --gpus_per_node and "
                          "--time against `sinfo -o '%P %G %l'`")
    job = r.stdout.strip().split(";")[0]
    print(f"[launch.slurm_gpu] submitted job {job}.\n" + how_to_follow(log_dir, name, job), flush=True)
    return 0


def main(argv=None) -> int:
    return run_launcher(parser(), launch, argv)


if __name__ == "__main__":
    sys.exit(main())
