"""Samples through ``python -m umm``: rows of the run's own data by default, given prompts, edits and
questions, a grid with the text, TensorBoard, the shape check only on the synthetic shapes, off."""
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from tests.data.formats import png
from tests.reliability.conftest import umm
from umm.train.sample_grid import cell_size
from umm.train.sample_prompts import SamplePromptsError, given_specs


def _args(model_dir, data_root, run_dir, *extra):
    return ["train=tiny", "data=synthetic", f"model.path={model_dir}", f"data.root={data_root}", "data.synthesize=false",
            f"run_dir={run_dir}", "train.max_steps=2", "train.save_every=2", "train.sample_steps=2",
            "logger.progress_bar=false", "logger.tensorboard=false", "data.expected_num_tokens=256",
            "data.max_num_tokens=320", "data.max_num_tokens_per_sample=256", "data.prefer_buffer_before=128", *extra]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_default_samples_are_rows_of_the_runs_own_data(tmp_path, model_dir, data_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data_root = Path(os.path.realpath(data_root))
    run = tmp_path / "run"
    done = umm(_args(model_dir, data_root, run, "train.sample_every=1", "train.num_sample_prompts=5",
                     "logger.tensorboard=true"))
    assert done.returncode == 0, done.stdout[-3000:]
    step1 = json.loads((run / "samples" / "step0000001.json").read_text())
    final = json.loads((run / "samples" / "final.json").read_text())
    assert step1["samples"] == final["samples"]
    # The synthetic mix (t2i, edit, interleaved, vlm) taken in turn from each file's last line.
    lines = {name: len((data_root / f"{name}.jsonl").read_text().splitlines())
             for name in ("t2i", "edit", "interleaved", "vlm")}
    assert [s["source"] for s in final["samples"]] == [
        f"{data_root}/t2i.jsonl:{lines['t2i']}", f"{data_root}/edit.jsonl:{lines['edit']}",
        f"{data_root}/interleaved.jsonl:{lines['interleaved']}", f"{data_root}/vlm.jsonl:{lines['vlm']}",
        f"{data_root}/t2i.jsonl:{lines['t2i'] - 1}"]
    assert [s["kind"] for s in final["samples"]] == ["t2i", "edit", "t2i", "vlm", "t2i"]
    t2i_row = json.loads((data_root / "t2i.jsonl").read_text().splitlines()[-1])
    assert final["samples"][0]["text"] == t2i_row["caption"]
    vlm = final["samples"][3]
    assert "<image>" not in vlm["text"] and isinstance(vlm["answer"], str)
    # The synthetic shapes: the colour/shape check covers every colour x shape.
    assert final["num_images"] == 24 and 0 <= final["colour_accuracy"] <= 1
    w, h = cell_size(64)
    for tag in ("step0000001", "final"):
        assert Image.open(run / "samples" / f"{tag}.png").size == (4 * w, 2 * h)  # 5 cells, 4 a row
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [1, 2]


def test_given_prompts_edits_and_questions_on_own_data(tmp_path, model_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "0.png").write_bytes(png(0))
    _jsonl(data / "t2i.jsonl", [{"image": "0.png", "caption": "a red circle"}] * 4)
    (tmp_path / "in.png").write_bytes(png(1, size=(80, 48)))
    image = tmp_path / "in.png"
    prompts = (f"train.sample_prompts=[a blue square, {{image: '{image}', instruction: make the circle blue}}, "
               f"{{image: '{image}', question: what colour is the shape}}]")
    run = tmp_path / "run"
    done = umm(_args(model_dir, data, run, "~data.datasets.edit", "~data.datasets.interleaved", "~data.datasets.vlm",
                     prompts))
    assert done.returncode == 0, done.stdout[-3000:]
    final = json.loads((run / "samples" / "final.json").read_text())
    assert [(s["kind"], s["text"]) for s in final["samples"]] == [
        ("t2i", "a blue square"), ("edit", "make the circle blue"), ("vlm", "what colour is the shape")]
    assert "answer" in final["samples"][2] and "colour_accuracy" not in final  # not the synthetic shapes
    w, h = cell_size(64)
    assert Image.open(run / "samples" / "final.png").size == (3 * w, h)


def test_sampling_off_and_a_bad_prompts_file(tmp_path, model_dir, data_root):
    off = tmp_path / "off"
    done = umm(_args(model_dir, data_root, off, "train.num_sample_prompts=0", "train.sample_every=1"))
    assert done.returncode == 0, done.stdout[-3000:]
    assert not (off / "samples").exists() and (off / "checkpoints" / "0000002").is_dir()
    bad = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a red circle"}, {"image": "gone.png", "question": "what"}])
    run = tmp_path / "bad"
    done = umm(_args(model_dir, data_root, run, f"train.sample_prompts={bad}"))
    assert done.returncode != 0 and "Traceback" not in done.stdout
    assert f"{bad}:2: image file not found: {tmp_path / 'gone.png'}" in done.stdout
    assert not (run / "checkpoints").exists()  # failed before the model loaded


def test_prompts_files_read_relative_to_their_folder(tmp_path):
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (32, 16), (10, 20, 30)).save(tmp_path / "pics" / "a.png")
    entries = ["a red circle", {"image": "pics/a.png", "instruction": "make it blue"},
               {"image": "pics/a.png", "question": "what colour"}]
    (tmp_path / "p.yaml").write_text(json.dumps(entries))  # JSON is YAML
    _jsonl(tmp_path / "p.jsonl", entries)
    for name in ("p.yaml", "p.jsonl"):
        specs = given_specs(str(tmp_path / name), limit=8)
        assert [(s.kind, s.text) for s in specs] == [("t2i", "a red circle"), ("edit", "make it blue"),
                                                     ("vlm", "what colour")]
        assert specs[1].image.size == (32, 16) and specs[2].image.getpixel((0, 0)) == (10, 20, 30)
    assert len(given_specs(str(tmp_path / "p.jsonl"), limit=2)) == 2
    # Read as the loader reads data: 16-bit grey from its full range (not clipped at 255), and a picture
    # over data.max_image_pixels refused in one line.
    Image.new("I;16", (4, 4), 128 * 257).save(tmp_path / "pics" / "grey16.png")
    grey = given_specs([{"image": str(tmp_path / "pics" / "grey16.png"), "question": "what"}], limit=1)
    assert grey[0].image.getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(SamplePromptsError, match=r"p.jsonl:2: image .*a.png is 32 x 16 = 512 pixels, over "
                                                 r"data.max_image_pixels=100 \(refused"):
        given_specs(str(tmp_path / "p.jsonl"), limit=8, max_pixels=100)
    with pytest.raises(SamplePromptsError, match=r"p.yaml\[0\] = .*give exactly one of"):
        (tmp_path / "p.yaml").write_text('[{prompt: a, question: b, image: pics/a.png}]')
        given_specs(str(tmp_path / "p.yaml"), limit=8)
