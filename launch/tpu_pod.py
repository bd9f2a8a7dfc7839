"""Run the entry point on every worker of a Cloud TPU VM slice (v4, v5e, v5p, v6e), detached, one commit.

    python -m launch.tpu_pod --tpu my-v5p-64 --zone us-east5-a --repo https://github.com/me/jaxmodels -- \\
        --config experiments/configs/lm_tiny.py --workdir gs://my-bucket/runs/lm --config.model.dtype=bfloat16

Everything after `--` goes to `python -m jaxmodels.main`. The launcher checks that the TPU exists in the
zone and is READY, writes a worker script, copies it to every worker (`gcloud compute tpus tpu-vm scp
--worker=all`) and runs it there (`... ssh --worker=all`). On each worker the script

1. provisions Python 3.11 in a venv with uv. Stock TPU VM images ship Python 3.10 and the project needs
   >= 3.11. uv is one static binary installed without root into ~/.local/bin; it fetches a prebuilt
   CPython in seconds. deadsnakes needs apt and a PPA that lags new Ubuntu releases, and pyenv compiles
   Python on every worker (minutes, build dependencies).
2. checks out one commit: the local HEAD, or --commit. It clones --repo on first use, then fetches and
   checks out on every launch, so every worker runs exactly that code. Uncommitted local changes are
   refused unless --allow-dirty, because the workers would not run them.
3. installs the project with its `tpu` extra (jax[tpu], libtpu) into the venv.
4. stops what still holds the TPU. Earlier runs get SIGTERM first, which saves a checkpoint. Then any
   other process holding /dev/accel* or /dev/vfio/* is killed.
5. starts the run detached (setsid nohup), with the output in this worker's ~/jaxmodels-logs/NAME.log
   and its pid in NAME.pid.

JAX finds the other workers from the TPU metadata server (`jax.distributed.initialize()`; see
jaxmodels/parallel/distributed.py). The workdir must be shared storage, such as a gs:// bucket. The
launcher then prints how to follow the logs and how to stop the run. Running the same command again
with the same workdir resumes from the newest checkpoint. --dry-run prints the script and every
command and runs nothing. --skip-setup skips steps 1-3 on workers that are already set up, and checks
that they are at the commit.
"""

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from launch import (
    LaunchError,
    checkout_lines,
    follow_table,
    git,
    launcher_parser,
    repo_root,
    resolve_commit,
    run_launcher,
    run_name,
    shell_path,
    verify_lines,
)

PYTHON_VERSION = "3.11"
LOG_DIR = "~/jaxmodels-logs"
REMOTE_SCRIPT = "jaxmodels-launch.sh"  # in each worker's home directory
STOP_GRACE_S = 120  # how long an earlier run may take to save its checkpoint before it is killed


@dataclass(frozen=True)
class Pod:
    """A TPU VM slice and how gcloud addresses it."""
    tpu: str
    zone: str
    project: str | None = None

    def gcloud(self, verb: str, *args: str) -> list[str]:
        """`gcloud compute tpus tpu-vm VERB ARGS --zone=... [--project=...]`."""
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={self.zone}",
                *([f"--project={self.project}"] if self.project else [])]

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        """Run `command` on `worker` (a number, or all)."""
        return self.gcloud("ssh", self.tpu, f"--worker={worker}", f"--command={command}")


def setup_lines(url: str, commit: str) -> list[str]:
    """Steps 1-3: uv and a Python 3.11 venv, the code at `commit` in $REPO, the project with its tpu extra."""
    return ["# 1. Python 3.11 in a venv (stock TPU VM images have 3.10)",
            'export PATH="$HOME/.local/bin:$PATH"',
            "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh",
            f"# 2. the code: exactly commit {commit}", *checkout_lines(url, '"$REPO"', commit, fetch=True),
            "# 3. the project and jax[tpu]",
            f'test -x "$REPO/.venv/bin/python" || uv venv --quiet --python {PYTHON_VERSION} "$REPO/.venv"',
            'uv pip install --quiet --python "$REPO/.venv/bin/python" -e "$REPO[tpu]"']


def stop_lines() -> list[str]:
    """Step 4: SIGTERM earlier runs (pid files next to $LOG), kill them after STOP_GRACE_S, then kill any
    other process that holds the TPU."""
    return ["# 4. stop what still holds the TPU: earlier runs (SIGTERM saves a checkpoint), then anything else",
            'running() { grep -qs jaxmodels.main "/proc/$1/cmdline"; }  # alive, and no other process with its pid',
            'for f in "$(dirname "$LOG")"/*.pid; do',
            '  [ -e "$f" ] || continue',
            '  pid=$(cat "$f"); rm -f "$f"',
            '  running "$pid" || continue',
            '  echo "$(hostname): stopping the earlier run $f (pid $pid) with SIGTERM"',
            '  kill -TERM "$pid"',
            f'  for _ in $(seq {STOP_GRACE_S}); do running "$pid" || break; sleep 1; done',
            '  ! running "$pid" || kill -KILL "$pid"',
            "done",
            "holders=$(sudo -n lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u || true)",
            'if [ -n "$holders" ]; then',
            '  echo "$(hostname): killing processes that hold the TPU: $holders"',
            '  sudo -n kill -KILL $holders || echo "$(hostname): could not kill $holders; the run may not get the TPU"',
            "fi"]


def start_lines(python: str, main_args: list[str]) -> list[str]:
    """Step 5: the run from $REPO, detached from the ssh session, appending to $LOG, its pid in $PID and
    its exit code as the log's last line."""
    run = shlex.join([python, "-m", "jaxmodels.main", *main_args])
    inner = f'{run} & echo $! > "$PID"; wait $!; echo "[launch.tpu_pod] exit code $?"'
    return ["# 5. start the run detached, output to this worker's log",
            'cd "$REPO"',
            'echo "=== $(date -u +%FT%TZ) $(hostname) commit $(git rev-parse HEAD)" >> "$LOG"',
            f'PID="$PID" setsid nohup bash -c {shlex.quote(inner)} >> "$LOG" 2>&1 < /dev/null &',
            'for _ in $(seq 100); do test -s "$PID" && break; sleep 0.1; done',
            'echo "$(hostname): started process $(cat "$PID"), log $LOG"']


def worker_script(*, repo_dir: str, url: str | None, commit: str, python: str, main_args: list[str],
                  name: str, skip_setup: bool) -> str:
    """The bash script every worker runs (steps 1-5 of the module docstring)."""
    logs = shell_path(LOG_DIR)
    lines = ["#!/bin/bash", f"# launch/tpu_pod.py: run {name!r} at commit {commit} on this worker.",
             "set -euo pipefail", f"REPO={shell_path(repo_dir)}", f"LOG={logs}/{name}.log",
             f"PID={logs}/{name}.pid", 'mkdir -p "$(dirname "$LOG")"']
    lines += verify_lines('"$REPO"', commit) if skip_setup else setup_lines(url, commit)
    lines += stop_lines() + start_lines(python, main_args)
    return "\n".join(lines) + "\n"


def check_tpu(pod: Pod) -> None:
    """LaunchError unless gcloud sees `pod.tpu` in `pod.zone` and it is READY."""
    cmd = pod.gcloud("describe", pod.tpu, "--format=value(state)")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise LaunchError("gcloud is not installed: install the Google Cloud CLI "
                          "(https://cloud.google.com/sdk/docs/install) and run `gcloud auth login`") from None
    where = f"zone {pod.zone}" + (f", project {pod.project}" if pod.project else ", the default project")
    if r.returncode:
        raise LaunchError(f"TPU {pod.tpu!r} is not visible in {where}. gcloud says: {r.stderr.strip()}\n"
                          f"List the TPUs there with: {shlex.join(pod.gcloud('list'))}; "
                          "check --tpu, --zone and --project (`gcloud config get project`)")
    state = r.stdout.strip()
    if state != "READY":
        raise LaunchError(f"TPU {pod.tpu!r} in {where} is {state or 'in no state'}, not READY; wait until "
                          f"{shlex.join(cmd)} prints READY, or recreate it")


def how_to_follow(pod: Pod, name: str) -> str:
    """The commands to follow the run's logs and to stop it."""
    log, pid = f"{LOG_DIR}/{name}.log", f"{LOG_DIR}/{name}.pid"
    return follow_table({"follow worker 0": shlex.join(pod.ssh(f"tail -f {log}", worker="0")),
                         "all workers' tail": shlex.join(pod.ssh(f"tail -n 3 {log}")),
                         "stop (checkpoint)": shlex.join(pod.ssh(f"kill -TERM $(cat {pid})"))})


def parser() -> argparse.ArgumentParser:
    """This launcher's command line."""
    p = launcher_parser("python -m launch.tpu_pod", __doc__)
    p.add_argument("--tpu", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None, help="default: gcloud's configured project")
    p.add_argument("--repo", default=None, help="git URL the workers clone (default: this checkout's origin)")
    p.add_argument("--repo_dir", default="~/jaxmodels", help="the checkout on each worker")
    p.add_argument("--python", default=".venv/bin/python", help="the interpreter, relative to --repo_dir or absolute")
    p.add_argument("--skip-setup", action="store_true",
                   help="skip uv, venv, install and checkout; check that the workers are at the commit")
    return p


def launch(args: argparse.Namespace, main_args: list[str]) -> int:
    """Print the worker script and every command, then (unless --dry-run) check the TPU and run them."""
    root = repo_root()
    commit = resolve_commit(root, args.commit, allow_dirty=args.allow_dirty)
    url = None if args.skip_setup else (args.repo or git(root, "remote", "get-url", "origin"))
    if url and not git(root, "branch", "-r", "--contains", commit):
        print(f"[launch.tpu_pod] warning: no remote branch here contains {commit}; push it, or the workers' "
              "checkout will fail", file=sys.stderr)
    name = run_name(main_args, args.name)
    pod = Pod(args.tpu, args.zone, args.project)
    script = worker_script(repo_dir=args.repo_dir, url=url, commit=commit, python=args.python,
                           main_args=main_args, name=name, skip_setup=args.skip_setup)
    fd, local = tempfile.mkstemp(prefix=f"jaxmodels-launch-{name}-", suffix=".sh")
    with os.fdopen(fd, "w") as f:
        f.write(script)
    commands = [pod.gcloud("describe", pod.tpu, "--format=value(state)"),
                pod.gcloud("scp", local, f"{pod.tpu}:{REMOTE_SCRIPT}", "--worker=all"),
                pod.ssh(f"bash {REMOTE_SCRIPT}")]
    print(f"[launch.tpu_pod] worker script ({local}):\n{script}", flush=True)
    print("[launch.tpu_pod] commands:\n" + "\n".join(shlex.join(c) for c in commands), flush=True)
    if not args.dry_run:
        check_tpu(pod)
        for cmd in commands[1:]:
            if subprocess.call(cmd):
                raise LaunchError(f"`{shlex.join(cmd)}` failed; its output above names the worker and the step")
    print(f"[launch.tpu_pod] {'dry run: nothing was run' if args.dry_run else 'started on every worker'}.\n"
          + how_to_follow(pod, name), flush=True)
    return 0


def main(argv=None) -> int:
    return run_launcher(parser(), launch, argv)


if __name__ == "__main__":
    sys.exit(main())
