"""Graceful stop: SIGTERM (what a cluster sends before preemption) and a first Ctrl-C (SIGINT) save a
checkpoint and exit 0; if the save cannot finish within train.grace_period_s the run exits anyway, and
a second Ctrl-C stops it at once (exit 130), older checkpoints intact. No traceback either way."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from umm.train.checkpoint import latest_complete

from .conftest import REPO, checkpoints, cli_env, finish, losses, small_run, start


@pytest.mark.slow
def test_sigterm_mid_step_saves_exits_zero_and_the_same_command_continues_exactly(tmp_path, model_dir, data_root):
    whole = small_run(model_dir, data_root, tmp_path / "whole")
    stopped = small_run(model_dir, data_root, tmp_path / "stopped", "train.save_every=100")
    procs = [start(whole), start(stopped, "term_at:phase=step,step=3")]
    reference, first = (finish(p) for p in procs)
    assert reference.returncode == 0, reference.stdout[-3000:]
    assert first.returncode == 0, first.stdout[-3000:]
    # Step 3's stop vote is read once step 4 is queued: the run stops after step 4.
    assert "'status': 'stopped', 'step': 4" in first.stdout
    assert "sweep" not in first.stdout  # one run, not a multirun: no word of a sweep's later jobs
    assert checkpoints(tmp_path / "stopped") == ["0000004"]  # saved on SIGTERM, not on the save_every schedule
    assert (tmp_path / "stopped" / "checkpoints" / "0000004" / "COMPLETE").is_file()
    for weights in ("model.safetensors", "ema.safetensors"):  # a stop writes the full files (train.export_every)
        assert (tmp_path / "stopped" / "checkpoints" / "0000004" / weights).is_file()
    rerun = finish(start(stopped))
    assert rerun.returncode == 0 and "resumed from" in rerun.stdout, rerun.stdout[-3000:]
    assert losses(tmp_path / "stopped") == losses(tmp_path / "whole")


@pytest.mark.slow
def test_a_signal_during_a_save_stops_at_most_two_steps_later(tmp_path, model_dir, data_root):
    # The latest a signal can come: after step 3's stop vote was taken, during its save. Step 4 carries
    # the vote, and it is read once step 5 is queued: the stop checkpoint is step 5's.
    run = tmp_path / "run"
    out = finish(start(small_run(model_dir, data_root, run, "train.save_every=3"), "term_at:phase=checkpoint,step=3"))
    assert out.returncode == 0 and "'status': 'stopped', 'step': 5" in out.stdout, out.stdout[-3000:]
    assert checkpoints(run) == ["0000003", "0000005"]


def _start_and_wait_for_a_step(run, args, fault=None):
    proc = start(args, fault)
    end = time.time() + 240
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None, finish(proc).stdout[-3000:]
        assert time.time() < end, "no training step within 240 s"
        time.sleep(0.2)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_to_the_whole_process_group_with_data_workers(tmp_path, model_dir, data_root, sig):
    # What SLURM (SIGTERM) and a terminal's Ctrl-C (SIGINT) do: every process of the job, DataLoader
    # workers included, gets the signal.
    run = tmp_path / "run"
    proc = _start_and_wait_for_a_step(run, small_run(model_dir, data_root, run, "data.num_workers=1",
                                                     "train.max_steps=100000", "train.save_every=100000"))
    os.killpg(proc.pid, sig)
    out = finish(proc, timeout=120)
    assert out.returncode == 0 and "umm: stopped:" in out.stdout, out.stdout[-3000:]
    assert "Traceback" not in out.stdout and "KeyboardInterrupt" not in out.stdout, out.stdout[-3000:]
    assert latest_complete(run / "checkpoints").name == f"{len(losses(run)):07d}"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_to_the_launcher_reaches_both_torchrun_ranks(tmp_path, model_dir, data_root, sig):
    # The launcher signals each rank's process group (the rank and its DataLoader workers); torchrun
    # then sees its ranks end cleanly.
    run = tmp_path / "run"
    proc = _start_and_wait_for_a_step(run, small_run(
        model_dir, data_root, run, "torchrun.nproc_per_node=2", "train.device=cpu", "data.num_workers=1",
        "train.max_steps=100000", "train.save_every=100000", "train.grace_period_s=120"))
    os.kill(proc.pid, sig)  # the app only (a terminal's Ctrl-C reaches only it: torchrun has its own session)
    out = finish(proc, timeout=120)
    assert out.returncode == 0 and "umm: stopped:" in out.stdout and f"'signal': '{sig.name}'" in out.stdout, \
        out.stdout[-3000:]
    assert "Traceback" not in out.stdout and "KeyboardInterrupt" not in out.stdout, out.stdout[-3000:]
    last = latest_complete(run / "checkpoints")
    step = json.loads((last / "state" / "meta.json").read_text())["step"]
    assert last.name == f"{step:07d}" and step == len(losses(run))
    assert sorted(p.name for p in (last / "state").glob("*.rank*")) == [
        "shards.rank00000.safetensors", "shards.rank00001.safetensors"]


@pytest.mark.slow
def test_torchrun_ranks_that_cannot_save_in_the_grace_period_fail_the_launch(tmp_path, model_dir, data_root):
    run = tmp_path / "run"
    proc = _start_and_wait_for_a_step(run, small_run(
        model_dir, data_root, run, "torchrun.nproc_per_node=2", "train.device=cpu",
        "train.max_steps=100000", "train.save_every=100000", "train.grace_period_s=3"),
        "hang_at:phase=checkpoint")
    os.kill(proc.pid, signal.SIGTERM)
    out = finish(proc, timeout=120)
    assert out.returncode != 0, out.stdout[-3000:]
    assert "umm: torchrun stopped on SIGTERM without a new checkpoint (newest complete: None" in out.stdout
    assert "no checkpoint within train.grace_period_s=3" in (run / "train.log").read_text()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False


def _read_until(proc: subprocess.Popen, text: str, deadline: float) -> str:
    """The process's output so far, read until ``text`` appears in it."""
    seen, fd = "", proc.stdout.fileno()
    while text not in seen:
        assert proc.poll() is None and time.time() < deadline, seen[-3000:]
        if select.select([fd], [], [], 0.2)[0]:
            seen += os.read(fd, 65536).decode(errors="replace")
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2], ids=["one_process", "torchrun"])
def test_a_second_ctrl_c_stops_at_once_and_keeps_the_previous_checkpoint(tmp_path, model_dir, data_root, nproc):
    run = tmp_path / "run"
    extra = ["torchrun.nproc_per_node=2", "train.device=cpu"] if nproc == 2 else []
    # Checkpoints at step 2 and on the first Ctrl-C; that save hangs (an hour: only the second Ctrl-C ends it).
    proc = start(small_run(model_dir, data_root, run, *extra, "data.num_workers=1", "train.max_steps=100000",
                           "train.save_every=2", "train.grace_period_s=3600"), "hang_at:phase=checkpoint,step=3-100000")
    ctrl_c = (lambda: os.killpg(proc.pid, signal.SIGINT)) if nproc == 1 else (lambda: os.kill(proc.pid, signal.SIGINT))
    end = time.time() + 240
    while not (run / "checkpoints" / "0000002" / "COMPLETE").is_file():
        assert proc.poll() is None and time.time() < end, finish(proc).stdout[-3000:]
        time.sleep(0.2)
    ctrl_c()
    # Two SIGINTs that arrive before the handler ran are one signal (the kernel and Python coalesce
    # them): send the second only once the first was handled. (A scheduled save may already hang
    # with its .tmp- dir by then, so the dir alone does not say the first SIGINT was seen.)
    seen = _read_until(proc, "umm: SIGINT: finishing this step", end)
    while not [p for p in checkpoints(run) if p.startswith(".tmp-")]:  # the stop checkpoint is being written
        assert proc.poll() is None and time.time() < end, finish(proc).stdout[-3000:]
        time.sleep(0.2)
    ranks = [json.loads(p.read_text())["pid"] for p in (run / "ranks").glob("rank*.json")]
    ctrl_c()
    out = finish(proc, timeout=60)
    out.stdout = seen + out.stdout
    assert out.returncode == 130, out.stdout[-3000:]
    assert "umm: second SIGINT: " in out.stdout and "without a" in out.stdout, out.stdout[-3000:]
    assert "Traceback" not in out.stdout and "KeyboardInterrupt" not in out.stdout, out.stdout[-3000:]
    assert latest_complete(run / "checkpoints") == run / "checkpoints" / "0000002"
    while [pid for pid in ranks if _alive(pid)]:  # killed, not left training (SIGKILL lands at once)
        assert time.time() < end
        time.sleep(0.2)


def test_a_save_that_cannot_finish_in_the_grace_period_still_exits(tmp_path, model_dir, data_root):
    run = tmp_path / "run"
    # SIGTERM during step 3, then the stop's checkpoint (after step 4) hangs (an hour, unless the
    # watchdog ends it).
    fault = "term_at:phase=step,step=3;hang_at:phase=checkpoint,step=4"
    out = finish(start(small_run(model_dir, data_root, run, "train.grace_period_s=3"), fault), timeout=180)
    assert out.returncode == 143, out.stdout[-3000:]
    assert "no checkpoint within train.grace_period_s=3" in out.stdout
    assert latest_complete(run / "checkpoints") == run / "checkpoints" / "0000002"
    assert ".tmp-0000004" in checkpoints(run)  # removed by the next start, never resumed from


EXIT_WITH_LIVE_WORKERS = """
import sys
from pathlib import Path
from tests.reliability.conftest import run_config
from umm.data.loader import build_loader
from umm.data.packing import PackGeometry
from umm.methods import get_recipe
from umm.model.io import load_tokenizer, read_model_dims

model_dir, data_root = Path(sys.argv[1]), Path(sys.argv[2])
cfg = run_config(Path(sys.argv[3]), model_dir, data_root, **{"data.num_workers": 1})
tokenizer = load_tokenizer(model_dir)
stream = build_loader(cfg, get_recipe(cfg.method), tokenizer, tokenizer.special,
                      geometry=PackGeometry.from_dims(read_model_dims(model_dir)))
next(stream)
cycle = [stream]
cycle.append(cycle)  # alive at exit: only a garbage-collector pass would free it
print("leaving", flush=True)
"""


def test_a_process_exits_while_its_data_workers_are_alive(tmp_path, model_dir, data_root):
    # Workers ignore SIGTERM, so multiprocessing's exit hook (SIGTERM, then join) alone would wait forever.
    out = subprocess.run([sys.executable, "-c", EXIT_WITH_LIVE_WORKERS, str(model_dir), str(data_root),
                          str(tmp_path / "run")], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "leaving" in out.stdout, out.stdout + out.stderr
