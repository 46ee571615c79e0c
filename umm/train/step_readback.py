"""A training step's numbers, read by the host one step later.

The loop needs a few numbers of each step on the host: the reduced losses, the gradient norm, whether
the update was skipped, every rank's token counts and stop votes. Read at once, they would make the
host wait for the step's last kernel before it queues the next step, and the GPU would idle while
the host prepares that step (the next batch, the VAE, the forward's first kernels). So the step
queues them behind its own kernels: on CUDA a copy into page-locked memory and an event; the host
reads them after it has queued the next step, when the GPU has long finished them. A non-finite
step is skipped on the GPU meanwhile (the optimizer's ``found_inf``). On the CPU they are ready at once.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from umm.train.step_timeline import StepTimeline


class StepReadback:
    def __init__(self, values: torch.Tensor, timeline: StepTimeline):
        """``values``: a 1-D tensor of the step's numbers, queued last in the step; ``timeline``: its phases."""
        self.timeline = timeline
        self.event: Optional[torch.cuda.Event] = None
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = values

    def read(self) -> List[float]:
        """The numbers (waits for the step's kernels where they have not finished)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()

    def parts_ms(self) -> Dict[str, Dict[str, float]]:
        """The step's phases (after :meth:`read`, all its events have completed)."""
        return self.timeline.last_step()
