"""torchrun worker of test_optim_ema: clip_for_step on FSDP2 (gloo) equals clip_grad_norm_ then step."""
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from umm.train.optim import clip_for_step
from umm.train.worker import exit_now


def run(fold: bool, rank: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    norms = []
    for s in range(3):
        torch.manual_seed(100 + s + 10 * rank)  # ranks see different data
        (model(torch.randn(5, 8)) ** 2).sum().mul(50).backward()
        params = list(model.parameters())
        norm = clip_for_step(opt, params, 1.0) if fold else torch.nn.utils.clip_grad_norm_(params, 1.0).full_tensor()
        norms.append(float(norm))
        opt.step()
        opt.zero_grad()
    return norms, [p.full_tensor() for p in model.parameters()]


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    (norms_a, a), (norms_b, b) = run(True, rank), run(False, rank)
    assert min(norms_a) > 10, norms_a  # the clip acted
    # The fold sums the same squares in another order: equal up to float rounding, not bitwise.
    torch.testing.assert_close(torch.tensor(norms_a), torch.tensor(norms_b), rtol=1e-6, atol=0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    print("CLIP-OK", rank, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now(0)  # a finished gloo rank can abort in interpreter teardown (see exit_now)
