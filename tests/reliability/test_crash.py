"""Crash safety: SIGKILL at exact points, then the same command resumes from the last COMPLETE
checkpoint and the loss sequence equals the uninterrupted run's (1 process and 2 torchrun processes)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from umm.train.checkpoint import latest_complete
from umm.faults import FaultSpecError, parse

from .conftest import checkpoints, finish, losses, small_run, start

# name -> (UMM_FAULT, checkpoint the restart must resume from). One process, one DataLoader worker.
KILLS = {
    "mid_step": ("kill_at:phase=step,step=5", "0000004"),
    # This rank's state files are written, the model files are not.
    "mid_checkpoint_write": ("kill_at:phase=checkpoint,step=4", "0000002"),
    # Every file and the COMPLETE marker are in the temp dir; only the rename is missing.
    "before_checkpoint_rename": ("kill_at:phase=commit,step=6", "0000004"),
    # The DataLoader worker dies while reading rows (epochs are 8 and 4 rows long: mid-epoch);
    # row 70 is in batch 7; with read-ahead the trainer has saved step 4 and may have saved step 6.
    "mid_data_epoch": ("kill_at:phase=data,row=70", None),
}


def _tree(d: Path):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.is_dir() else []


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, model_dir, data_root):
    """Reference and killed runs in parallel, then the killed ones again with the same command."""
    root = tmp_path_factory.mktemp("crash1")
    args = {name: small_run(model_dir, data_root, root / name, "data.num_workers=1") for name in ["whole", *KILLS]}
    procs = {"whole": start(args["whole"])}
    procs.update({name: start(args[name], fault) for name, (fault, _) in KILLS.items()})
    first = {name: finish(p) for name, p in procs.items()}
    after_kill = {name: (_tree(root / name / "checkpoints"), latest_complete(root / name / "checkpoints"))
                  for name in KILLS}
    procs = {name: start(args[name]) for name in KILLS}
    second = {name: finish(p) for name, p in procs.items()}
    return root, first, after_kill, second


@pytest.mark.slow
@pytest.mark.parametrize("case", list(KILLS))
def test_sigkill_then_same_command_resumes_exactly(one_process, case):
    root, first, after_kill, second = one_process
    assert first["whole"].returncode == 0, first["whole"].stdout[-3000:]
    assert first[case].returncode != 0, f"the fault did not stop the run:\n{first[case].stdout[-3000:]}"
    tree, newest = after_kill[case]
    expected = KILLS[case][1]
    if expected is not None:
        assert newest is not None and newest.name == expected, tree
    else:
        assert newest is not None and newest.name in ("0000004", "0000006"), tree
    if case == "mid_checkpoint_write":
        assert ".tmp-0000004/state/shards.rank00000.safetensors" in tree, tree
        assert ".tmp-0000004/model.safetensors" not in tree and ".tmp-0000004/COMPLETE" not in tree
    if case == "before_checkpoint_rename":
        assert ".tmp-0000006/COMPLETE" in tree, tree  # a finished temp dir is still never taken for complete

    rerun = second[case]
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    resumed = re.search(r"resumed from (\S+) at step (\d+)", rerun.stdout)
    assert resumed, rerun.stdout[-3000:]
    assert Path(resumed.group(1)) == (newest if expected is None else root / case / "checkpoints" / expected)
    if case == "mid_data_epoch":
        # The data position it resumed from is inside an epoch of a dataset that already wrapped.
        state = json.loads((Path(resumed.group(1)) / "state" / "data.json").read_text())
        orders = [o for s in state["streams"] for o in s["source"]["orders"].values()]
        assert any(o["epoch"] >= 1 and 0 < o["pos"] for o in orders), orders
    assert losses(root / case) == losses(root / "whole")
    assert checkpoints(root / case) == ["0000004", "0000006", "0000008"]  # keep_last=3, no temp dirs left


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, model_dir, data_root):
    root = tmp_path_factory.mktemp("crash2")
    extra = ("torchrun.nproc_per_node=2", "train.device=cpu", "train.max_steps=6")
    # The reference writes its scheduled checkpoints in the background (train.async_save): per-rank
    # writer threads, committed at the next save; they must equal the killed run's synchronous ones.
    whole = small_run(model_dir, data_root, root / "whole", *extra, "train.async_save=true")
    killed = small_run(model_dir, data_root, root / "killed", *extra)
    procs = [start(whole), start(killed, "kill_at:phase=checkpoint,step=4,rank=1")]
    first = [finish(p) for p in procs]
    after_kill = _tree(root / "killed" / "checkpoints")
    second = finish(start(killed))
    return root, first, after_kill, second


@pytest.mark.slow
def test_two_process_run_killed_on_one_rank_mid_checkpoint_resumes_exactly(two_processes):
    root, (whole, killed), after_kill, rerun = two_processes
    assert whole.returncode == 0, whole.stdout[-3000:]
    assert killed.returncode != 0 and "torchrun exited with code" in killed.stdout, killed.stdout[-3000:]
    assert "0000002/COMPLETE" in after_kill and ".tmp-0000004/state/shards.rank00001.safetensors" in after_kill
    assert not any(p.startswith("0000004") for p in after_kill), after_kill
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert f"resumed from {root / 'killed' / 'checkpoints' / '0000002'} at step 2" in rerun.stdout
    assert losses(root / "killed") == losses(root / "whole")
    assert len(losses(root / "whole")) == 6
    assert checkpoints(root / "killed") == ["0000002", "0000004", "0000006"]
    for rank in ("00000", "00001"):
        shard = f"checkpoints/0000004/state/shards.rank{rank}.safetensors"
        synced, written = (load_file(str(root / run / shard)) for run in ("killed", "whole"))
        assert synced.keys() == written.keys() and all(torch.equal(v, written[k]) for k, v in synced.items())


def test_fault_spec_is_strict():
    (fault,) = parse("kill_at:phase=checkpoint,step=3-5,rank=1")
    assert fault.matches("checkpoint", {"step": 4, "rank": 1})
    assert not fault.matches("checkpoint", {"step": 6, "rank": 1})
    assert not fault.matches("commit", {"step": 4, "rank": 1})
    assert parse(None) == [] and parse("") == []
    for bad in ("explode_at:phase=step", "kill_at:phase=stepp", "kill_at:phase=step,stp=3", "kill_at:phase=step,step=x"):
        with pytest.raises(FaultSpecError, match="UMM_FAULT"):
            parse(bad)
