"""AdamW set-up, the LR schedules and the EMA update, on small real modules."""
import math

import pytest
import torch

from umm.config.schema import OptimConfig
from umm.train.ema import Ema
from umm.train.optim import build_optimizer, lr_at


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


def test_ema_state_round_trip_and_shape_check():
    p = torch.nn.Parameter(torch.randn(2, 3))
    ema = Ema([("w", p)], decay=0.5)
    ema.load_full_state({"w": torch.ones(2, 3)})
    assert torch.equal(ema.full_state()["w"], torch.ones(2, 3))
    with pytest.raises(ValueError, match="w"):
        ema.load_full_state({"w": torch.ones(3, 2)})
    with pytest.raises(KeyError):
        ema.load_full_state({})


def test_ema_on_cpu_matches_on_device_update():
    p = torch.nn.Parameter(torch.randn(5))
    a, b = Ema([("w", p)], 0.99), Ema([("w", p)], 0.99, on_cpu=True)
    with torch.no_grad():
        p.add_(1.0)
    a.update(), b.update()
    assert torch.equal(a.full_state()["w"], b.full_state()["w"])
    assert not math.isnan(float(a.full_state()["w"].sum()))
