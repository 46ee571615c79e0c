"""One run, one process tree: an exclusive ``flock`` on ``<run_dir>/.lock``.

The launching app takes it before anything writes into the run dir and holds it until the run
ends; the kernel drops it when the holder's last descriptor closes, so a SIGKILLed run never
leaves a stale lock (the file stays, its content is only a note: host, pid, start time). Under
torchrun the app, the parent of torchrun and its ranks, holds it for the whole run. On SLURM the
app of node 0 holds it (umm/launch/rundir.py).
``flock`` is shared between NFS clients on Linux (as a POSIX lock of the whole file).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Dict, Optional

from umm.errors import UmmError

LOCK_FILE = ".lock"

# Descriptors of the locks this process holds. A forked child (a data worker) shares the lock's open
# file description, and one that outlives a SIGKILLed holder for a few seconds would keep the run dir
# "in use" by a dead pid; children never need the lock, so they close their copies at once.
_held: set = set()


def _close_in_child() -> None:
    for fd in _held:
        try:
            os.close(fd)  # not flock(LOCK_UN): that would unlock the parent's lock too
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunDirWriteError(UmmError, OSError):
    """The run dir cannot be created or written."""

    def __init__(self, run_dir: Path, err: OSError):
        super().__init__(f"cannot write the run dir {Path(run_dir).absolute()}: {err.strerror or err} "
                         f"(set output_root=, run_name= or run_dir= to a writable place)")


class RunDirBusyError(UmmError, RuntimeError):
    """Another launch holds the run dir."""


def read_holder(path: Path) -> Dict[str, object]:
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


class RunLock:
    """``acquire()`` or fail at once naming the holder; ``update(**info)`` adds to the note;
    ``release()`` (or the end of the process) lets the next launch in."""

    def __init__(self, run_dir) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: Optional[int] = None
        self.info: Dict[str, object] = {}

    def acquire(self, **info) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirWriteError(self.path.parent, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirBusyError(f"cannot lock {self.path} ({e.strerror or e})") from None
            h = read_holder(self.path)
            raise RunDirBusyError(
                f"run dir {self.path.parent} is in use by another launch: host {h.get('host', '?')}, pid "
                f"{h.get('pid', '?')}, started {h.get('started', '?')} (it holds {self.path}). Wait for it to end "
                f"or stop it, or use another run_name"
            ) from None
        self.fd = fd
        _held.add(fd)
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **info}
        self._write()
        return self

    def update(self, **info) -> None:
        self.info.update(info)
        self._write()

    def _write(self) -> None:
        data = (json.dumps(self.info, sort_keys=True) + "\n").encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def release(self) -> None:
        if self.fd is not None:
            _held.discard(self.fd)
            os.close(self.fd)
            self.fd = None
