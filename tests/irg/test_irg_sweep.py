"""`python -m umm pipeline=irg` for real: two stages on the tiny model, failures, kill and resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.irg.conftest import REPO, metric_steps, read_json, run_umm, sweep_args, umm_env

pytestmark = pytest.mark.slow


def _ckpts(run_dir: Path) -> list:
    return sorted(p for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit() and (p / "COMPLETE").is_file())


def test_stage2_starts_from_stage1_last_complete_checkpoint(tiny_model, irg_data, tmp_path):
    # EMA decay 1 keeps stage 2's EMA at exactly the weights it started from; stage 2 starts from
    # stage 1's raw weights (init_from_ema=false), which differ exactly from step to step.
    # export_every=1: stage 1's earlier checkpoints hold consolidated weights to compare with too.
    args = sweep_args(tiny_model, irg_data, tmp_path) + ["train.ema_decay=1.0", "method.init_from_ema=false",
                                                         "train.export_every=1"]
    proc = run_umm(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "t"
    stage1, stage2 = sweep / "stage1", sweep / "stage2"
    s1 = _ckpts(stage1)
    assert [p.name for p in s1] == ["0000001", "0000002", "0000003"]

    started = load_file(str(_ckpts(stage2)[-1] / "ema.safetensors"))
    last = load_file(str(s1[-1] / "model.safetensors"))
    earlier = load_file(str(s1[-2] / "model.safetensors"))
    initial = load_file(str(tiny_model / "ema.safetensors"))
    assert started.keys() == last.keys()
    assert all(torch.equal(started[k], last[k]) for k in last), "stage 2 did not start from stage 1's last checkpoint"
    assert not all(torch.equal(started[k], earlier[k]) for k in earlier)
    assert not all(torch.equal(started[k], initial[k]) for k in initial)

    manifest = read_json(sweep / "manifest.json")
    assert manifest["stages"]["stage1"]["status"] == "completed"
    assert manifest["stages"]["stage2"]["status"] == "completed"
    assert manifest["stages"]["stage2"]["init_from"] == str(s1[-1].resolve())
    assert manifest["stages"]["stage1"]["last_checkpoint"] == str(s1[-1])
    assert Path(manifest["stages"]["stage2"]["last_checkpoint"]).parent == stage2 / "checkpoints"
    # The exact start checkpoint is what stage 2's workers read.
    assert f"init_from: {s1[-1].resolve()}" in (stage2 / "resolved.yaml").read_text()
    assert (stage1 / "DONE").is_file() and (stage2 / "DONE").is_file()


def test_failed_stage1_stops_the_chain(tiny_model, tmp_path):
    # A manifest whose rows are unreadable passes the preflight (the file exists) but fails stage 1.
    data = tmp_path / "bad"
    data.mkdir()
    (data / "trajectories.jsonl").write_text("{not json\n" * 4)
    proc = run_umm(sweep_args(tiny_model, data, tmp_path))
    assert proc.returncode != 0
    sweep = tmp_path / "t"
    assert not (sweep / "stage2").exists()
    stages = read_json(sweep / "manifest.json")["stages"]
    assert stages["stage1"]["status"] == "failed"
    assert "malformed JSON" in stages["stage1"]["error"]
    assert "stage2" not in stages


@pytest.mark.parametrize("how", ["override", "config_file"])
def test_broken_stage2_config_fails_before_stage1_trains(tiny_model, irg_data, tmp_path, how):
    args = sweep_args(tiny_model, irg_data, tmp_path)
    if how == "override":
        # Tuning a stage-1-only mode's weight: stage 2 has no such group.
        args.append("data.datasets.initial_thinking_generation_learning.weight=0.7")
    else:
        # A typo in stage 2's method file (a copy of conf/ with one bad value).
        import shutil

        conf = tmp_path / "conf"
        shutil.copytree(REPO / "conf", conf)
        with open(conf / "method" / "irg_stage2.yaml", "a") as f:
            f.write("mse_weight: lots\n")
        args = ["--config-path", str(conf)] + args
    start = time.time()
    proc = run_umm(args)
    assert proc.returncode == 1
    assert "umm preflight failed, nothing was run" in proc.stderr
    assert "method=irg_stage2" in proc.stderr
    assert ("initial_thinking_generation_learning" if how == "override" else "mse_weight") in proc.stderr
    assert not (tmp_path / "t" / "stage1").exists()
    print(f"preflight failure after {time.time() - start:.1f}s")


def test_stage2_alone_needs_a_stage1_run(tiny_model, irg_data, tmp_path):
    proc = run_umm(sweep_args(tiny_model, irg_data, tmp_path, run_name="nothing") + ["method=irg_stage2"])
    assert proc.returncode == 1
    looked_in = (tmp_path / "nothing" / "stage1" / "checkpoints").resolve()
    assert f"no complete checkpoint to start from in {looked_in}" in proc.stderr
    assert not (tmp_path / "nothing" / "stage2").exists()


def test_kill_during_stage2_then_rerun_skips_stage1_and_resumes_stage2(tiny_model, irg_data, tmp_path):
    args = sweep_args(tiny_model, irg_data, tmp_path, steps=4)
    sweep = tmp_path / "t"
    stage1, stage2 = sweep / "stage1", sweep / "stage2"
    proc = subprocess.Popen([sys.executable, "-m", "umm", *args], cwd=REPO, env=umm_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (stage2 / "checkpoints" / "0000002" / "COMPLETE").is_file():
            assert proc.poll() is None, "the sweep ended before it could be killed in stage 2"
            assert time.time() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (stage2 / "DONE").exists()
    stage1_before = {p.name: p.read_bytes() for p in (stage1 / "DONE", stage1 / "metrics.jsonl")}
    stage1_ckpts = [p.name for p in _ckpts(stage1)]
    done_at = _ckpts(stage2)[-1]
    rows_before = (stage2 / "metrics.jsonl").read_text().splitlines()[: int(done_at.name)]

    again = run_umm(args)
    assert again.returncode == 0, again.stderr[-3000:]
    # Stage 1: not run again.
    assert {p.name: p.read_bytes() for p in (stage1 / "DONE", stage1 / "metrics.jsonl")} == stage1_before
    assert [p.name for p in _ckpts(stage1)] == stage1_ckpts
    stages = read_json(sweep / "manifest.json")["stages"]
    assert stages["stage1"]["status"] == "skipped"
    assert stages["stage2"]["status"] == "completed"
    # Stage 2: the steps up to its last checkpoint were kept (resumed, not retrained), the rest ran.
    assert (stage2 / "metrics.jsonl").read_text().splitlines()[: int(done_at.name)] == rows_before
    assert metric_steps(stage2) == [1, 2, 3, 4]
    assert (stage2 / "DONE").is_file()


def test_sweeping_another_value_over_the_stages_is_refused(tiny_model, irg_data, tmp_path):
    """Two lr values would run stage 1 twice in one stage dir (the second would skip or resume the first)."""
    proc = run_umm(sweep_args(tiny_model, irg_data, tmp_path) + ["optim.lr=1e-3,2e-3"])
    assert proc.returncode == 1
    assert "would share the run dir" in proc.stderr
    assert not (tmp_path / "t" / "stage1").exists()


def test_a_stop_in_stage1_ends_the_sweep_and_the_same_command_resumes_it(tiny_model, irg_data, tmp_path):
    args = sweep_args(tiny_model, irg_data, tmp_path, steps=2)
    stage1 = tmp_path / "t" / "stage1"
    proc = subprocess.run([sys.executable, "-m", "umm", *args], cwd=REPO, capture_output=True, text=True,
                          env={**umm_env(), "UMM_FAULT": "term_at:phase=step,step=1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "the sweep's later jobs did not start" in proc.stderr
    assert read_json(tmp_path / "t" / "manifest.json")["stages"]["stage1"]["status"] == "stopped"
    assert not (stage1 / "DONE").exists() and not (tmp_path / "t" / "stage2").exists()
    again = run_umm(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert metric_steps(stage1) == [1, 2] and (tmp_path / "t" / "stage2" / "DONE").is_file()
