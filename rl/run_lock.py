"""One job per run folder: ``output_dir/tandem.lock``.

A training job holds an exclusive ``flock`` on ``output_dir/tandem.lock`` from before it reads the run folder
(resume) until it has left it; the file names the holder (pid, host, start time). A second job on the same
folder — a new run, or ``resume=auto`` of a run that is still going — is refused with one line naming the
holder, before any model is loaded. Only the main process of a multi-process job (torchrun, accelerate, Ray
Train) takes the lock: it alone writes the run folder (``Layout.is_main``); a refusal there ends the
launcher's job.

Stale locks: the kernel drops a flock when its process dies, SIGKILL included, so a lock file left by a dead
job is taken over, with one log line naming it. On a file system without flock (some network mounts) the
recorded pid is checked instead: a job that is no longer running on this host is taken over; one on another
host cannot be checked, and the refusal says which file to delete once that job is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator, List, Optional

from tandem.core.errors import ConfigError
from tandem.core.process import pid_alive
from tandem.rl.run_dir import RunDir

log = logging.getLogger("tandem.session")

LOCK_NAME = "tandem.lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), to tell a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running_here(holder: dict) -> bool:
    """The holder runs on this host: its pid exists and, where known, started when the holder did."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if not pid_alive(pid):
        return False
    start = holder.get("pid_start")
    return start is None or _process_start(pid) in (None, start)


def describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


class RunLock:
    """The lock of one run folder (module docstring). ``acquire`` creates ``output_dir`` when missing; ``release``
    removes the lock file, and the folders it created if they are still empty (a refused or failed start leaves
    nothing behind)."""

    def __init__(self, output_dir: str):
        self.run = RunDir(output_dir)
        self.path = self.run.path / LOCK_NAME
        self._fd: Optional[int] = None
        self._created: List[Path] = []

    def acquire(self) -> "RunLock":
        self.run.check_writable()
        self._make_folder()
        try:
            fd, holder = self._lock()
        except BaseException:
            self._remove_created()
            raise
        if holder:
            log.warning("output_dir %s: taking over its lock from a job that is no longer running (%s)", self.run.path,
                        describe(holder))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": _process_start(os.getpid()),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        return self

    def _lock(self):
        """(open file descriptor holding the lock, the stale holder it replaces or None); ConfigError if held."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = False
                except BlockingIOError:
                    held = True
                except OSError as e:
                    if e.errno not in _NO_FLOCK:
                        raise
                    held = None  # no flock here: judge by the recorded pid
                holder = self._read(fd)
                if held is None and holder:
                    held = holder.get("host") != socket.gethostname() or _running_here(holder)
                if held:
                    raise ConfigError(self._refusal(holder))
                if os.path.exists(self.path) and os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    return fd, holder
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the holder released it (unlinked the file) meanwhile: try the new file

    def _read(self, fd: int) -> Optional[dict]:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        except (ValueError, UnicodeDecodeError):
            return {"pid": "?", "host": "?", "started": "?"}  # a partial write: a holder all the same
        return holder if isinstance(holder, dict) else None

    def _refusal(self, holder: Optional[dict]) -> str:
        who = describe(holder) if holder else "starting up"
        line = (f"output_dir {self.run.path} is in use by another tandem job ({who}); wait for it to end, or choose "
                f"another output_dir")
        if holder and holder.get("host") != socket.gethostname():
            line += f" (if that job is no longer running, delete {self.path})"
        return line

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                    os.unlink(self.path)  # while still holding the lock, so no one locks the old file meanwhile
        finally:
            os.close(self._fd)
            self._fd = None
            self._remove_created()

    def _make_folder(self) -> None:
        missing, folder = [], self.run.path
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        self.run.path.mkdir(parents=True, exist_ok=True)
        self._created = missing  # deepest first

    def _remove_created(self) -> None:
        for folder in self._created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        self._created = []

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def run_folder_lock(output_dir: str, main: bool) -> Iterator[Optional[RunLock]]:
    """Hold ``output_dir``'s lock for the block on the main process; other processes hold nothing."""
    if not main:
        yield None
        return
    with RunLock(output_dir) as lock:
        yield lock
