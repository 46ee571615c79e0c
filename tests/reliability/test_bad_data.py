"""Bad data through real training runs: each kind of bad row, with data.on_error raise and skip.

``raise`` (the default) stops with the manifest file and line; ``skip`` logs each skipped row,
counts it in metrics.jsonl and stops once more than data.max_skip_fraction of the rows were bad.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from umm.config.schema import DatasetConfig
from umm.data.datasets import DataError
from umm.data.loader import DataSkipLimitError
from umm.train.loop import train

from .conftest import metrics, run_config

GOOD_ROWS = 6
BAD_LINE = 3  # the bad row's line in t2i.jsonl


def _image(path: Path, size) -> str:
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path.name


def _truncated_png(path: Path) -> str:
    Image.new("RGB", (64, 64), (10, 200, 10)).save(path)
    path.write_bytes(path.read_bytes()[:60])
    return path.name


def _text_file(path: Path) -> str:
    path.write_text("these are notes, not a picture\n")
    return path.name


# kind -> (the bad row (a JSON line) given the dataset dir, the reason counted under skip)
BAD_ROWS = {
    "missing_image": (lambda d: json.dumps({"image": "gone.png", "caption": "a red square"}), "missing_image"),
    "corrupt_image": (lambda d: json.dumps({"image": _truncated_png(d / "cut.png"), "caption": "a red square"}),
                      "corrupt_image"),
    "not_an_image": (lambda d: json.dumps({"image": _text_file(d / "notes.png"), "caption": "a red square"}),
                     "not_an_image"),
    "malformed_jsonl_line": (lambda d: '{"image": "x.png", "caption": "a red', "malformed_line"),
    "row_missing_a_field": (lambda d: json.dumps({"image": _image(d / "ok.png", (64, 64))}), "missing_field"),
    "empty_caption": (lambda d: json.dumps({"image": _image(d / "ok.png", (64, 64)), "caption": "  "}), "empty_text"),
    "image_far_over_the_size_limit": (
        lambda d: json.dumps({"image": _image(d / "huge.png", (1024, 1024)), "caption": "a red square"}), "image_size"),
    "image_far_under_the_size_limit": (
        lambda d: json.dumps({"image": _image(d / "tiny.png", (4, 4)), "caption": "a red square"}), "image_size"),
    "sample_over_the_token_limit": (
        lambda d: json.dumps({"image": _image(d / "ok.png", (64, 64)), "caption": " ".join(["red"] * 400)}),
        "too_long"),
}


def dirty_set(root: Path, data_root: Path, bad_rows) -> Path:
    """A t2i manifest of good synthetic rows with ``bad_rows`` (callables) spliced in after line 2."""
    root.mkdir()
    lines = (data_root / "t2i.jsonl").read_text().splitlines()[:GOOD_ROWS]
    for line in lines:
        image = json.loads(line)["image"]
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_root / image, root / image)
    lines[BAD_LINE - 1:BAD_LINE - 1] = [make(root) for make in bad_rows]
    (root / "t2i.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _config(tmp_path, model_dir, root, **overrides):
    return run_config(tmp_path / "run", model_dir, root, **{
        "data.datasets": {"t2i": DatasetConfig(kind="t2i", path="t2i.jsonl")}, "train.max_steps": 3,
        "train.save_every": 3, **overrides})


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_on_error_raise_names_the_file_and_line(tmp_path, model_dir, data_root, kind):
    root = dirty_set(tmp_path / "data", data_root, [BAD_ROWS[kind][0]])
    with pytest.raises(DataError) as err:
        train(_config(tmp_path, model_dir, root))
    assert str(err.value).startswith(f"{root / 't2i.jsonl'}:{BAD_LINE}: ")
    assert err.value.reason == BAD_ROWS[kind][1]
    assert "data.on_error=skip" in str(err.value)


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_on_error_skip_logs_and_counts_each_skip(tmp_path, model_dir, data_root, kind, caplog):
    root = dirty_set(tmp_path / "data", data_root, [BAD_ROWS[kind][0]])
    caplog.set_level(logging.WARNING, logger="umm.data")
    # Two steps read more than the 7 rows of an epoch, so the bad row comes up at least once.
    cfg = _config(tmp_path, model_dir, root, **{"data.on_error": "skip", "data.max_skip_fraction": 0.3,
                                                "train.max_steps": 2, "train.save_every": 2})
    assert train(cfg)["status"] == "completed"
    reason = BAD_ROWS[kind][1]
    skips = [r.getMessage() for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert skips and all(f"t2i.jsonl:{BAD_LINE}: " in s and f"({reason}," in s for s in skips)
    last = metrics(tmp_path / "run")[-1]
    assert last["skipped_samples"] == last[f"data/skipped_{reason}"] == len(skips)
    assert last["data/rows_read"] > len(skips)


def test_skipping_stops_past_max_skip_fraction(tmp_path, model_dir, data_root):
    root = dirty_set(tmp_path / "data", data_root, [make for make, _ in BAD_ROWS.values()])
    cfg = _config(tmp_path, model_dir, root, **{"data.on_error": "skip", "data.max_skip_fraction": 0.05})
    with pytest.raises(DataSkipLimitError, match=r"skipped 6 of \d+ rows .*data.max_skip_fraction=0.05"):
        train(cfg)
