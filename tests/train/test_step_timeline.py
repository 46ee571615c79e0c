"""The step timeline on CUDA: phases timed by events, read only once finished (no sync of its own)."""
import pytest
import torch

from umm.train.step_timeline import StepTimeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_phases_are_the_gpu_timeline_and_an_unfinished_step_is_not_waited_for():
    a = torch.randn(4096, 4096, device="cuda")
    timeline = StepTimeline(torch.device("cuda"))
    timeline.begin()
    timeline.mark("idle")
    for _ in range(50):
        a = a @ a / 64
    timeline.mark("matmuls")
    timeline.end_step()
    unfinished = timeline.last_step()  # the matmuls are still queued: nothing is read
    torch.cuda.synchronize()
    parts = timeline.last_step()
    assert unfinished == {}
    assert set(parts) == {"host", "gpu"} and set(parts["gpu"]) == {"idle", "matmuls"}
    assert parts["gpu"]["matmuls"] > 10 * parts["gpu"]["idle"]
    assert parts["gpu"]["matmuls"] > parts["host"]["matmuls"]  # the host only queued them
