"""train.async_save: checkpoints written by a thread while training goes on hold the same tensors as
synchronous ones; a SIGKILL while one is written leaves the previous checkpoint as the resume point; a
stop commits the one being written and writes the full files; every checkpoint reports its cost in
metrics.jsonl. Also: method.init_from naming a checkpoint of only resume shards stops with one line."""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from umm.train.checkpoint import latest_complete
from umm.train.save_metrics import bytes_in

from .conftest import checkpoints, finish, frames_in_umm, losses, metrics, small_run, start

ASYNC = "train.async_save=true"
SAVE_KEYS = ("save_stall_s", "save_total_s", "save_bytes", "save_host_peak_gib")


def _wait_for_step(run: Path, proc, step: int) -> None:
    end = time.time() + 240
    while not any(r["step"] >= step for r in (metrics(run) if (run / "metrics.jsonl").is_file() else [])):
        assert proc.poll() is None, finish(proc).stdout[-3000:]
        assert time.time() < end, f"no step {step} within 240 s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir, data_root):
    root = tmp_path_factory.mktemp("async")
    args = {name: small_run(model_dir, data_root, root / name, *extra) for name, extra in
            [("sync", ()), ("async", (ASYNC,)), ("killed", (ASYNC,)), ("stopped", (ASYNC,)),
             ("early", (ASYNC, "train.save_every=3"))]}
    procs = {"sync": start(args["sync"]), "async": start(args["async"]),
             # The writer of checkpoint 4 hangs after its shard file; training goes on to the step-6
             # save, which waits for it; the run is SIGKILLed there.
             "killed": start(args["killed"], "hang_at:phase=checkpoint,step=4"),
             # A SIGTERM in step 5, while checkpoint 4 may still be being written.
             "stopped": start(args["stopped"], "term_at:phase=step,step=5"),
             # Checkpoint 3 is written in the background; the run is SIGKILLed in step 6, before its
             # next save: checkpoint 3 must be complete by then (committed once written).
             "early": start(args["early"], "kill_at:phase=step,step=6")}
    try:
        _wait_for_step(root / "killed", procs["killed"], 6)
    finally:
        os.killpg(procs["killed"].pid, signal.SIGKILL)
    first = {name: finish(p) for name, p in procs.items()}
    after_kill = sorted(str(p.relative_to(root / "killed")) for p in (root / "killed").rglob("*"))
    # The same command again; and a new run started from a checkpoint that holds only resume shards.
    init_from = root / "sync" / "checkpoints" / "0000004"
    procs = {"killed": start(args["killed"]),
             "init_from": start(small_run(model_dir, data_root, root / "init", f"method.init_from={init_from}"))}
    second = {name: finish(p) for name, p in procs.items()}
    return root, first, after_kill, second


def _tensors(ckpt: Path) -> dict:
    return {str(f.relative_to(ckpt)): load_file(str(f)) for f in sorted(ckpt.rglob("*.safetensors"))}


@pytest.mark.slow
def test_async_checkpoints_hold_the_tensors_of_synchronous_ones_and_report_their_cost(runs):
    root, first, _, _ = runs
    for name in ("sync", "async"):
        assert first[name].returncode == 0, first[name].stdout[-3000:]
    assert losses(root / "async") == losses(root / "sync")
    assert checkpoints(root / "async") == checkpoints(root / "sync") == ["0000004", "0000006", "0000008"]
    for step in ("0000004", "0000006", "0000008"):
        sync, done = root / "sync" / "checkpoints" / step, root / "async" / "checkpoints" / step
        a, b = _tensors(sync), _tensors(done)
        assert list(a) == list(b), (list(a), list(b))
        for file in a:
            assert list(a[file]) == list(b[file]), file
            for key, t in a[file].items():
                assert t.dtype == b[file][key].dtype and torch.equal(t, b[file][key]), f"{step}/{file}: {key}"
        for js in ("state/meta.json", "state/data.json"):
            assert json.loads((sync / js).read_text()) == json.loads((done / js).read_text())
    assert (root / "async" / "checkpoints" / "0000008" / "ema.safetensors").is_file()  # the end: consolidated

    for name in ("sync", "async"):
        rows = {r["step"]: r for r in metrics(root / name)}
        for step in (2, 4, 6, 8):
            assert all(rows[step][k] > 0 for k in SAVE_KEYS), rows[step]
            assert f"checkpoints/{step:07d}: save_stall_s=" in first[name].stdout  # the log line
            parts = dict(rows[step]["save_parts_s"])
            # Where the stall went, in order; a background writer's own time is apart from it.
            written = parts.pop("background_write", None)
            assert list(parts) == ["check", "shards", "gather", "position", "write", "wait", "commit"], parts
            assert abs(sum(parts.values()) - rows[step]["save_stall_s"]) < 0.01 + 0.02 * rows[step]["save_stall_s"]
            assert (written is not None) == (name == "async" and step != 8), parts
        for step in (4, 6, 8):  # read back from the files: the whole checkpoint dir
            assert rows[step]["save_bytes"] == bytes_in(root / name / "checkpoints" / f"{step:07d}")
        assert not any(k in rows[s] for s in (1, 3, 5, 7) for k in (*SAVE_KEYS, "save_parts_s"))
        # The process's peak memory never goes down, though measuring each save resets the kernel's.
        peaks = [rows[s]["mem_gb"] for s in sorted(rows)]
        assert peaks == sorted(peaks), peaks
    rows = {r["step"]: r for r in metrics(root / "async")}
    # Training went on while checkpoints 2, 4 and 6 were written: each took longer than it stalled by
    # more than a training step.
    for step in (2, 4, 6):
        assert rows[step]["save_total_s"] > rows[step]["save_stall_s"] + rows[step + 1]["step_time_s"], rows[step]


@pytest.mark.slow
def test_sigkill_while_an_async_save_is_written_keeps_the_previous_checkpoint_and_resumes_exactly(runs):
    root, first, after_kill, second = runs
    assert first["killed"].returncode == -signal.SIGKILL, first["killed"].stdout[-3000:]
    # Training had gone past step 4 while its checkpoint was being written; it never completed.
    assert {r["step"] for r in metrics(root / "killed")} >= {5, 6}
    assert "checkpoints/0000002/COMPLETE" in after_kill, after_kill
    assert "checkpoints/.tmp-0000004/state/shards.rank00000.safetensors" in after_kill, after_kill
    assert not any(p.startswith(("checkpoints/0000004", "checkpoints/.tmp-0000004/COMPLETE")) for p in after_kill)
    rerun = second["killed"]
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    resumed = re.search(r"resumed from (\S+) at step (\d+)", rerun.stdout)
    assert resumed and Path(resumed.group(1)) == root / "killed" / "checkpoints" / "0000002", rerun.stdout[-3000:]
    assert losses(root / "killed") == losses(root / "sync")
    assert checkpoints(root / "killed") == ["0000004", "0000006", "0000008"]  # the temp dir was removed


@pytest.mark.slow
def test_a_stop_commits_the_async_save_being_written_and_writes_the_full_files(runs):
    root, first, _, _ = runs
    out = first["stopped"]
    # Step 5's stop vote is read once step 6 is queued: the run stops after step 6.
    assert out.returncode == 0 and "'status': 'stopped', 'step': 6" in out.stdout, out.stdout[-3000:]
    assert checkpoints(root / "stopped") == ["0000002", "0000004", "0000006"]
    four, six = (root / "stopped" / "checkpoints" / s for s in ("0000004", "0000006"))
    assert latest_complete(root / "stopped" / "checkpoints") == six
    assert not (four / "model.safetensors").exists()  # a scheduled checkpoint: resume shards only
    for weights in ("model.safetensors", "ema.safetensors"):
        assert (six / weights).is_file(), sorted(p.name for p in six.iterdir())
    assert json.loads((six / "state" / "meta.json").read_text())["consolidated"] is True
    assert losses(root / "stopped") == losses(root / "sync")[:6]


@pytest.mark.slow
def test_init_from_a_checkpoint_of_only_resume_shards_stops_with_one_line(runs):
    root, _, _, second = runs
    out = second["init_from"]
    ckpt = root / "sync" / "checkpoints" / "0000004"
    assert out.returncode == 1, out.stdout[-3000:]
    assert [line for line in out.stdout.splitlines() if "init_from" in line] == [
        f"umm: error: CheckpointError: method.init_from={ckpt}: that checkpoint holds only resume shards (no "
        "ema.safetensors); point it at the run's final checkpoint (or one written at train.export_every steps)"]
    assert frames_in_umm(out.stdout) == [] and not (root / "init" / "checkpoints").exists()


@pytest.mark.slow
def test_a_background_checkpoint_is_committed_once_written_not_at_the_next_save(runs):
    root, first, _, _ = runs
    assert first["early"].returncode == -signal.SIGKILL, first["early"].stdout[-3000:]
    assert checkpoints(root / "early") == ["0000003"], first["early"].stdout[-3000:]
    assert (root / "early" / "checkpoints" / "0000003" / "COMPLETE").is_file()
    row = next(r for r in metrics(root / "early") if r["step"] == 3)
    assert all(k in row for k in SAVE_KEYS), row
