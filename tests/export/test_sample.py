"""``umm sample`` on the tiny model: every mode writes its files; the same seed gives the same bytes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

from umm.sample.cli import main as sample_main

REPO = Path(__file__).resolve().parents[2]


def test_sample_every_mode_from_each_source(sft_run, model_dir, tmp_path, capsys):
    out = tmp_path / "samples"
    knobs = ["--num-timesteps", "3", "--seed", "7", "--out", str(out), "--max-new-tokens", "6"]
    cmd = [sys.executable, "-m", "umm", "sample", str(sft_run), "--mode", "t2i", "--prompt", "a red circle",
           "--device-map", "auto", *knobs]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=120)
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "t2i-seed7.json").read_text())
    assert rec["prompt"] == "a red circle" and rec["seed"] == 7 and rec["num_timesteps"] == 3
    assert rec["cfg_interval"] == [0.4, 1.0] and rec["cfg_text_scale"] == 4.0 and rec["device_map"] == {"": "cpu"}
    assert rec["source"] == str(sft_run / "checkpoints" / "0000002")
    first = Path(rec["image"])
    assert Image.open(first).size == (64, 64)  # the run's image size

    assert sample_main([str(sft_run), "--mode", "t2i", "--prompt", "a red circle", "--device", "cpu", *knobs]) == 0
    assert (out / "t2i-seed7-2.png").read_bytes() == first.read_bytes()  # same seed, same image, nothing overwritten

    ckpt = str(sft_run / "checkpoints" / "0000002")
    assert sample_main([ckpt, "--mode", "edit", "--image", str(first), "--prompt", "make it blue", *knobs]) == 0
    edit = json.loads((out / "edit-seed7.json").read_text())
    assert edit["cfg_img_scale"] == 2.0 and edit["cfg_renorm_type"] == "text_channel"
    assert Image.open(edit["image"]).size == (64, 64)

    assert sample_main([ckpt, "--mode", "understand", "--image", str(first), "--prompt", "what is it", *knobs]) == 0
    answer = json.loads((out / "understand-seed7.json").read_text())
    assert isinstance(answer["text"], str) and "image" not in answer and not (out / "understand-seed7.png").exists()

    assert sample_main([str(model_dir), "--mode", "think", "--prompt", "a blue square", "--cfg-img-scale", "1.5",
                        *knobs]) == 0
    think = json.loads((out / "think-seed7.json").read_text())
    assert isinstance(think["text"], str) and think["cfg_img_scale"] == 1.5 and Path(think["image"]).is_file()
    assert think["source"] == str(model_dir)

    capsys.readouterr()
    assert sample_main([str(model_dir), "--mode", "edit", "--prompt", "x", *knobs]) == 2
    err = capsys.readouterr().err
    assert "--mode edit needs --image" in err and len(err.splitlines()) == 1
    notes = tmp_path / "notes.txt"  # --image is read by the data loader's decoder: one line when it is no picture
    notes.write_text("not a picture")
    assert sample_main([str(model_dir), "--mode", "edit", "--image", str(notes), "--prompt", "x", *knobs]) == 2
    err = capsys.readouterr().err
    assert f"--image {notes} is not an image file" in err and len(err.splitlines()) == 1


def test_device_map_for_bagel_7b_over_three_gpus_keeps_layers_whole():
    """accelerate's plan for the real model's shapes (meta; no GPU needed to plan)."""
    import torch

    from tests.model.test_bagel_7b_keys import bagel_7b_mot_dims
    from umm.model.io import build_on_meta
    from umm.sample.place import EMBEDDING, WITH_EMBEDDING, device_of, plan_devices

    model = build_on_meta(bagel_7b_mot_dims())
    plan = plan_devices(model, torch.bfloat16, {0: "12GiB", 1: "12GiB", 2: "12GiB", "cpu": "64GiB"})
    assert {device_of(k, plan) for k in model.state_dict()} == {0, 1, 2}  # fits the GPUs, spread over all three
    assert not any(re.search(r"\.layers\.\d+\.", k) for k in plan)  # no decoder or ViT layer split
    assert all(device_of(n, plan) == device_of(EMBEDDING, plan) for n in WITH_EMBEDDING)


def test_a_model_dir_with_umms_complete_marker_is_a_model_dir(model_dir, tmp_path):
    """make_tiny_model.py and make_shaped_model_dir.py mark their dirs COMPLETE, as checkpoints are."""
    import shutil

    from umm.export.source import resolve

    marked = Path(shutil.copytree(model_dir, tmp_path / "marked"))
    (marked / "COMPLETE").write_text("")
    source = resolve(marked)
    assert source.model_dir == marked and source.checkpoint is None
