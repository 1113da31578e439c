"""One run per output directory: a lock file held for the whole run.

Two runs writing one `--output_dir` overwrite each other's checkpoints and leave a directory
that mixes them, so the second is refused, naming the first. The lock is `OUTPUT_DIR/.lmforge.lock`,
a small JSON file (process id, host, the process' start time, the command) created with
`O_CREAT | O_EXCL`, which is atomic on local file systems and on NFS (v3 and later), Lustre and
GPFS: of two processes creating it at once, exactly one succeeds. Only the main process of a
run (the one that saves) takes it; a launcher ends the other processes when it exits with the
refusal.

A lock left by a process that died (SIGKILL, a lost node) is taken over:
- on the same host, when its process is gone, or the process id now belongs to a process started
  at another time (a reused id);
- from another host, whose processes cannot be seen from here, when it has not been refreshed
  for `STALE_AFTER_S`: the holder rewrites its time stamp every `HEARTBEAT_S` from a background
  thread, so a live run on any node of a shared file system keeps its lock.
A stale lock is first renamed to a name of the taker's own (atomic: of two takers only one
rename succeeds), then the taker creates the lock as above.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass

from lmforge.errors import LmforgeError

LOCK_NAME = ".lmforge.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0  # ten missed heartbeats: a node that is this late is taken for dead


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: enough to name it and to tell whether it is still alive."""

    pid: int
    host: str
    process_start: str | None
    """The process' start time as the kernel counts it (Linux), to tell a reused process id."""
    started: float
    command: str


def _process_start(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot), or None off Linux."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` of this host is running (and, with `started`, is the process that
    started then, not a later one given the same id)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    start = _process_start(pid)
    return started is None or start is None or start == started


def _read(path: str) -> tuple[Holder | None, float]:
    """The holder a lock file names (None where it does not read: a lock being written) and the
    time it was last refreshed."""
    try:
        refreshed = os.stat(path).st_mtime
        with open(path, encoding="utf-8") as f:
            return Holder(**json.load(f)), refreshed
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError):
        return None, refreshed


def describe(holder: Holder | None) -> str:
    if holder is None:
        return "a run whose lock file is being written"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.started))
    return f"process {holder.pid} on {holder.host}, started {when}: {holder.command}"


class RunLock:
    """The lock of one output directory, held from `acquire` to `release` (a context manager)."""

    def __init__(self, output_dir: str, command: str | None = None, clock=time.time):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.clock = clock
        pid = os.getpid()
        self.holder = Holder(pid, socket.gethostname(), _process_start(pid), clock(),
                             command or " ".join(["lmforge", *sys.argv[1:]]))
        self.taken_over: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise `LmforgeError` naming the run that holds it."""
        for _ in range(3):  # a lock that vanishes between a failed create and its read: try again
            if self._create():
                self._start_heartbeat()
                return self
            try:
                holder, refreshed = _read(self.path)
            except FileNotFoundError:
                continue
            if not self._stale(holder, refreshed):
                raise LmforgeError(
                    f"--output_dir {os.path.dirname(self.path)} is in use by another lmforge run ({describe(holder)}); "
                    "wait for it to end or choose another --output_dir")
            self._set_aside()
            self.taken_over = holder
        raise LmforgeError(f"--output_dir {os.path.dirname(self.path)}: could not take its lock {self.path}")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(self.holder), f)
        return True

    def _stale(self, holder: Holder | None, refreshed: float) -> bool:
        if self.clock() - refreshed > STALE_AFTER_S:
            return True
        if holder is None or holder.host != self.holder.host:
            return False
        return not process_alive(holder.pid, holder.process_start)

    def _set_aside(self) -> None:
        """Move a stale lock out of the way under a name of this process' own, then delete it."""
        aside = f"{self.path}.stale-{self.holder.host}-{self.holder.pid}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another process took it over first; `_create` then fails
            return
        os.remove(aside)

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:  # the directory went away; the run will say so when it writes
                    return

        self._thread = threading.Thread(target=beat, name="lmforge-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Give the lock up, if this process still holds it."""
        self._stop.set()
        try:
            holder, _ = _read(self.path)
        except FileNotFoundError:
            return
        if holder == self.holder:
            os.remove(self.path)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
