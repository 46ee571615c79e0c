"""Run a child process: output to the console and a log file, signals forwarded, exit code kept."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

from umm.launch.command import Command

FORWARDED = (signal.SIGINT, signal.SIGTERM)


def run_streamed(cmd: Command, log_path: Path, on_signal: Optional[Callable[[int], None]] = None) -> int:
    """Run ``cmd`` in its own process group; returns its exit code.

    Its own group, so a signal to this app reaches torchrun and every rank exactly once (we forward
    it), and the ranks get their grace period to save a checkpoint (train.grace_period_s).
    ``on_signal(signum)`` runs before each forwarded signal.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **cmd.env, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        log.write(f"# {cmd.shell()}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd.argv, cwd=cmd.cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)

        def forward(signum, _frame):
            if on_signal is not None:
                on_signal(signum)
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass

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
