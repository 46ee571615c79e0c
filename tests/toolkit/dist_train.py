"""A stand-in trainer for launch tests (UMM_TRAIN_ENTRY=tests.toolkit.dist_train:train).

It does real distributed work (gloo all-reduce across the ranks torchrun started) and records what
each rank saw, so the launch path is tested without building a model. UMM_TEST_FAIL_RANK=<r>
makes rank r exit with code 3.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def train(cfg):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if os.environ.get("UMM_TEST_FAIL_RANK") == str(rank):
        print(f"rank {rank} failing on purpose", flush=True)
        sys.exit(3)
    total = world
    if world > 1:
        dist.init_process_group("gloo")
        t = torch.ones(1)
        dist.all_reduce(t)
        total = int(t.item())
        dist.destroy_process_group()
    out = Path(cfg.run_dir) / f"trained_rank{rank}.json"
    out.write_text(json.dumps({"world": world, "all_reduce": total, "run_name": cfg.run_name,
                               "pipeline": cfg.pipeline.name}))
    print(f"rank {rank}: all_reduce={total}", flush=True)
    return {"status": "completed", "step": 0, "last_checkpoint": None}
