"""Checkpoint directories: atomic write, COMPLETE marker, keep-last-N, optimizer state round trip."""
import json

import pytest
import torch
from safetensors.torch import load_file

from umm.train import checkpoint as ckpt
from umm.train.distributed import DistEnv

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _save(root, step, keep_last=2, main_files=None):
    def files(tmp):
        ckpt.write_safetensors({"w": torch.full((2,), float(step))}, tmp / "model.safetensors")
        if main_files:
            main_files(tmp)

    def rank_files(state_dir):
        ckpt.write_safetensors({"w.exp_avg": torch.full((2,), float(step))}, state_dir / "rank0.safetensors")

    return ckpt.save_checkpoint(root, step, ENV, main_files=files, rank_files=rank_files,
                                meta={"trainable": ["w"]}, keep_last=keep_last)


def test_save_writes_complete_dir_and_keeps_last_n(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        path = _save(root, step)
    assert path == root / "0000030"
    assert sorted(p.name for p in root.iterdir()) == ["0000020", "0000030"]
    assert (path / "COMPLETE").is_file()
    assert json.loads((path / "state" / "meta.json").read_text())["step"] == 30
    assert load_file(str(path / "model.safetensors"))["w"].tolist() == [30.0, 30.0]
    assert load_file(str(path / "state" / "rank0.safetensors"))["w.exp_avg"].tolist() == [30.0, 30.0]
    assert ckpt.latest_complete(root) == path


def test_incomplete_and_temp_dirs_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    good = _save(root, 5, keep_last=0)
    (root / "0000009").mkdir()  # a copy without COMPLETE
    (root / ".tmp-0000012" / "state").mkdir(parents=True)  # killed mid-write
    assert ckpt.latest_complete(root) == good
    ckpt.remove_unfinished_dirs(root)
    assert sorted(p.name for p in root.iterdir()) == [good.name]
    assert ckpt.latest_complete(tmp_path / "missing") is None


def test_failed_write_leaves_previous_checkpoint_newest(tmp_path):
    root = tmp_path / "checkpoints"
    good = _save(root, 1)

    def boom(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(ckpt.CheckpointError, match="No space left"):
        _save(root, 2, main_files=boom)
    assert ckpt.latest_complete(root) == good
    assert sorted(p.name for p in root.iterdir()) == ["0000001"]


def test_resolve_init_from(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    _save(root, 3)
    last = _save(root, 4)
    assert ckpt.resolve_init_from(root) == last
    assert ckpt.resolve_init_from(tmp_path / "run") == last
    assert ckpt.resolve_init_from(last) == last
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_init_from(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.resolve_init_from(tmp_path / "nope")


def test_optimizer_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    named = list(model.named_parameters())
    tensors = ckpt.optimizer_tensors(opt, {id(p): n for n, p in named})
    assert set(tensors) == {f"{n}.{f}" for n, _ in named for f in ("step", "exp_avg", "exp_avg_sq")}
    ckpt.write_safetensors(tensors, tmp_path / "optim.safetensors")
    tensors = load_file(str(tmp_path / "optim.safetensors"))

    fresh = torch.nn.Linear(3, 2)
    fresh.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    ckpt.load_optimizer_tensors(opt2, list(fresh.named_parameters()), tensors)
    x = torch.randn(4, 3)
    for m, o in ((model, opt), (fresh, opt2)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    assert torch.equal(model.weight, fresh.weight) and torch.equal(model.bias, fresh.bias)

    with pytest.raises(ckpt.CheckpointError, match="does not train"):
        ckpt.load_optimizer_tensors(opt2, list(fresh.named_parameters()), {"other.exp_avg": torch.zeros(1)})


def test_a_pruned_checkpoint_is_never_complete_while_its_files_go(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1, keep_last=1)

    def files(tmp):
        ckpt.write_safetensors({"w": torch.zeros(2)}, tmp / "model.safetensors")

    newest = ckpt.start_checkpoint(root, 2, ENV, main_files=files, rank_files=lambda d: None, meta={},
                                   keep_last=1, background=False).join()
    # The commit returns before the old files are removed; the old dir is already out of the way.
    assert not (root / "0000001").exists()
    assert ckpt.complete_checkpoints(root) == [newest]
    ckpt.finish_pruning()
    assert sorted(p.name for p in root.iterdir()) == ["0000002"]


def test_pruning_keeps_the_new_checkpoint_and_leaves_newer_ones_of_an_earlier_run(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 9):  # 9: an earlier, longer run in this dir
        _save(root, step, keep_last=0)
    _save(root, 3, keep_last=2)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["0000002", "0000003", "0000009"]
    _save(root, 2, keep_last=1)  # the same step again (a resume from 1 past a damaged 2, say)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["0000002", "0000003", "0000009"]
    _save(root, 4, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["0000004", "0000009"]
