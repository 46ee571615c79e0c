"""Trainer runs in real subprocesses: SIGKILL and restart, SIGTERM checkpoint, 2-process torchrun resume."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import run_config, save_run_config, worker_env

RESULT = "umm.train.worker: "




def _start(cfg_path: Path, nproc: int = 1) -> subprocess.Popen:
    """The toolkit's worker on a saved config, alone or under torchrun (what the launchers run)."""
    worker = ["-m", "umm.train.worker", str(cfg_path)]
    if nproc == 1:
        argv = [sys.executable, *worker]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *worker]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=worker_env(),
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return json.loads([line for line in out.splitlines() if line.startswith(RESULT)][-1][len(RESULT):])


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.05)


def _losses(run_dir: Path):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(run_dir / "metrics.jsonl"))]


def _config(tmp_path, name, model_dir, data_root, **overrides) -> Path:
    run_dir = tmp_path / name
    run_dir.mkdir()
    cfg = run_config(run_dir, model_dir, data_root, **{"train.save_every": 2, **overrides})
    return save_run_config(cfg, tmp_path / f"{name}.yaml")


def test_sigkill_then_same_command_continues_exactly(tmp_path, model_dir, data_root):
    whole = _config(tmp_path, "whole", model_dir, data_root, **{"train.max_steps": 10})
    killed = _config(tmp_path, "killed", model_dir, data_root, **{"train.max_steps": 10})
    reference = _start(whole)
    proc = _start(killed)
    _wait_for(tmp_path / "killed" / "checkpoints" / "0000004" / "COMPLETE", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _finish(reference)
    result = _finish(_start(killed))
    assert result == {"status": "completed", "step": 10,
                      "last_checkpoint": str(tmp_path / "killed" / "checkpoints" / "0000010")}
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "whole")


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, model_dir, data_root):
    cfg = _config(tmp_path, "run", model_dir, data_root, **{"train.max_steps": 100000, "train.save_every": 1000})
    proc = _start(cfg)
    _wait_for(tmp_path / "run" / "metrics.jsonl", proc)
    time.sleep(0.5)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    result = _finish(proc, timeout=60)
    assert time.time() - sent < 60  # train.grace_period_s default
    assert result["status"] == "stopped"
    last = Path(result["last_checkpoint"])
    assert last.name == f"{result['step']:07d}" and (last / "COMPLETE").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("over", [{}, {"train.precision": "bf16", "train.master_weights": "optimizer"}],
                         ids=["fp32", "bf16-masters-in-optimizer"])
def test_two_process_torchrun_resume_is_exact(tmp_path, model_dir, data_root, over):
    whole = _config(tmp_path, "whole", model_dir, data_root, **over, **{"train.max_steps": 6})
    _finish(_start(whole, nproc=2))
    part = _config(tmp_path, "split", model_dir, data_root, **over, **{"train.max_steps": 3})
    _finish(_start(part, nproc=2))
    rest = save_run_config(run_config(tmp_path / "split", model_dir, data_root, **over, **{
        "train.save_every": 2, "train.max_steps": 6}), tmp_path / "rest.yaml")
    assert _finish(_start(rest, nproc=2))["step"] == 6
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")
    state = sorted(p.name for p in (tmp_path / "split" / "checkpoints" / "0000006" / "state").iterdir())
    assert state == ["data.json", "meta.json", "shards.rank00000.safetensors", "shards.rank00001.safetensors"]


def _resume_worker(cfg_path: Path, out: Path, nproc: int) -> str:
    out.mkdir(exist_ok=True)
    script = [str(Path(__file__).with_name("resume_worker.py")), str(cfg_path), str(out)]
    argv = ([sys.executable, *script] if nproc == 1 else
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *script])
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=worker_env(), timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_resume_on_another_world_size_loads_the_saved_state_bitwise_and_trains_on(tmp_path, model_dir, data_root):
    # 2 processes write step 2; 1 process resumes it and writes step 4; 2 processes resume that.
    from safetensors.torch import load_file

    runs = []
    for nproc, steps in ((2, 2), (1, 4), (2, 6)):
        cfg = save_run_config(run_config(tmp_path / "run", model_dir, data_root, **{
            "train.max_steps": steps, "train.save_every": 2}), tmp_path / f"to{steps}.yaml")
        out = _resume_worker(cfg, tmp_path / f"to{steps}", nproc)
        runs.append(tmp_path / f"to{steps}")
        if steps > 2:
            assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'{steps - 2:07d}'}" in out, out[-3000:]
    for before, after in zip(runs, runs[1:]):
        saved, loaded = load_file(str(before / "saved.safetensors")), load_file(str(after / "loaded.safetensors"))
        assert saved.keys() == loaded.keys() and any(k.startswith("optim/") for k in saved)
        different = [k for k in saved if not torch.equal(saved[k], loaded[k])]
        assert not different, different[:5]
        # The weights also equal the consolidated file of that checkpoint, gathered when it was written.
        written = load_file(str(tmp_path / "run" / "checkpoints" / f"{int(saved['step']):07d}" / "model.safetensors"))
        assert all(torch.equal(written[k[len("model/"):]], v) for k, v in saved.items() if k.startswith("model/"))
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")))
