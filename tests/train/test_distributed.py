"""Device choice and the single-process path (no process group)."""
import pytest
import torch

from umm.train import distributed as D


def test_auto_picks_cuda_only_when_present():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert D.pick_device("auto", 0).type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(D.DeviceError, match="train.device=cpu or auto"):
        D.pick_device("cuda", 0)


def test_unknown_device_is_named():
    with pytest.raises(D.DeviceError, match="train.device='tpu'"):
        D.pick_device("tpu", 0)


def test_single_process_needs_no_process_group(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = D.setup("cpu")
    assert (env.rank, env.world_size, env.distributed, env.is_main) == (0, 1, False, True)
    assert not torch.distributed.is_initialized()
    t = torch.tensor([2.0])
    assert D.all_reduce_sum(t, env) is t and D.all_gather_objects("x", env) == ["x"]
    D.raise_if_any(env, None, "nothing")
    with pytest.raises(ValueError, match="disk"):
        D.raise_if_any(env, ValueError("disk"), "writing", ValueError)


def test_a_started_thread_runs_its_target_with_its_args():
    got = []
    D.start_thread(got.append, 7, name="t").join()
    assert got == [7]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_a_started_thread_works_on_the_callers_gpu_not_gpu_0():
    # A plain thread would start on device 0 and create a context there for every rank of the node.
    before = torch.cuda.current_device()
    torch.cuda.set_device(1)
    try:
        got = []
        D.start_thread(lambda: got.append(torch.cuda.current_device())).join()
        assert got == [1]
    finally:
        torch.cuda.set_device(before)
