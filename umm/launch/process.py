"""Run a child process: output to the console and a log file, signals forwarded, exit code kept."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Optional

from umm.launch.command import Command

FORWARDED = (signal.SIGINT, signal.SIGTERM)
SECOND_SIGINT = ("second SIGINT: every process of the run was killed at once, without a new checkpoint; "
                 "the newest complete one stays the resume point")


def run_streamed(cmd: Command, log_path: Path, on_signal: Optional[Callable[[int], None]] = None,
                 signal_children: bool = False) -> int:
    """Run ``cmd`` in its own process group; returns its exit code.

    Its own group, so a signal to this app reaches the child's processes exactly once (we forward
    it), and torchrun's ranks get their grace period to save a checkpoint (train.grace_period_s).
    ``signal_children``: forward to the groups the child's children lead (torchrun starts each rank
    in its own session: the rank and its DataLoader workers) instead of to the child, which gets it
    only while it has none yet. torchrun answers a signal of its own with a traceback and a shutdown
    of its own; ranks that stop cleanly let it end normally. A SIGINT after an earlier signal (a
    second Ctrl-C) kills the child, its children's groups and its own group at once and raises
    ``KeyboardInterrupt``. ``on_signal(signum)`` runs before each forwarded signal.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **cmd.env, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        log.write(f"# {cmd.shell()}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd.argv, cwd=cmd.cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        received: List[int] = []

        def forward(signum, _frame):
            earlier = bool(received)
            received.append(signum)
            if on_signal is not None:
                on_signal(signum)
            groups = (_group_leading_children(proc.pid) if signal_children else []) or [proc.pid]
            if earlier and signum == signal.SIGINT:
                # The child first, so that torchrun cannot answer its ranks' deaths.
                for group in [proc.pid, *groups]:
                    _signal_group(group, signal.SIGKILL)
                raise KeyboardInterrupt(SECOND_SIGINT)
            for group in groups:
                _signal_group(group, signum)

        previous = {s: signal.signal(s, forward) for s in FORWARDED}
        try:
            out, fd = sys.stdout.buffer, proc.stdout.fileno()
            # Chunks, not lines: progress bars redraw with \r and must show as they happen.
            for chunk in iter(lambda: os.read(fd, 65536), b""):
                out.write(chunk)
                out.flush()
                log.write(chunk)
                log.flush()
            return proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if proc.poll() is None:  # we are leaving on an exception: do not orphan the ranks
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _group_leading_children(pid: int) -> List[int]:
    """Children of ``pid`` that lead their own process group (Linux: read from /proc)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                # After the name in parentheses (which may hold spaces): state, ppid, pgrp, ...
                _state, ppid, pgrp = f.read().rpartition(b")")[2].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(ppid) == pid and int(pgrp) == int(entry.name):
            found.append(int(entry.name))
    return found
