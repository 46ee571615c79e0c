"""How a training process stops on a signal: SIGTERM (what clusters send before preemption) and the
first Ctrl-C (SIGINT) ask the loop to finish its step, checkpoint and leave; a second Ctrl-C leaves
at once, without a checkpoint.

If the checkpoint has not been written ``grace_s`` after the first signal, the process exits anyway
with 143. Either way the newest complete checkpoint stays the resume point (a half-written one is a
``.tmp-*`` dir that the next start removes). Messages are written with ``os.write``: a handler that
printed while the main thread was printing would fail with a reentrant-call error.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from typing import Dict, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
ABORT_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C


def _say(text: str) -> None:
    os.write(2, (text + "\n").encode())


class StopSignals:
    """Installed by the trainer for its whole run; ``requested`` is read once per step."""

    def __init__(self, grace_s: float):
        self.requested = False
        self.signal_name = ""
        self.grace_s = grace_s
        self._previous: Dict[int, object] = {}
        self._watchdog: Optional[threading.Timer] = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if signum == signal.SIGINT:
                self._abort()
            return  # a repeated SIGTERM (the launcher and torchrun may both send one) changes nothing
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT and os.environ.get("RANK", "0") == "0":
            _say("umm: SIGINT: finishing this step (and at most two more), then saving a checkpoint; Ctrl-C again "
                 "stops at once without one")
        self._watchdog = threading.Timer(self.grace_s, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self) -> None:
        _say(f"{self.signal_name}: no checkpoint within train.grace_period_s={self.grace_s}; exiting without one")
        os._exit(143)

    @staticmethod
    def _abort() -> None:
        _say("umm: second SIGINT: stopped at once without a checkpoint; the newest complete one stays the resume point")
        # DataLoader workers ignore SIGINT and would outlive a process that skips its exit hooks.
        for child in multiprocessing.active_children():
            child.kill()
        os._exit(ABORT_EXIT_CODE)

    def uninstall(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
