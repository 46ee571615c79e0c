"""Manifest parsing: every kind of the synthetic set, and each kind of bad row."""
import base64
import io
import json
import tarfile

import pytest
from PIL import Image

from umm.data.datasets import DataError, Manifest, ManifestError


def _png_bytes(colour=(200, 0, 0), size=(64, 64)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _manifest(tmp_path, rows, kind="t2i", name="m.jsonl"):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (tmp_path / name).write_text("\n".join(lines) + "\n")
    return Manifest("ds", kind, name, root=str(tmp_path))


@pytest.mark.parametrize("kind", ["t2i", "edit", "interleaved", "vlm", "unicot"])
def test_synthetic_rows_parse(synthetic_root, kind):
    manifest = Manifest(kind, kind, f"{kind}.jsonl", root=synthetic_root)
    example = manifest.read(0)
    assert example.kind == kind and example.source.endswith(f"{kind}.jsonl:1")
    images = {
        "t2i": lambda f: [f["image"]],
        "edit": lambda f: f["images"],
        "interleaved": lambda f: [p["image"] for p in f["parts"] if p["type"] == "image"],
        "vlm": lambda f: f["images"],
        "unicot": lambda f: [s["image"] for s in f["steps"]],
    }[kind](example.fields)
    assert images and all(isinstance(im, Image.Image) and im.size == (64, 64) for im in images)


def test_inline_bytes_and_blank_lines(tmp_path):
    row = {"image": {"bytes": base64.b64encode(_png_bytes()).decode()}, "caption": "a red square"}
    manifest = _manifest(tmp_path, ["", row, "   ", row])
    assert len(manifest) == 2
    assert manifest.source(1).endswith("m.jsonl:4")
    assert manifest.read(1).fields["image"].getpixel((0, 0)) == (200, 0, 0)


def _error(manifest, index=0):
    with pytest.raises(DataError) as info:
        manifest.read(index)
    return info.value


def test_missing_image_file(tmp_path):
    err = _error(_manifest(tmp_path, [{"image": "nope.png", "caption": "a red circle"}]))
    assert err.reason == "missing_image" and "m.jsonl:1" in str(err) and "nope.png" in str(err)


def test_truncated_image(tmp_path):
    (tmp_path / "cut.png").write_bytes(_png_bytes()[:60])
    err = _error(_manifest(tmp_path, [{"image": "cut.png", "caption": "a red circle"}]))
    assert err.reason == "corrupt_image" and "cut.png" in str(err)


def test_non_image_file(tmp_path):
    (tmp_path / "notes.png").write_text("this is text, not a picture")
    err = _error(_manifest(tmp_path, [{"image": "notes.png", "caption": "a red circle"}]))
    assert err.reason == "not_an_image"


def test_malformed_line(tmp_path):
    good = {"image": {"bytes": base64.b64encode(_png_bytes()).decode()}, "caption": "a red circle"}
    manifest = _manifest(tmp_path, [good, '{"image": "a.png", "caption": '])
    manifest.read(0)
    err = _error(manifest, 1)
    assert err.reason == "malformed_line" and "m.jsonl:2" in str(err)


def test_row_missing_a_field(tmp_path):
    err = _error(_manifest(tmp_path, [{"source": "a.png", "target": "b.png"}], kind="edit"))
    assert err.reason == "missing_field" and "'instruction'" in str(err)


def test_empty_caption(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    err = _error(_manifest(tmp_path, [{"image": "a.png", "caption": "  "}]))
    assert err.reason == "empty_text"


def test_path_outside_root_is_refused_unless_allowed(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "outside.png")
    (root / "m.jsonl").write_text(json.dumps({"image": "../outside.png", "caption": "a red circle"}) + "\n")
    err = _error(Manifest("ds", "t2i", "m.jsonl", root=str(root)))
    assert err.reason == "outside_root" and "allow_outside_root" in str(err)
    Manifest("ds", "t2i", "m.jsonl", root=str(root), allow_outside_root=True).read(0)
    with pytest.raises(ManifestError, match="outside data.root"):
        Manifest("ds", "t2i", "../outside.png", root=str(root))


def test_manifest_level_errors(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        Manifest("ds", "t2i", "missing.jsonl", root=str(tmp_path))
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="cannot read parquet file"):
        Manifest("ds", "t2i", "x.parquet", root=str(tmp_path))
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        tar.addfile(tarfile.TarInfo("0.png"), io.BytesIO(b""))
    with pytest.raises(ManifestError, match="only kind 'images'"):
        Manifest("ds", "t2i", "x.tar", root=str(tmp_path))
    with pytest.raises(ManifestError, match="kind"):
        Manifest("ds", "video", "x.jsonl", root=str(tmp_path))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ManifestError, match="no rows"):
        Manifest("ds", "t2i", "empty.jsonl", root=str(tmp_path))


def test_interleaved_and_vlm_checks(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    no_loss = {"parts": [{"type": "text", "text": "hi"}, {"type": "image", "image": "a.png"}]}
    assert _error(_manifest(tmp_path, [no_loss], kind="interleaved")).reason == "no_loss"
    system = {"image": "a.png", "conversations": [
        {"from": "system", "value": "be brief"}, {"from": "gpt", "value": "red"}]}
    assert "'system'" in str(_error(_manifest(tmp_path, [system], kind="vlm", name="v.jsonl")))
    video = {"video": "a.mp4", "conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "x"}]}
    assert "video" in str(_error(_manifest(tmp_path, [video], kind="vlm", name="w.jsonl")))
