"""Run the entry point on every worker of a Cloud TPU VM slice (v4/v5/v6 pods).

    python -m launch.tpu_pod --tpu my-v5p-64 --zone us-east5-a --repo_dir ~/jaxmodels -- \
        --config experiments/configs/lm_tiny.py --workdir gs://my-bucket/runs/lm_tiny \
        --config.model.dtype=bfloat16

It runs `gcloud compute tpus tpu-vm ssh TPU --worker=all --command "..."`: the same command on
every host, where `jax.distributed.initialize()` discovers the slice by itself. Prerequisites on
each worker: this repository at --repo_dir and `pip install -e .` (use --setup to do both from a
git URL). The workdir must be shared storage (a GCS bucket) so every host's checkpoint shards
land in one place. Prints the command first; --dry-run prints only.
"""

import argparse
import shlex
import subprocess
import sys

from launch import split_args


def remote_command(repo_dir: str, main_args: list[str], setup_repo: str | None = None) -> str:
    """The shell line each worker runs."""
    steps = []
    if setup_repo:
        steps += [f"(test -d {repo_dir} || git clone {shlex.quote(setup_repo)} {repo_dir})",
                  f"pip install -q -e {repo_dir}"]
    steps += [f"cd {repo_dir}", shlex.join(["python3", "-m", "jaxmodels.main", *main_args])]
    return " && ".join(steps)


def gcloud_command(tpu: str, zone: str, project: str | None, command: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}", "--worker=all",
           f"--command={command}"]
    return cmd + ([f"--project={project}"] if project else [])


def main(argv=None) -> int:
    own, main_args = split_args(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tpu", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None)
    p.add_argument("--repo_dir", default="~/jaxmodels")
    p.add_argument("--setup", default=None, metavar="GIT_URL", help="clone this repo and pip install it first")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(own)
    if not main_args:
        p.error("give the entry point's arguments after `--`")
    cmd = gcloud_command(args.tpu, args.zone, args.project, remote_command(args.repo_dir, main_args, args.setup))
    print("[launch.tpu_pod] " + shlex.join(cmd), flush=True)
    return 0 if args.dry_run else subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
