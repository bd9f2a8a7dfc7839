"""One run per workdir: a lock file that process 0 holds for the length of a run.

`WORKDIR/run.lock` holds the owner's host, pid, start time and a heartbeat (refreshed at most every
HEARTBEAT_S while the run trains). A second run on the same workdir is refused with the owner's identity,
unless the lock is stale: its process is gone (same host) or its heartbeat is older than `stale_after_s`
(another host, whose processes cannot be seen from here).
"""

import json
import os
import socket
import time

import jax
from etils import epath
from jax.experimental import multihost_utils

HEARTBEAT_S = 60.0
STALE_AFTER_S = 900.0


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_reason(owner: dict, now: float, stale_after_s: float) -> str | None:
    """Why the lock `owner` (its JSON) no longer guards a live run; None when it may still."""
    if owner.get("host") == socket.gethostname():
        return None if _pid_alive(int(owner["pid"])) else f"process {owner['pid']} on this host has exited"
    age = now - float(owner["heartbeat"])
    return f"its heartbeat is {age:.0f} s old (> {stale_after_s:.0f} s)" if age > stale_after_s else None


class WorkdirLock:
    """The lock of `workdir` (a local path or URL). `acquire` before training, `heartbeat` every step (it
    writes at most every HEARTBEAT_S), `release` at the end. Only process 0 touches the file; every process
    learns its verdict, so all of them refuse together."""

    def __init__(self, workdir, *, stale_after_s: float = STALE_AFTER_S):
        self.path = epath.Path(workdir) / "run.lock"
        self.stale_after_s, self.held, self._last_beat = stale_after_s, False, 0.0
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}

    def acquire(self) -> None:
        """Take the lock or raise WorkdirLockedError naming the live run that holds it."""
        error = self._try_acquire() if jax.process_index() == 0 else ""
        if jax.process_count() > 1:
            failed = multihost_utils.broadcast_one_to_all(int(bool(error)))
            error = error or ("process 0 could not lock the workdir; see its log" if failed else "")
        if error:
            raise WorkdirLockedError(error)
        self.held = jax.process_index() == 0

    def _try_acquire(self) -> str:
        """'' when the lock is now ours, else why not."""
        if self.path.exists():
            owner = json.loads(self.path.read_text())
            reason = stale_reason(owner, time.time(), self.stale_after_s)
            if reason is None:
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["started"]))
                return (f"{self.path.parent} is in use by another run (pid {owner['pid']} on {owner['host']}, "
                        f"started {started}); wait for it to end or stop it, or use another --workdir. If that "
                        f"run is dead, delete {self.path}")
            print(f"taking over the stale lock of {self.path} ({reason})", flush=True)
            self.path.unlink()
        self._write(exclusive=True)
        return "" if json.loads(self.path.read_text())["pid"] == self.owner["pid"] else "lost a race for the lock"

    def _write(self, exclusive: bool = False) -> None:
        self._last_beat = time.time()
        text = json.dumps({**self.owner, "heartbeat": self._last_beat})
        if exclusive and "://" not in os.fspath(self.path):  # local: atomic create, one winner
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        else:  # object stores have no exclusive create: write, then `_try_acquire` reads back the winner
            self.path.write_text(text)

    def heartbeat(self) -> None:
        """Refresh the lock's heartbeat if it is older than HEARTBEAT_S."""
        if self.held and time.time() - self._last_beat > HEARTBEAT_S:
            self._write()

    def release(self) -> None:
        if self.held and self.path.exists():
            self.path.unlink()
        self.held = False
