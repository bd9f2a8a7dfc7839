"""launch/tpu_pod.py: the dry run, the up-front TPU check, the worker script's steps (checkout against a
local repository, stopping an earlier run), and a whole launch on a simulated 2-host slice: a fake
`gcloud` runs the worker script as two local "workers" (each its own home folder, 4 fake CPU devices),
which initialise together, train and write one checkpoint in a shared workdir."""

import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

from launch import LaunchError, checkout_lines, resolve_commit, tpu_pod
from tests.launch.common import ROOT, checkpoint_steps, entry_args, fake_command, hosts_env

FAKE_GCLOUD = r"""# gcloud compute tpus tpu-vm VERB ...: a slice of $FAKE_WORKERS local workers, worker i's home is
# $FAKE_HOMES/worker<i>. The coordinator variables stand in for what JAX reads from the TPU metadata server.
echo "fake gcloud $*" >> "$FAKE_HOMES/gcloud.calls"
case "$4" in
  describe)
    if [ "$5" = missing ]; then
      echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource 'missing' was not found" >&2; exit 1
    fi
    echo READY;;
  scp)
    for i in $(seq 0 $((FAKE_WORKERS - 1))); do
      mkdir -p "$FAKE_HOMES/worker$i" && cp "$5" "$FAKE_HOMES/worker$i/${6#*:}"
    done;;
  ssh)
    for a in "$@"; do case "$a" in --command=*) command="${a#--command=}";; esac; done
    for i in $(seq 0 $((FAKE_WORKERS - 1))); do
      (cd "$FAKE_HOMES/worker$i" && HOME="$FAKE_HOMES/worker$i" JAX_COORDINATOR_ADDRESS="127.0.0.1:$FAKE_PORT" \
        JAX_NUM_PROCESSES=$FAKE_WORKERS JAX_PROCESS_ID=$i bash -c "$command") || exit $?
    done;;
esac
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def slice_env(tmp_path):
    """The environment of a launch on the fake 2-worker slice (homes under tmp_path/homes)."""
    fake_command(tmp_path / "bin", "gcloud", FAKE_GCLOUD)
    (tmp_path / "homes").mkdir()
    return hosts_env(tmp_path / "bin", 4, FAKE_WORKERS="2", FAKE_HOMES=str(tmp_path / "homes"),
                     FAKE_PORT=str(_free_port()), TMPDIR=str(tmp_path))  # the launcher's script lands in TMPDIR


def _launch(env, *own, workdir):
    args = ["--zone", "us-central2-b", "--skip-setup", "--allow-dirty", "--repo_dir", ROOT, "--python", sys.executable,
            *own, "--", *entry_args(workdir)]
    return subprocess.run([sys.executable, "-m", "launch.tpu_pod", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                   env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                            GIT_COMMITTER_EMAIL="t@t"))


def _commit(repo, text):
    (repo / "file.txt").write_text(text)
    _git(repo, "add", "file.txt")
    _git(repo, "commit", "-qm", text)
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def test_dry_run_prints_the_script_and_every_command_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = tpu_pod.main(["--tpu", "my-v5p-64", "--zone", "us-east5-a", "--repo", "https://example.com/j.git",
                         "--allow-dirty", "--dry-run", "--", "--config", "c.py", "--workdir", "gs://b/runs/lm"])
    out = capsys.readouterr().out
    assert code == 0
    script_path = out.split("worker script (", 1)[1].split(")", 1)[0]
    assert subprocess.run(["bash", "-n", script_path]).returncode == 0
    for expected in ["uv venv --quiet --python 3.11", '-e "$REPO[tpu]"', "git clone --quiet https://example.com/j.git",
                     "checkout --quiet --force --detach", "lsof -t /dev/accel* /dev/vfio/*", "setsid nohup",
                     "gcloud compute tpus tpu-vm describe my-v5p-64 '--format=value(state)' --zone=us-east5-a",
                     f"gcloud compute tpus tpu-vm scp {script_path} my-v5p-64:jaxmodels-launch.sh --worker=all",
                     "'--command=bash jaxmodels-launch.sh'", "'--command=tail -f ~/jaxmodels-logs/lm.log'",
                     "'--command=kill -TERM $(cat ~/jaxmodels-logs/lm.pid)'", "dry run: nothing was run"]:
        assert expected in out, expected


def test_a_tpu_it_cannot_see_is_a_clear_error_before_anything_runs(slice_env, tmp_path):
    r = _launch(slice_env, "--tpu", "missing", workdir=tmp_path / "run")
    assert r.returncode == 2
    assert "error: TPU 'missing' is not visible in zone us-central2-b, the default project" in r.stderr
    assert "NOT_FOUND" in r.stderr and "gcloud compute tpus tpu-vm list --zone=us-central2-b" in r.stderr
    calls = (tmp_path / "homes" / "gcloud.calls").read_text()
    assert "describe" in calls and "scp" not in calls and "ssh" not in calls


def test_uncommitted_changes_are_refused_unless_allowed(tmp_path):
    repo = tmp_path / "repo"
    _git(tmp_path, "init", "-q", str(repo))
    head = _commit(repo, "one")
    (repo / "file.txt").write_text("edited")
    with pytest.raises(LaunchError, match="(?s)uncommitted changes, which the workers would not run:.*--allow-dirty"):
        resolve_commit(str(repo), None, allow_dirty=False)
    assert resolve_commit(str(repo), None, allow_dirty=True) == head


def test_the_checkout_step_puts_exactly_the_named_commit_on_a_worker(tmp_path):
    origin = tmp_path / "origin"
    _git(tmp_path, "init", "-q", str(origin))
    first = _commit(origin, "first")
    worker = tmp_path / "worker"

    def checkout(commit):
        script = "set -euo pipefail\n" + "\n".join(checkout_lines(str(origin), str(worker), commit, fetch=True))
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True)

    assert checkout(first).returncode == 0 and (worker / "file.txt").read_text() == "first"  # fresh clone
    second = _commit(origin, "second")
    (worker / "file.txt").write_text("left over from an earlier launch")
    assert checkout(second).returncode == 0 and (worker / "file.txt").read_text() == "second"  # fetched, forced
    assert checkout(first).returncode == 0 and (worker / "file.txt").read_text() == "first"
    r = checkout("0" * 40)
    assert r.returncode == 1 and f"commit {'0' * 40} is not in {origin}: push it first" in r.stderr


def test_the_stop_step_sends_an_earlier_run_sigterm(tmp_path):
    earlier = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "jaxmodels.main"])
    try:
        (tmp_path / "old.pid").write_text(str(earlier.pid))
        script = f"set -euo pipefail\nLOG={tmp_path}/new.log\n" + "\n".join(tpu_pod.stop_lines())
        r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert earlier.wait(timeout=10) == -15 and f"stopping the earlier run {tmp_path}/old.pid" in r.stdout
        assert not (tmp_path / "old.pid").exists()
    finally:
        if earlier.poll() is None:
            earlier.kill()


def _wait_for_exit_codes(logs, timeout_s):
    """The exit code each worker's log ends with, waiting for the detached runs to finish."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(p.exists() and "exit code" in p.read_text() for p in logs):
        time.sleep(0.5)
    return [int(p.read_text().rsplit("exit code", 1)[1].split()[0]) if p.exists() and "exit code" in p.read_text()
            else None for p in logs]


def test_a_two_host_slice_initialises_together_trains_and_checkpoints(slice_env, tmp_path):
    workdir = tmp_path / "shared" / "run"
    r = _launch(slice_env, "--tpu", "fake-v4-16", workdir=workdir)
    homes = tmp_path / "homes"
    logs = [homes / f"worker{i}" / "jaxmodels-logs" / "run.log" for i in range(2)]
    try:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert len(re.findall(r"started process \d+", r.stdout)) == 2 and "follow worker 0:" in r.stdout
        codes = _wait_for_exit_codes(logs, timeout_s=300)
    finally:  # the runs are detached: stop any still running (their pids are in the workers' pid files)
        for pid_file in homes.glob("worker*/jaxmodels-logs/run.pid"):
            subprocess.run(["kill", "-KILL", pid_file.read_text().strip()], capture_output=True)
    assert codes == [0, 0], "\n".join(p.read_text()[-3000:] for p in logs if p.exists())
    first = logs[0].read_text()
    assert "distributed start-up through JAX_COORDINATOR_ADDRESS: 2 processes x 4 cpu devices = 8 devices" in first
    assert checkpoint_steps(workdir) == [2]
