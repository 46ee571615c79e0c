"""AdamWEma: torch's AdamW (same math, state and checkpoints) with the EMA folded into its step."""
import pytest
import torch

from umm.train.adamw_ema import AdamWEma
from umm.train.ema import Ema
from umm.train.optim import clip_for_step, split_master_weights

HYPER = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 8)).to(device)


def _train(device, make_optimizer, fold_ema: bool, steps: int = 4, clip: float = 1.0):
    """Weights and EMA after ``steps`` updates; the EMA is either attached or updated on its own."""
    model = _model(device)
    opt = make_optimizer(model.parameters())
    named = list(model.named_parameters())
    ema = Ema(named, 0.9)
    if fold_ema:
        assert opt.attach_ema([p for _, p in named], ema.shadow, 0.9)
    for s in range(steps):
        torch.manual_seed(10 + s)
        (model(torch.randn(32, 64, device=device)) ** 2).sum().mul(20).backward()
        clip_for_step(opt, [p for _, p in named], clip)
        opt.step()
        opt.zero_grad()
        if not fold_ema:
            ema.update()
    return [p.detach().clone() for _, p in named], [s.clone() for s in ema.shadow], opt


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def test_without_an_ema_it_is_torch_adamw():
    ours, _, _ = _train("cpu", lambda ps: AdamWEma(ps, **HYPER, foreach=True), fold_ema=False)
    ref, _, _ = _train("cpu", lambda ps: torch.optim.AdamW(ps, **HYPER, foreach=True), fold_ema=False)
    _assert_same(ours, ref, rtol=0, atol=0)


def test_attached_ema_equals_the_separate_update_on_cpu():
    """The path for tensors the kernel does not take (here: CPU): torch's step, then the EMA lerp."""
    weights, ema, _ = _train("cpu", lambda ps: AdamWEma(ps, **HYPER, fused=True), fold_ema=True)
    ref_w, ref_e, _ = _train("cpu", lambda ps: torch.optim.AdamW(ps, **HYPER, fused=True), fold_ema=False)
    _assert_same(weights, ref_w, rtol=0, atol=0)
    _assert_same(ema, ref_e, rtol=0, atol=0)


def test_only_a_fused_optimizer_takes_the_ema():
    p = torch.nn.Parameter(torch.zeros(3))
    assert not AdamWEma([p], foreach=True).attach_ema([p], [p.detach().clone()], 0.9)
    assert not Ema([("w", p)], 0.9, optimizer=AdamWEma([p], foreach=True)).fused  # CPU: never attached


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton)")
@pytest.mark.parametrize("clip", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_triton_step_equals_torch_fused_adamw_then_ema(clip):
    weights, ema, opt = _train("cuda", lambda ps: AdamWEma(ps, **HYPER, fused=True), fold_ema=True, clip=clip)
    ref_w, ref_e, ref_opt = _train("cuda", lambda ps: torch.optim.AdamW(ps, **HYPER, fused=True), fold_ema=False,
                                   clip=clip)
    _assert_same(weights, ref_w)
    _assert_same(ema, ref_e)
    # Same state layout: a torch AdamW checkpoint resumes in AdamWEma and the reverse.
    ours, theirs = opt.state_dict(), ref_opt.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    for k in theirs["state"]:
        assert ours["state"][k].keys() == theirs["state"][k].keys()
        for field in theirs["state"][k]:
            a, b = ours["state"][k][field], theirs["state"][k][field]
            assert (a.dtype, a.device, a.shape) == (b.dtype, b.device, b.shape), field
            # The moments differ in the last bits only (another fp32 operation order than torch's kernel).
            torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-5)


def _train_masters(device, fused: bool, steps: int = 4, clip: float = 1.0):
    """bf16 model parameters whose fp32 masters AdamWEma updates; the EMA follows the masters.

    Returns the masters, the EMA, the compute weights and every step's bf16 gradients."""
    model = _model(device)
    named = list(model.named_parameters())
    masters = split_master_weights(model, named)
    opt = AdamWEma([m for _, m in masters], **HYPER, fused=fused or None, foreach=None if fused else True)
    opt.attach_compute([m for _, m in masters], [p for _, p in named])
    ema = Ema(masters, 0.9, optimizer=opt)
    grads = []
    for s in range(steps):
        torch.manual_seed(10 + s)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = (model(torch.randn(32, 64, device=device)).float() ** 2).sum().mul(20)
        loss.backward()
        grads.append([p.grad.clone() for _, p in named])
        assert all(p.grad.dtype == torch.bfloat16 for _, p in named)
        clip_for_step(opt, [p for _, p in named], clip)
        opt.step()
        opt.zero_grad()
        ema.update()
        assert all(p.grad is None for _, p in named) and all(m.grad is None for _, m in masters)
    weights = [m.detach().clone() for _, m in masters]
    return weights, [s.clone() for s in ema.shadow], [p.detach() for _, p in named], grads


def _reference(device, grads, clip: float):
    """torch's AdamW over fp32 weights given the same gradients (in fp32), clipped, then the EMA lerp."""
    weights = [p.detach().clone().requires_grad_(True) for p in _model(device).parameters()]
    opt = torch.optim.AdamW(weights, **HYPER, foreach=True)
    ema = [w.detach().clone() for w in weights]
    for step_grads in grads:
        for w, g in zip(weights, step_grads):
            w.grad = g.float()
        torch.nn.utils.clip_grad_norm_(weights, clip if clip > 0 else float("inf"), foreach=True)
        opt.step()
        torch._foreach_lerp_(ema, [w.detach() for w in weights], 0.1)
    return [w.detach() for w in weights], ema


def _check_masters(device, fused: bool, clip: float):
    masters, ema, compute, grads = _train_masters(device, fused, clip=clip)
    ref_w, ref_e = _reference(device, grads, clip)
    _assert_same(masters, ref_w)
    _assert_same(ema, ref_e)
    # The forward reads the masters rounded to bf16, and nothing else.
    assert all(torch.equal(c, m.to(torch.bfloat16)) for c, m in zip(compute, masters))
    # The masters moved by less than bf16 can show: they are not the rounded weights.
    assert any(not torch.equal(m, c.float()) for c, m in zip(compute, masters))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_master_weights_in_the_optimizer_step_like_fp32_adamw_on_cpu(fused):
    _check_masters("cpu", fused, clip=1.0)


def test_master_weights_need_fp32_parameters_and_keep_the_parameter_objects():
    model = _model("cpu")
    before = dict(model.named_parameters())
    masters = split_master_weights(model, list(model.named_parameters()))
    assert [n for n, _ in masters] == list(before)
    assert all(model.get_parameter(n) is p and p.dtype == torch.bfloat16 for n, p in before.items())
    assert all(m.dtype == torch.float32 and m.requires_grad for _, m in masters)
    with pytest.raises(ValueError, match="master weights need fp32 parameters, 0.weight is torch.bfloat16"):
        split_master_weights(model, list(model.named_parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton)")
@pytest.mark.parametrize("clip", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_triton_step_with_master_weights_equals_fp32_adamw(clip):
    _check_masters("cuda", fused=True, clip=clip)


@pytest.mark.parametrize("path", ["cpu-foreach", "cpu-fused-with-ema", "cuda-triton-with-ema", "cuda-torch-fused"])
def test_found_inf_skips_the_whole_update(path):
    """A step whose flag is set changes nothing (weights, moments, step count, EMA); the flag stays on the
    device on the GPU paths and is read on the host on the others."""
    device = "cuda" if path.startswith("cuda") else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _model(device)
    named = list(model.named_parameters())
    opt = AdamWEma(model.parameters(), **HYPER, **({"foreach": True} if path == "cpu-foreach" else {"fused": True}))
    ema = Ema(named, 0.9)
    attached = "with-ema" in path  # the optimizer's step updates the EMA; otherwise ema.update does
    if attached:
        assert opt.attach_ema([p for _, p in named], ema.shadow, 0.9)

    def step(seed: int, found_inf: float) -> None:
        torch.manual_seed(seed)
        (model(torch.randn(32, 64, device=device)) ** 2).sum().backward()
        clip_for_step(opt, [p for _, p in named], 1.0)
        opt.found_inf = torch.tensor(found_inf, device=device)
        opt.step()
        if not attached:
            ema.update(opt.found_inf)
        opt.zero_grad()

    def snapshot():
        state = [t.clone() for p in model.parameters() for t in opt.state[p].values()]
        return [p.detach().clone() for p in model.parameters()] + state + [s.clone() for s in ema.shadow]

    step(0, 0.0)  # moments and EMA exist
    before = snapshot()
    step(1, 1.0)
    _assert_same(snapshot(), before, rtol=0, atol=0)
    step(2, 0.0)
    assert {float(opt.state[p]["step"]) for p in model.parameters()} == {2.0}
    assert not torch.equal(next(model.parameters()), before[0])
