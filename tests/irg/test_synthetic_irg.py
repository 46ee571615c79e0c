"""The synthetic IRG trajectories: first image wrong in the named detail, improved image right."""
import json

from PIL import Image

from umm.data.shapes import classify
from umm.data.synthetic_irg import MANIFEST, all_prompts, trajectory, words, write_irg_dataset


def test_first_image_wrong_in_the_named_detail_and_improved_image_fixes_it():
    for index in range(24):
        t = trajectory(index, size=64, seed=3)
        first, improved = classify(t["first"]), classify(t["improved"])
        assert improved == (t["colour"], t["shape"])
        if t["error"] == "colour":
            assert first == (t["wrong"], t["shape"])
            assert f"is {t['wrong']} not {t['colour']}" in t["reflection"]
        else:
            assert first == (t["colour"], t["wrong"])
            assert f"is a {t['wrong']} not a {t['shape']}" in t["reflection"]
        assert t["prompt"] == f"a {t['colour']} {t['shape']}"


def test_dataset_on_disk_is_deterministic_and_reused(tmp_path):
    out = write_irg_dataset(tmp_path / "a", num=6, size=64, seed=1)
    again = write_irg_dataset(tmp_path / "b", num=6, size=64, seed=1)
    assert (out / MANIFEST).read_text() == (again / MANIFEST).read_text()
    rows = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert len(rows) == 6
    assert [p["type"] for p in rows[0]["parts"]] == ["text", "text", "image", "text", "image"]
    first = Image.open(out / rows[0]["parts"][2]["image"])
    assert first.size == (64, 64)
    stamp = (out / MANIFEST).stat().st_mtime_ns
    write_irg_dataset(out, num=6, size=64, seed=1)  # complete with the same settings: untouched
    assert (out / MANIFEST).stat().st_mtime_ns == stamp


def test_vocabulary_covers_every_prompt():
    vocab = set(words())
    for colour, shape in all_prompts():
        assert {colour, shape} <= vocab
