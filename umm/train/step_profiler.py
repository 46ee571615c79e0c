"""A torch.profiler record of chosen training steps (``train.profile_at``, ``train.profile_steps``):
where a step's host time goes (ops with their input shapes) beside the GPU's kernels.

The step's phase times in metrics.jsonl (``step_parts_ms``) say *which* phase the host is slow in;
this says *what* it runs there. Each rank writes ``<run_dir>/profile/rank<R>_steps<A>-<B>.json.gz``
(chrome://tracing or Perfetto) and a table of the ops by their own host time beside it (``.txt``).
"""
from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

TABLE_ROWS = 40


def write_trace(prof, path: Path) -> None:
    """The profiler's chrome trace, gzipped (a step's trace is tens of MB as JSON)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        prof.export_chrome_trace(tmp.name)
        with open(tmp.name, "rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)


class StepProfiler:
    """Records steps ``first .. first + count - 1`` (1-based, as metrics.jsonl numbers them); a no-op
    when ``first`` is None or the run never reaches it."""

    def __init__(self, first: Optional[int], count: int, out_dir: Path, rank: int, device: torch.device):
        self.first, self.last = first, None if first is None else first + count - 1
        self.out_dir, self.rank, self.device = out_dir, rank, device
        self.prof = None

    def missed_by_resume(self, step: int) -> Optional[str]:
        """Why a run resumed at ``step`` records nothing (its window began at or before it), or None."""
        if self.first is None or step < self.first:
            return None
        return (f"train.profile_at={self.first}: the run resumed at step {step}, so no profile is recorded "
                f"(choose a later step to record one)")

    def ends_at(self, step: int) -> bool:
        """Whether ``step`` is the last one recorded (the loop reads it at once: the trace's write is
        no part of the next step's time)."""
        return self.prof is not None and step == self.last

    def before_step(self, step: int) -> None:
        """Call before queueing ``step``."""
        if step != self.first:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (self.device.type == "cuda")
        self.prof = profile(activities=activities, record_shapes=True)
        self.prof.start()

    def finish(self) -> Path:
        """Once the step :meth:`ends_at` named is queued and read: waits for the GPU to finish it, writes
        the trace and the table, returns the trace's path."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the last step's kernels belong in the record
        prof, self.prof = self.prof, None
        prof.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = self.out_dir / f"rank{self.rank}_steps{self.first}-{self.last}"
        write_trace(prof, stem.with_suffix(".json.gz"))
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=TABLE_ROWS)
        stem.with_suffix(".txt").write_text(table + "\n")
        return stem.with_suffix(".json.gz")

    def close(self, step: int) -> Optional[str]:
        """Stop an unfinished record (the run ended inside it, at ``step``) without writing it; says so."""
        if self.prof is None:
            return None
        self.prof.stop()
        self.prof = None
        return f"the profile of steps {self.first}-{self.last} was not written: the run ended at step {step}"
