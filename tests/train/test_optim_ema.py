"""AdamW set-up, the LR schedules and the EMA update, on small real modules."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from umm.config.schema import OptimConfig
from umm.train.cpu_ema import AsyncCpuEma
from umm.train.ema import Ema
from umm.train.checkpoint import CheckpointError
from umm.train.optim import build_optimizer, clip_for_step, lr_at
from umm.train.sharded_state import ShardReader, ShardWriter

from .conftest import worker_env


def test_constant_schedule_warms_up_linearly_then_holds():
    cfg = OptimConfig(lr=1e-3, warmup_steps=4, schedule="constant")
    assert [lr_at(s, cfg, 100) for s in range(6)] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert lr_at(99, cfg, 100) == 1e-3


def test_cosine_schedule_ends_at_min_lr():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, schedule="cosine")
    assert lr_at(10, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 110) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert lr_at(110, cfg, 110) == pytest.approx(1e-5)
    lrs = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_at(5, OptimConfig(schedule="linear"), 10)


def test_frozen_params_get_no_optimizer_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    opt = build_optimizer(model.parameters(), OptimConfig(lr=1e-2), torch.device("cpu"))
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-15 and group["weight_decay"] == 0.0
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    stateful = {id(p) for p in opt.state}
    assert stateful == {id(p) for p in model[1].parameters()}
    assert not any(id(p) in stateful for p in model[0].parameters())


def test_no_trainable_params_is_a_clear_error():
    layer = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(layer.parameters(), OptimConfig(), torch.device("cpu"))


def test_ema_follows_the_closed_form():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = Ema([("w", p)], decay=0.9)
    values = [1.0, 2.0, 3.0]
    expected = 0.0
    for v in values:
        with torch.no_grad():
            p.fill_(v)
        ema.update()
        expected = 0.9 * expected + 0.1 * v
    assert torch.allclose(ema.full_state()["w"], torch.full((3,), expected))
    assert ema.shadow[0].dtype == torch.float32


def test_ema_resumes_from_shard_files_and_refuses_a_wrong_shape(tmp_path):
    """The EMA's way through a checkpoint, as the trainer saves and resumes it: its shards in the rank's
    file, read back into a fresh EMA; a saved shape that is not the model's, or no saved EMA, stops."""
    p = torch.nn.Parameter(torch.randn(2, 3))
    saved = Ema([("w", p)], decay=0.5)
    with torch.no_grad():
        p.add_(1.0)
    saved.update()
    writer = ShardWriter(0)
    for name, w, shadow in saved.shards():
        writer.add(f"ema/{name}", shadow, like=w)
    writer.write(tmp_path)
    with ShardReader(tmp_path, world_size=1) as shards:
        def read(name, param, out):  # the trainer's reader
            return shards.fill(f"ema/{name}", param, out)

        resumed = Ema([("w", torch.nn.Parameter(torch.zeros(2, 3)))], decay=0.5)
        resumed.load_shards(read)
        assert torch.equal(resumed.full_state()["w"], saved.full_state()["w"])
        with pytest.raises(CheckpointError, match=r"ema/w was saved with shape \(2, 3\), this run's is \(3, 2\)"):
            Ema([("w", torch.nn.Parameter(torch.zeros(3, 2)))], decay=0.5).load_shards(read)
        with pytest.raises(KeyError, match="EMA state lacks 1 trainable tensors"):
            Ema([("v", p)], decay=0.5).load_shards(read)


def test_ema_on_cpu_matches_on_device_update():
    p = torch.nn.Parameter(torch.randn(5))
    a, b = Ema([("w", p)], 0.99), Ema([("w", p)], 0.99, on_cpu=True)
    with torch.no_grad():
        p.add_(1.0)
    a.update(), b.update()
    assert torch.equal(a.full_state()["w"], b.full_state()["w"])
    assert not math.isnan(float(a.full_state()["w"].sum()))


def test_host_ema_folds_in_threads_like_one_lerp():
    # Sizes that do not split evenly, and a tensor smaller than the thread count.
    params = [(f"p{i}", torch.nn.Parameter(torch.randn(*shape))) for i, shape in enumerate([(7, 5), (2,), (1,), (13,)])]
    threaded, plain = AsyncCpuEma(params, 0.9, threads=3), Ema(params, 0.9)
    assert threaded._pool is not None
    for step in range(3):
        with torch.no_grad():
            for _, p in params:
                p.mul_(-1.5).add_(step)
        threaded.update(), plain.update()
    got, want = threaded.full_state(), plain.full_state()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def _train_two_layers(clip, fused: bool, steps: int = 3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused or None, foreach=None if fused else True)
    norms = []
    for s in range(steps):
        torch.manual_seed(100 + s)
        (model(torch.randn(5, 8)) ** 2).sum().mul(50).backward()
        norms.append(float(clip(opt, list(model.parameters()))))
        opt.step()
        opt.zero_grad()
    return norms, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("max_norm", [1.0, 1e6, 0.0], ids=["clips", "below-limit", "disabled"])
def test_clip_folded_into_the_fused_step_equals_clip_then_step(max_norm):
    """A fused AdamW takes the clip factor as grad_scale: same weights as clipping the gradients first."""
    def clip_then_step(opt, params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))

    norms_a, a = _train_two_layers(clip_then_step, fused=True)
    norms_b, b = _train_two_layers(lambda opt, params: clip_for_step(opt, params, max_norm), fused=True)
    norms_c, c = _train_two_layers(lambda opt, params: clip_for_step(opt, params, max_norm), fused=False)
    assert norms_a == pytest.approx(norms_b, rel=1e-6) and norms_a == pytest.approx(norms_c, rel=1e-6)
    if max_norm == 1.0:
        assert min(norms_a) > 10  # the clip really acted
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-6)


def test_clip_folded_into_the_fused_step_under_fsdp2_on_two_processes():
    """The FSDP2 path: DTensor gradients, global norm over ranks, scalar grad_scale into the fused step."""
    worker = Path(__file__).with_name("fsdp_clip_worker.py")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker)]
    # GPUs hidden: FSDP2 would put rank 1 on cuda:1, which a one-GPU machine lacks.
    out = subprocess.run(argv, capture_output=True, text=True, timeout=240,
                         env={**worker_env(), "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert out.stdout.count("CLIP-OK") == 2, out.stdout[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_side_stream_ema_equals_the_synchronous_update():
    """The EMA beside the next forward sees exactly the weights after every step."""
    def train(with_optimizer: bool):
        torch.manual_seed(0)
        model = torch.nn.Linear(1024, 1024, device="cuda")
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
        ema = Ema(list(model.named_parameters()), 0.9, optimizer=opt if with_optimizer else None)
        assert (ema._stream is not None) == with_optimizer
        x = torch.randn(4096, 1024, device="cuda")
        for _ in range(4):
            (model(x) ** 2).mean().backward()  # runs while the last EMA update may still run
            opt.step()
            opt.zero_grad()
            ema.update()
        return ema.full_state()

    side, sync = train(True), train(False)
    for name in sync:
        torch.testing.assert_close(side[name], sync[name], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["host-cpu", "host-cuda", "side-stream-cuda"])
def test_an_ema_skips_a_step_the_optimizer_skipped(kind):
    """On CUDA neither reads the flag on the host: the host EMA's fold thread reads it with the copied
    weights, the side stream lerps with weight 0 (sync debug mode raises at a host read)."""
    device = "cuda" if kind.endswith("cuda") else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    p = torch.nn.Parameter(torch.randn(64, device=device))
    if kind.startswith("host"):
        ema = AsyncCpuEma([("w", p)], 0.5, threads=1)
    else:
        ema = Ema([("w", p)], 0.5, optimizer=torch.optim.AdamW([p], foreach=True))
        assert ema._stream is not None
    for found_inf in (0.0, 1.0, 0.0):
        before = ema.full_state()["w"].clone()
        flag = torch.tensor(found_inf, device=device)
        with torch.no_grad():
            p.add_(1.0)
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            ema.update(flag)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(ema.full_state()["w"], before) == bool(found_inf)
