"""Bad configs and environments: each is one clear error naming the thing, before training starts
(or, for a disk that fills up, without losing the checkpoints already written)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from umm.model.io import CheckpointMismatchError, build_bagel, load_ae, read_model_dims, save_model_dir
from umm import faults
from umm.train.checkpoint import CheckpointError
from umm.train.distributed import DeviceError, check_gpus
from umm.train.loop import RunDirError, train
from umm.train.safetensors_file import DamagedFileError

from .conftest import checkpoints, frames_in_umm, losses, run_config, small_run, umm


def _copy(model_dir: Path, to: Path) -> Path:
    shutil.copytree(model_dir, to)
    return to


@pytest.mark.parametrize("name", ["llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors",
                                  "tokenizer.json"])
def test_model_dir_missing_a_file(tmp_path, model_dir, data_root, name):
    broken = _copy(model_dir, tmp_path / "model")
    (broken / name).unlink()
    with pytest.raises(Exception) as err:
        train(run_config(tmp_path / "run", broken, data_root, **{"train.max_steps": 1}))
    assert name in str(err.value) and str(broken) in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_truncated_model_dir_weights_file_is_named_not_read_as_zeros(tmp_path, model_dir, data_root):
    """Loading reads tensor rows with plain file reads, which past a truncated end return nothing."""
    broken = _copy(model_dir, tmp_path / "model")
    weights = broken / "ema.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 4096)  # a partial copy: the last tensor's tail is gone
    with pytest.raises(DamagedFileError, match=rf"^{weights} is damaged: it has \d+ bytes, its header needs \d+ "):
        train(run_config(tmp_path / "run", broken, data_root, **{"train.max_steps": 1}))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_model_dir_with_mismatched_shapes(tmp_path, model_dir, data_root):
    broken = _copy(model_dir, tmp_path / "model")
    config = json.loads((broken / "llm_config.json").read_text())
    config["intermediate_size"] = 96  # the weights were saved with 128
    (broken / "llm_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=r"ema\.safetensors: shape mismatch .*mlp.*\(64, 128\) vs model "
                                                      r"\(64, 96\).*other dims than the model dir's configs"):
        train(run_config(tmp_path / "run", broken, data_root, **{"train.max_steps": 1}))


def test_output_dir_not_writable(tmp_path, model_dir, data_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # runs as root in CI: a file in the way is what no permission bit can override
    with pytest.raises(RunDirError, match=f"run dir {blocker / 'run'} is not writable"):
        train(run_config(blocker / "run", model_dir, data_root, **{"train.max_steps": 1}))
    out = umm(small_run(model_dir, data_root, blocker / "run"))
    assert out.returncode != 0 and str(blocker / "run") in out.stdout and "Not a directory" in out.stdout


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async_save"])
def test_disk_full_during_a_checkpoint_write_keeps_older_checkpoints(tmp_path, model_dir, data_root, background):
    # With train.async_save the writer thread fails; the error surfaces when the step-6 save joins it.
    settings = {"train.max_steps": 6, "train.save_every": 2, "train.async_save": background}
    train(run_config(tmp_path / "whole", model_dir, data_root, **settings))
    faults.install("enospc_at:phase=checkpoint,step=4")
    with pytest.raises(CheckpointError, match=r"writing checkpoint \S+/0000004 failed .*No space left on device"):
        train(run_config(tmp_path / "full", model_dir, data_root, **settings))
    faults.install(None)
    assert checkpoints(tmp_path / "full") == ["0000002"]  # the temp dir is gone, the older checkpoint intact
    assert train(run_config(tmp_path / "full", model_dir, data_root, **settings))["status"] == "completed"
    assert losses(tmp_path / "full") == losses(tmp_path / "whole")


@pytest.mark.slow
def test_a_disk_full_while_two_processes_write_the_full_files_stops_both_with_one_line(tmp_path, model_dir, data_root):
    # Rank 0 fails mid-file; rank 1 must not be left waiting in the next tensor's gather.
    run = tmp_path / "run"
    out = umm(small_run(model_dir, data_root, run, "torchrun.nproc_per_node=2", "train.device=cpu",
                        "train.max_steps=4"), "enospc_at:phase=consolidate,rank=0", timeout=240)
    assert out.returncode != 0, out.stdout[-3000:]
    assert "writing checkpoint" in out.stdout and "No space left on device" in out.stdout, out.stdout[-3000:]
    assert checkpoints(run) == ["0000002"]  # the temp dir of the last save is gone, the older one intact


def test_nproc_per_node_over_the_visible_gpus():
    with pytest.raises(DeviceError, match=r"torchrun.nproc_per_node=2 but only 1 GPU\(s\) are visible .*at most 1"):
        check_gpus("cuda", 2, visible=1)
    with pytest.raises(DeviceError, match="no CUDA device is visible"):
        check_gpus("cuda", 1, visible=0)
    check_gpus("auto", 8, visible=0)  # auto without GPUs trains on CPU
    check_gpus("cpu", 8, visible=0)


def test_torchrun_on_missing_gpus_fails_before_launching(tmp_path, model_dir, data_root):
    count = torch.cuda.device_count()
    out = umm(small_run(model_dir, data_root, tmp_path / "run", f"torchrun.nproc_per_node={count + 1}",
                        "train.device=cuda"))
    assert out.returncode == 2, out.stdout[-3000:]
    expected = "no CUDA device is visible" if count == 0 else f"only {count} GPU(s) are visible"
    assert "umm: config error:" in out.stdout and expected in out.stdout
    assert not (tmp_path / "run" / "train.log").exists()  # torchrun never started


def _other_shape(model_dir: Path, out: Path) -> Path:
    dims = read_model_dims(model_dir)
    dims.llm.intermediate_size = 96
    return save_model_dir(build_bagel(dims), out, ae=load_ae(model_dir), tokenizer_from=model_dir)


def test_resume_from_a_checkpoint_of_another_model_shape(tmp_path, model_dir, data_root):
    train(run_config(tmp_path / "run", model_dir, data_root, **{"train.max_steps": 2, "train.save_every": 2}))
    other = _other_shape(model_dir, tmp_path / "other")
    with pytest.raises(CheckpointError, match=rf"cannot resume from {tmp_path / 'run' / 'checkpoints' / '0000002'}: "
                                              rf"its weights do not fit model.path={other} .*shape mismatch"):
        train(run_config(tmp_path / "run", other, data_root, **{"train.max_steps": 4}))


@pytest.mark.parametrize("nproc", [1, 2], ids=["in-process", "torchrun"])
def test_an_error_found_while_training_is_one_line_without_a_traceback(tmp_path, model_dir, data_root, nproc):
    """The trainer finds the error (here a model dir that is not there), in process or on every torchrun
    rank: each prints one line naming the class, the path and the fix; no umm traceback."""
    missing = tmp_path / "no-such-model"
    out = umm(small_run(missing, data_root, tmp_path / "run", f"torchrun.nproc_per_node={nproc}"))
    assert out.returncode == 1, out.stdout[-3000:]
    fix = f"MissingFileError: model dir {missing} does not exist (set model.path"
    lines = out.stdout.splitlines()
    if nproc == 1:
        assert [line for line in lines if fix in line] == [f"umm: error: {fix}, or build it with "
                                                           "scripts/make_tiny_model.py)"]
    else:
        ranks = [line for line in lines if line.startswith("umm.train.worker: error: rank")]
        assert len(ranks) == nproc and all(fix in line for line in ranks), out.stdout[-3000:]
        # The launcher's last line repeats it after torchrun's own failure report.
        assert lines[-1].startswith("umm: torchrun exited with code 1: rank") and fix in lines[-1]
    assert frames_in_umm(out.stdout) == []  # torchrun's own report may hold frames of torch, none of umm
