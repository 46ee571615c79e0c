"""The trainer on CUDA: bf16 + flex attention + fused AdamW on one GPU, FSDP2 over NCCL on two.

Skipped without CUDA (CI); run on a GPU machine with ``pytest tests/train/test_gpu.py``.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from .conftest import run_config, save_run_config, worker_env

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GPU = {"train.device": "cuda", "train.precision": "bf16", "train.attn_backend": "auto",
       "train.activation_checkpointing": True, "train.num_sample_prompts": 2, "train.sample_steps": 3}


def _losses(run_dir):
    return [r["loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl"))]


def test_one_gpu_trains_resumes_and_samples(tmp_path, model_dir, data_root):
    from umm.train.loop import train

    first = train(run_config(tmp_path, model_dir, data_root, **{**GPU, "train.max_steps": 6}))
    assert first["status"] == "completed" and first["samples"]["num_images"] == 24
    again = train(run_config(tmp_path, model_dir, data_root, **{**GPU, "train.max_steps": 12}))
    assert again["step"] == 12
    losses = _losses(tmp_path)
    assert len(losses) == 12 and all(map(lambda x: x == x, losses))
    assert sum(losses[-3:]) < sum(losses[:3])


def test_the_trainers_steps_never_wait_for_the_gpu(tmp_path, model_dir, data_root, monkeypatch):
    """From the third step on (compiled, optimizer state laid out), queueing a step (the batch's upload,
    the VAE, forward, backward, clip, the reduce, AdamW + EMA, the numbers' copy) syncs nothing: torch's
    sync debug mode raises at the first synchronizing call, naming it. The host reads a step's numbers
    outside, after queueing the next one."""
    from umm.train.loop import Trainer, train

    queue = Trainer._train_step

    def strict(self, data_iter, after=None):
        if self.step < 2:
            return queue(self, data_iter, after)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return queue(self, data_iter, after)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(Trainer, "_train_step", strict)
    cfg = run_config(tmp_path, model_dir, data_root, **{**GPU, "train.max_steps": 6, "train.save_every": 100,
                                                        "train.num_sample_prompts": 0, "data.num_workers": 1})
    assert train(cfg)["status"] == "completed"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_fsdp2_trains_and_resumes(tmp_path, model_dir, data_root):
    def run(steps):
        cfg = save_run_config(run_config(tmp_path / "run", model_dir, data_root, **{**GPU, "train.max_steps": steps,
                                                                                   "train.save_every": 3}),
                              tmp_path / f"run{steps}.yaml")
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                "-m", "umm.train.worker", str(cfg)]
        try:  # a hang (e.g. ranks in different collectives) fails with the workers' output
            out = subprocess.run(argv, capture_output=True, text=True, env=worker_env(), timeout=900)
        except subprocess.TimeoutExpired as e:
            output = b"".join(x or b"" for x in (e.stdout, e.stderr)).decode(errors="replace")  # bytes, always
            pytest.fail(f"{steps}-step run did not finish in 900 s:\n{output[-4000:]}")
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]

    (tmp_path / "run").mkdir()
    run(3)
    run(6)
    assert len(_losses(tmp_path / "run")) == 6
    state = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "0000006" / "state").iterdir())
    assert "shards.rank00001.safetensors" in state
