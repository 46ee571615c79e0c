"""``umm data check`` and ``umm data show`` through the CLI, on data written here with planted faults.

The model dir holds only a tokenizer: the data tool must not need weights.
"""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from PIL import Image

from umm.data.synthetic import words
from umm.model.tokenizer import build_word_level

RED, GREEN = (220, 30, 30), (30, 160, 40)


def _png(colour, size=(128, 128)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer_only")
    build_word_level(words()).save(str(path / "tokenizer.json"))
    return path


def _config_dir(tmp_path, root, datasets):
    """A data config file of our own, passed with --config-dir as a training run takes it."""
    (tmp_path / "conf" / "data").mkdir(parents=True)
    OmegaConf.save({"defaults": ["/data_synthetic_common@_here_", "_self_"], "name": "mine", "root": str(root),
                    "synthesize": False, "datasets": datasets}, tmp_path / "conf" / "data" / "mine.yaml")
    return tmp_path / "conf"


def _umm(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("UMM_")}
    return subprocess.run([sys.executable, "-m", "umm", "data", *args], capture_output=True, text=True,
                          env=dict(env, OMP_NUM_THREADS="1"), timeout=120)


def test_check_lists_every_planted_fault_with_file_and_line(tmp_path, model_dir):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "images" / "red.png").write_bytes(_png(RED))
    (root / "images" / "text.png").write_bytes(b"not a picture")
    (root / "images" / "cut.png").write_bytes(_png(GREEN)[:60])
    t2i = root / "t2i.jsonl"
    lines = [
        {"image": "images/red.png", "caption": "a red square"},                  # 1 ok
        {"image": "images/gone.png", "caption": "a red square"},                 # 2 missing file
        '{"image": "images/red.png", "caption": ',                               # 3 bad JSON
        {"image": "images/red.png", "caption": "  "},                            # 4 empty text
        {"image": "images/text.png", "caption": "a red square"},                 # 5 not an image
        {"image": "images/cut.png", "caption": "a green square"},                # 6 truncated image
        {"image": "images/red.png", "caption": " ".join(["red"] * 600)},         # 7 over the token limit
        "",                                                                      # 8 blank: ignored
        {"image": "images/red.png", "caption": "a red square"},                  # 9 ok
    ]
    t2i.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    edit = root / "edit.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"image_list": [_png(RED), _png(GREEN)], "instruction_list": [["make it green"]]},
        {"image_list": [_png(RED), b"garbage"], "instruction_list": [["make it green"]]},
    ]), edit)
    vlm = root / "vlm.jsonl"
    vlm.write_text(json.dumps({"image": "images/red.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is the shape"}, {"from": "gpt", "value": "red"}]}) + "\n"
        + json.dumps({"image": "images/red.png", "conversations": [{"from": "human", "value": "<image>\nhi"}]}) + "\n")
    with tarfile.open(root / "shard.tar", "w") as tar:
        info = tarfile.TarInfo("000000.png")
        info.size = len(_png(RED))
        tar.addfile(info, io.BytesIO(_png(RED)))
    conf = _config_dir(tmp_path, root, {
        "t2i": {"kind": "t2i", "path": "t2i.jsonl"},
        "edit": {"kind": "edit", "path": "edit.parquet"},
        "vlm": {"kind": "vlm", "path": "vlm.jsonl"},
        "shards": {"kind": "images", "path": "shard.tar"},   # a kind SFT does not train on
        "gone": {"kind": "t2i", "path": "nowhere.jsonl"},
    })
    done = _umm("check", "--config-dir", str(conf), "data=mine", f"model.path={model_dir}")
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    expected = {
        f"{t2i}:2: ": "image file not found", f"{t2i}:3: ": "malformed JSON line", f"{t2i}:4: ": "caption 0 is empty",
        f"{t2i}:5: ": "is not an image file", f"{t2i}:6: ": "cannot be decoded",
        f"{t2i}:7: ": "over data.max_num_tokens_per_sample=512",
        f"{edit}:row1: ": "image_list[1] (inline bytes) is not",
        f"{vlm}:2: ": "no 'gpt' turn", "data.datasets.shards": "kind is 'images', which recipe 'sft' does not train on",
        "data.datasets.gone: ": "manifest not found",
    }
    for where, what in expected.items():
        listed = [line for line in out.splitlines() if line.startswith(where) and what in line]
        assert listed, f"{where}{what} not in:\n{out}"
    bad_rows = [line for line in out.splitlines() if line.startswith(str(root))]
    assert len(bad_rows) == 8, out  # nothing listed twice, good rows not listed
    assert f"t2i (kind t2i, jsonl {t2i}): 8 rows, 2 ok, 6 bad" in out
    assert "  image sizes after transform: vae_noised 64x64 (3)" in out  # two good rows and the over-long one
    assert "over max_num_tokens_per_sample (512): 33.3%" in out
    assert ("10 problems in 12 rows (corrupt_image 1, empty_text 1, malformed_line 1, missing_image 1, no_loss 1, "
            "not_an_image 2, too_long 1, unreadable_dataset 2)") in out


def test_show_draws_samples_at_their_trained_size(tmp_path, model_dir):
    root = tmp_path / "data"
    root.mkdir()
    (root / "red.png").write_bytes(_png(RED))
    (root / "t2i.jsonl").write_text(json.dumps({"image": "red.png", "caption": "a red square"}) + "\n")
    conf = _config_dir(tmp_path, root, {"t2i": {"kind": "t2i", "path": "t2i.jsonl"}})
    out = tmp_path / "show" / "x.png"
    done = _umm("show", "--config-dir", str(conf), "data=mine", f"model.path={model_dir}", "-n", "3", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    pixels = np.asarray(Image.open(out).convert("RGB"))
    assert f"drawn to {out} ({pixels.shape[1]}x{pixels.shape[0]})" in done.stdout
    assert pixels.shape[1] == 960 and 3 * 64 < pixels.shape[0] < 2000
    # The 128 px picture, trained at 64 x 64 (conf/data_synthetic_common.yaml's VAE size), drawn 3 times unscaled.
    red = np.all(pixels == RED, axis=-1)
    assert red.sum() == 3 * 64 * 64
    assert set(red.sum(axis=1)) == {0, 64}
    # The caption may be dropped for guidance: drawn on the legend's orange ground.
    assert np.all(pixels == (255, 214, 150), axis=-1).sum() > 3 * 200
