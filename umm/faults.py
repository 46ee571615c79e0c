"""Deterministic fault injection for the reliability tests, driven by the ``UMM_FAULT`` env var.

    UMM_FAULT="<action>_at:phase=<phase>[,step=<n>|<a>-<b>][,rank=<r>][,row=<n>]"   (";" joins several)

The trainer, checkpoint writer and data loader call ``fire(phase, ...)`` at fixed points. A fault
whose phase matches and whose given keys all match (a missing key matches anything) acts:

    kill    SIGKILL this process: no cleanup, no flush (a crash, an OOM kill, a lost node)
    term    send SIGTERM to this process (what a cluster sends before preemption)
    hang    sleep for an hour (a stuck write; only the SIGTERM grace watchdog ends it)
    enospc  raise OSError(ENOSPC) (a disk that fills up)
    nan     ``fire`` returns NaN: the caller poisons the loss or the gradients with it
    inf     ``fire`` returns +inf, likewise

Phases (``step`` = the optimizer step being trained or saved, 1-based as in metrics.jsonl; ``rank``
= torchrun's RANK; ``row`` = rows this data stream has read, counting from 1):

    loss        each micro-batch's loss, before backward         (step, rank)
    step        after backward, before clipping and the update   (step, rank)
    checkpoint  mid-write: this rank's state files (and a full run's consolidated model files) are
                on disk, the run's own files (config, data position, adapters) are not    (step, rank)
                (in the writer thread when train.async_save writes the checkpoint in the background)
    consolidate rank 0 writes a tensor of a consolidated model/ema.safetensors                 (rank)
    commit      the temp dir holds every file and COMPLETE, not yet renamed              (step, rank)
    data        the loader reads a row (in a DataLoader worker when data.num_workers > 0) (row, rank)

Unset (the normal case) the spec is parsed once at import as ``None`` and ``fire`` returns at its
first line. A malformed value is an error at import, so a mistyped test never passes silently.
In-process tests arm faults with ``install(spec)`` instead of the env var.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

ENV = "UMM_FAULT"
ACTIONS = ("kill", "term", "hang", "enospc", "nan", "inf")
PHASES = ("loss", "step", "checkpoint", "consolidate", "commit", "data")
KEYS = ("phase", "step", "rank", "row")


class FaultSpecError(ValueError):
    """UMM_FAULT does not parse."""


@dataclass(frozen=True)
class Fault:
    action: str
    phase: str
    where: Dict[str, Tuple[int, int]]  # key -> inclusive range

    def matches(self, phase: str, values: Dict[str, int]) -> bool:
        if phase != self.phase:
            return False
        for key, (lo, hi) in self.where.items():
            value = values.get(key)
            if value is None or not lo <= value <= hi:
                return False
        return True


def _range(key: str, text: str, spec: str) -> Tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        return (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise FaultSpecError(f"{ENV}={spec!r}: {key}={text!r} is not an integer or a range a-b") from None


def parse(spec: Optional[str]) -> List[Fault]:
    faults = []
    for part in filter(None, (p.strip() for p in (spec or "").split(";"))):
        head, _, body = part.partition(":")
        action = head[:-3] if head.endswith("_at") else ""
        if action not in ACTIONS:
            raise FaultSpecError(f"{ENV}={spec!r}: {head!r} is not one of {', '.join(a + '_at' for a in ACTIONS)}")
        fields = dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in body.split(",") if kv)
        unknown = sorted(set(fields) - set(KEYS))
        if unknown or fields.get("phase") not in PHASES:
            raise FaultSpecError(f"{ENV}={spec!r}: need phase= one of {', '.join(PHASES)}; keys are {', '.join(KEYS)}")
        where = {k: _range(k, v, spec) for k, v in fields.items() if k != "phase"}
        faults.append(Fault(action, fields["phase"], where))
    return faults


_FAULTS: Optional[List[Fault]] = None


def install(spec: Optional[str]) -> None:
    """Arm the faults of ``spec`` in this process (None disarms); done from UMM_FAULT at import."""
    global _FAULTS
    _FAULTS = parse(spec) or None


install(os.environ.get(ENV))


def fire(phase: str, **values: int) -> Optional[float]:
    """The fault point ``phase``: act on a matching fault; NaN/inf for the poison actions, else None."""
    if _FAULTS is None:
        return None
    values.setdefault("rank", int(os.environ.get("RANK", "0")))
    for fault in _FAULTS:
        if not fault.matches(phase, values):
            continue
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.action == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif fault.action == "hang":
            time.sleep(3600)
        elif fault.action == "enospc":
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({ENV} at {phase} {values})")
        else:
            return float(fault.action)
    return None
