"""One run per workdir: a second run is refused while the first lives; stale locks are taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from jaxmodels.train.workdir import WorkdirLock, WorkdirLockedError, stale_reason


def test_a_second_lock_on_a_live_run_is_refused_and_names_the_owner(tmp_path):
    first = WorkdirLock(tmp_path)
    first.acquire()
    with pytest.raises(WorkdirLockedError, match=rf"in use by another run \(pid {os.getpid()} on "):
        WorkdirLock(tmp_path).acquire()
    first.release()
    second = WorkdirLock(tmp_path)
    second.acquire()  # free again
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    second.release()
    assert not (tmp_path / "run.lock").exists()


def test_the_lock_of_a_dead_process_on_this_host_is_stale(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                   "started": 0.0, "heartbeat": 0.0}))
    lock = WorkdirLock(tmp_path)
    lock.acquire()
    assert "taking over the stale lock" in capsys.readouterr().out
    lock.release()


def test_another_hosts_lock_is_stale_only_when_its_heartbeat_is_old():
    now = time.time()
    owner = {"host": "another-host", "pid": 1, "started": now - 5000}
    assert stale_reason({**owner, "heartbeat": now - 60}, now, 900) is None
    assert "heartbeat is 1000 s old" in stale_reason({**owner, "heartbeat": now - 1000}, now, 900)
