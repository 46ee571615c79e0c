"""Where a training step's time goes, with no host-device sync of its own.

The loop marks the ends of a step's phases (data, copy to the device, VAE encode, forward, backward,
clipping, the reduce of the step's numbers, optimizer, EMA). Each mark takes the host clock and, on
CUDA, records an event on the current stream. A phase's ``gpu`` time is the stream's timeline between
two events: the kernels plus any gap where the GPU waited for the host to queue them. Its ``host``
time is how long the host took to get from one mark to the next. So a phase whose ``gpu`` time is
about its ``host`` time ran as fast as the host could queue it. The loop reads a step's numbers after
it has queued the next step (umm/train/step_readback.py), when the step's events have finished: its
metrics row holds its phases (``step_parts_ms``). On the CPU the work is synchronous: the host times
are the phases. Work on other streams or threads counts where the current stream waits for it:
``ema`` is only what the EMA queues on it (the fused AdamW + EMA kernel counts under ``optimizer``; a
side stream's or the host EMA's fold overlaps the next step).
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

import torch


class StepTimeline:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: List[Tuple[str, float, Optional[torch.cuda.Event]]] = []
        self._ended: List[Tuple[str, float, Optional[torch.cuda.Event]]] = []

    def begin(self) -> None:
        """A new step (marks of one that raised before its end are dropped)."""
        self._marks = []
        self.mark("start")

    def mark(self, name: str) -> None:
        """The end of phase ``name``; a name marked again in a step (one per micro-batch) adds up."""
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self._marks.append((name, time.perf_counter(), event))

    def end_step(self) -> None:
        self._ended, self._marks = self._marks, []

    def elapsed_s(self, after: Optional["StepTimeline"] = None) -> float:
        """Seconds from the end of ``after`` (the step queued just before this one, with no pause
        between), else from this step's start, to this step's end: the stream's time on CUDA (gaps where
        the GPU waited for the host count; the events must have completed), the host's on the CPU."""
        first = after._ended[-1] if after is not None else self._ended[0]
        last = self._ended[-1]
        if self.cuda:
            return first[2].elapsed_time(last[2]) / 1e3
        return last[1] - first[1]

    def last_step(self) -> Dict[str, Dict[str, float]]:
        """Milliseconds per phase of the last ended step, ``{"host": {...}, "gpu": {...}}`` (no ``gpu`` on
        the CPU); empty if there is none or its GPU work has not finished (never waited for)."""
        marks = self._ended
        if len(marks) < 2 or (self.cuda and not marks[-1][2].query()):
            return {}
        host: Dict[str, float] = {}
        gpu: Dict[str, float] = {}
        for (_, t0, e0), (name, t1, e1) in zip(marks, marks[1:]):
            host[name] = host.get(name, 0.0) + (t1 - t0) * 1e3
            if self.cuda:
                gpu[name] = gpu.get(name, 0.0) + e0.elapsed_time(e1)
        rounded = lambda d: {k: round(v, 2) for k, v in d.items()}  # noqa: E731
        return {"host": rounded(host), **({"gpu": rounded(gpu)} if self.cuda else {})}
