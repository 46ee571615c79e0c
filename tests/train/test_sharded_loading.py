"""Loading that scales: on 2 gloo ranks each rank reads and keeps only its FSDP2 shards."""
from __future__ import annotations

import json
import subprocess
import sys

from .conftest import REPO, build_model_dir, run_config, save_run_config, worker_env


def test_two_ranks_each_hold_their_share_and_load_the_exact_weights(tmp_path, data_root):
    # About 300 MB of fp32 weights: big enough that a whole copy per rank shows in its peak RSS.
    model_dir = build_model_dir(tmp_path / "model", hidden_size=512, intermediate_size=4096, num_hidden_layers=6)
    weights = model_dir / "ema.safetensors"
    full_mib = weights.stat().st_size / 2**20
    # recA in bf16: frozen parts (understanding expert, ViT) load in bf16 beside fp32 trainable ones.
    cfg = run_config(tmp_path / "run", model_dir, data_root, **{"method.name": "reca", "method.recipe": "reca",
                                                                  "train.precision": "bf16"})
    out = tmp_path / "ranks.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(REPO / "tests" / "train" / "sharded_load_worker.py"), str(save_run_config(cfg, tmp_path / "cfg.yaml")),
         str(weights), str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240,
        env=worker_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    ranks = json.loads(out.read_text())
    print(f"\nweights {full_mib:.0f} MiB; " + "; ".join(
        f"rank {r['rank']}: peak RSS +{r['peak_increase_mib']:.0f} MiB, holds {r['held_mib']:.0f} MiB" for r in ranks))
    for r in ranks:
        assert r["held_mib"] < 0.55 * full_mib  # its half, rounded up per tensor
        assert r["peak_increase_mib"] < 0.75 * full_mib  # never a whole copy
