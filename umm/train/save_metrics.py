"""What a checkpoint cost, measured (never estimated), for metrics.jsonl and the log:

    save_stall_s        seconds training stood still for it: the whole save when synchronous; with
                        train.async_save the copy to host memory, plus any wait at the join for a write
                        that had not finished yet
    save_total_s        seconds from the start of the save to its COMPLETE marker (after the rename)
    save_bytes          bytes of every file in the checkpoint dir, all ranks' shards included, read back
                        from the file system once it is complete
    save_parts_s        where save_total_s went on rank 0, in order: check (the weights are finite),
                        shards (this rank's shard collected, and copied to host memory with
                        train.async_save), gather (LoRA's adapters to rank 0), position (the data
                        position), write (the files, a full run's consolidated ones gathered tensor by
                        tensor as they go; with train.async_save only the start of the writer thread),
                        wait (for that thread, at the join), commit (COMPLETE, rename, prune); they add
                        up to the stall, and with train.async_save background_write is the thread's own
                        time beside training
    save_host_peak_gib  rank 0's peak resident memory during the save (GiB): Linux's high-water mark
                        (VmHWM) reset at the start through /proc/self/clear_refs; absent where that
                        cannot be done. The reset also lowers what getrusage (and so /usr/bin/time)
                        reports for the process: the trainer's mem_gb uses :func:`process_peak_gib`
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional


# The process's peak before the last reset: the reset lowers what getrusage and VmHWM report for
# the whole process, so :func:`process_peak_gib` keeps the true peak for the trainer's mem_gb.
_peak_before_reset_gib = 0.0


def reset_host_peak() -> bool:
    """Reset this process's resident-memory high-water mark to its current size; False where the
    kernel does not allow it."""
    global _peak_before_reset_gib
    _peak_before_reset_gib = process_peak_gib() or 0.0
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_gib(field: str) -> Optional[float]:
    """A memory field of /proc/self/status in GiB, or None where /proc does not report it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


def host_peak_gib() -> Optional[float]:
    """VmHWM of this process in GiB since the last reset, or None where /proc does not report it."""
    return _status_gib("VmHWM")


def resident_gib() -> Optional[float]:
    """This process's resident memory now (VmRSS) in GiB."""
    return _status_gib("VmRSS")


def process_peak_gib() -> Optional[float]:
    """The process's peak resident memory in GiB over its whole life, resets included."""
    now = host_peak_gib()
    return None if now is None else max(now, _peak_before_reset_gib)


def bytes_in(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class SaveClock:
    """One checkpoint's numbers, from the start of its save (every rank keeps one; rank 0's are logged)."""

    def __init__(self, is_main: bool):
        self.start = self._last = time.perf_counter()
        self.peak = is_main and reset_host_peak()
        self.stall_s = 0.0
        self.parts: dict = {}

    def skip(self) -> None:
        """The time since the previous part was not this save's (training went on meanwhile)."""
        self._last = time.perf_counter()

    def part(self, name: str) -> None:
        """The seconds since the previous part (or the start) were spent on ``name``."""
        now = time.perf_counter()
        self.parts[name] = self.parts.get(name, 0.0) + now - self._last
        self._last = now

    def stalled_since(self, t0: float) -> None:
        """Training stood still from ``t0`` until now for this checkpoint."""
        self.stall_s += time.perf_counter() - t0

    def finish(self, final: Path) -> dict:
        """The numbers once ``final`` is complete (call on rank 0)."""
        out = {"save_stall_s": self.stall_s, "save_total_s": time.perf_counter() - self.start,
               "save_bytes": bytes_in(final), "save_parts_s": {k: round(v, 3) for k, v in self.parts.items()}}
        peak = host_peak_gib() if self.peak else None
        if peak is not None:
            out["save_host_peak_gib"] = peak
        return out
