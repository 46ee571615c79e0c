"""One run dir, one launch: the lock, config drift on resume, damaged checkpoints (real CLI runs).

One run dir is taken through a sequence that shares its runs: a launch hangs after checkpoint 4
while a twin launch is refused, it is SIGKILLed (no stale lock), its newest checkpoint is
truncated, a changed lr is refused, a harmless change resumes past the damaged checkpoint, and a
changed lr is accepted on purpose. A copy of a checkpoint, damaged, is the only one of a run dir
and the init_from of a new run.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import yaml

from umm.launch.runlock import RunLock

from .conftest import finish, losses, small_run, start, umm

TRACEBACK = "Traceback (most recent call last)"


def _wait_for(path: Path, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.2)


def _truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


def _history(run_dir: Path):
    return sorted(p.name for p in (run_dir / "configs").iterdir())


def test_one_launch_per_run_dir_config_drift_and_a_damaged_newest_checkpoint(tmp_path, model_dir, data_root):
    run = tmp_path / "run"
    # export_every=2: checkpoints 2 and 4 (not the run's last) hold the consolidated files damaged below.
    base = small_run(model_dir, data_root, run, "train.max_steps=6", "train.export_every=2")

    # 1. A launch that hangs after checkpoint 4 holds the run dir; a twin launch stops at once.
    # It has a data worker, which outlives its SIGKILLed parent for a few seconds.
    holder = start([*base, "data.num_workers=1"], fault="hang_at:phase=step,step=5")
    try:
        _wait_for(run / "checkpoints" / "0000004" / "COMPLETE", holder)
        t0 = time.monotonic()
        twin = umm(base)
        twin_s = time.monotonic() - t0
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # the app alone, as `kill -9 <pid>` does: no stale lock may remain
        holder.wait()
    try:
        RunLock(run).acquire().release()  # while the orphaned worker may still live
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)
        finish(holder)
    assert twin.returncode != 0 and TRACEBACK not in twin.stdout, twin.stdout[-3000:]
    (line,) = [ln for ln in twin.stdout.splitlines() if "in use by another launch" in ln]
    assert f"host {socket.gethostname()}, pid {holder.pid}, started 20" in line, line
    assert twin_s < 30 and not (run / "checkpoints" / "0000006").exists()
    assert [r[0] for r in losses(run)] == [1, 2, 3, 4]  # the twin trained nothing

    # 2. The newest checkpoint's EMA file is cut short (a partial copy).
    damaged = run / "checkpoints" / "0000004" / "ema.safetensors"
    _truncate(damaged, damaged.stat().st_size // 2)

    # 3. A changed lr and schedule are refused before anything loads, one line per key.
    refused = umm([*base, "optim.lr=5e-4", "optim.schedule=cosine"])
    assert refused.returncode == 2 and TRACEBACK not in refused.stdout, refused.stdout[-3000:]
    assert "optim.lr: 2e-05 -> 0.0005\n" in refused.stdout, refused.stdout[-3000:]
    assert "optim.schedule: constant -> cosine\n" in refused.stdout
    assert "train.allow_config_change=true" in refused.stdout and "resumed from" not in refused.stdout
    assert _history(run) == ["resolved.001.yaml"]
    assert yaml.safe_load((run / "resolved.yaml").read_text())["optim"]["lr"] == 2e-05

    # 4. A harmless change passes with a note; the resume skips the damaged checkpoint loudly. Beside
    # it, a run dir whose only checkpoint is damaged, and a new run with init_from it, each stop.
    alone = tmp_path / "alone"
    shutil.copytree(run / "checkpoints" / "0000002", alone / "checkpoints" / "0000002")
    cut = alone / "checkpoints" / "0000002" / "model.safetensors"
    _truncate(cut, 1000)
    procs = [start([*base, "train.log_every=2"]), start(small_run(model_dir, data_root, alone)),
             start(small_run(model_dir, data_root, tmp_path / "fresh", f"method.init_from={alone / 'checkpoints'}",
                             "method.init_from_ema=false"))]
    resumed, stopped, init = (finish(p) for p in procs)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert ("with changes that do not alter what is trained: data.num_workers: 1 -> 0; train.log_every: 1 -> 2\n"
            in resumed.stdout), resumed.stdout[-3000:]
    assert f"WARNING: damaged checkpoint {run / 'checkpoints' / '0000004'} skipped ({damaged} is damaged: " \
           in resumed.stdout, resumed.stdout[-3000:]
    assert f"resumed from {run / 'checkpoints' / '0000002'} at step 2" in resumed.stdout
    assert [r[0] for r in losses(run)] == [1, 2, 4, 6]
    for out in (stopped, init):
        assert out.returncode != 0 and TRACEBACK not in out.stdout, out.stdout[-3000:]
        (line,) = [ln for ln in out.stdout.splitlines() if f"{cut} is damaged: it has 1000 bytes" in ln]
        assert line.startswith("umm: "), line
    assert "no older complete checkpoint" in stopped.stdout and "method.init_from" in init.stdout

    # 5. The lr change accepted on purpose: noted, and every accepted config kept in order.
    accepted = umm([*base, "optim.lr=5e-4", "train.allow_config_change=true"])
    assert accepted.returncode == 0, accepted.stdout[-3000:]
    assert "accepted by train.allow_config_change=true:\n  optim.lr: 2e-05 -> 0.0005\n" in accepted.stdout
    assert _history(run) == ["resolved.001.yaml", "resolved.002.yaml", "resolved.003.yaml"]
    kept = [yaml.safe_load((run / "configs" / n).read_text()) for n in _history(run)]
    assert [(c["optim"]["lr"], c["train"]["log_every"]) for c in kept] == [(2e-05, 1), (2e-05, 2), (5e-04, 1)]
    assert (run / "resolved.yaml").read_text() == (run / "configs" / "resolved.003.yaml").read_text()
    assert yaml.safe_load((run / "checkpoints" / "0000006" / "resolved.yaml").read_text())["train"]["log_every"] == 2
