"""torchrun worker of test_sharded_loading: build the run's model on 2 gloo ranks through the trainer's
own path (meta device, recipe, FSDP2, sharded reads) and report this rank's peak RSS increase."""
import json
import resource
import sys

import torch
import torch.distributed as dist
import torch.distributed.fsdp  # noqa: F401  imported before the measurement: code, not weights
import torch.distributed.tensor  # noqa: F401
from safetensors.torch import load_file

from umm.config import load_resolved
from umm.methods import get_recipe
from umm.train import distributed as D
from umm.train.build import build_model
from umm.train.state_dict import upstream_key
from umm.train.worker import exit_now

from tests.train.gathered import full_model_state


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(resolved: str, weights: str, out: str):
    cfg = load_resolved(resolved)
    env = D.setup("cpu")
    recipe = get_recipe(cfg.method)
    dist.barrier()
    before = peak_mib()
    built = build_model(cfg, env, recipe, None)
    grown = peak_mib() - before
    dtypes = {(p.requires_grad, p.dtype) for n, p in built.model.named_parameters() if "pos_embed" not in n}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}, dtypes
    held = sum(D.local(p).numel() * D.local(p).element_size() for p in built.model.parameters())
    full = full_model_state(built.model, env)  # after the measurement: rank 0 gathers everything
    if env.is_main:
        want = load_file(weights)
        got = {upstream_key(k): v for k, v in full.items()}
        assert sorted(got) == sorted(want)
        bad = [k for k in want if not torch.equal(got[k], want[k].to(got[k].dtype))]
        assert not bad, bad[:5]
    rows = D.all_gather_objects({"rank": env.rank, "peak_increase_mib": grown, "held_mib": held / 2**20}, env)
    if env.is_main:
        with open(out, "w") as f:
            json.dump(rows, f)
    print(f"rank {env.rank}: peak RSS +{grown:.0f} MiB while loading, holds {held / 2**20:.0f} MiB", flush=True)
    D.teardown(env)


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_now(0)  # a finished gloo rank can abort in interpreter teardown (see exit_now)
