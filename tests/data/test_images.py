"""Pictures decoded as they are meant to be seen (umm/data/images.py): pixel-exact expectations for
pictures written here with PIL."""
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from umm.data.datasets import DataError, Manifest
from umm.data.images import ImageDecodeError, decode_image

RED = np.array([10, 20, 30, 40, 50, 60], dtype=np.uint8).reshape(2, 3)  # 3 wide, 2 high


def _decode(path, **kw) -> np.ndarray:
    with open(path, "rb") as handle:
        return np.asarray(decode_image(handle, str(path), **kw))


@pytest.mark.parametrize("orientation, expected", [
    (1, [[10, 20, 30], [40, 50, 60]]),
    (6, [[40, 10], [50, 20], [60, 30]]),  # stored turned left: shown turned 90 degrees clockwise
    (8, [[30, 60], [20, 50], [10, 40]]),  # stored turned right: shown turned 90 degrees anticlockwise
    (3, [[60, 50, 40], [30, 20, 10]]),  # upside down
])
def test_exif_orientation_is_applied(tmp_path, orientation, expected):
    rgb = np.stack([RED, np.zeros_like(RED), np.full_like(RED, 7)], axis=-1)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(tmp_path / "photo.png", exif=exif)
    out = _decode(tmp_path / "photo.png")
    assert out[..., 0].tolist() == expected
    assert (out[..., 1] == 0).all() and (out[..., 2] == 7).all()


def test_16_bit_and_float_pictures_are_mapped_from_their_range(tmp_path):
    # 16-bit grey: 0..65535 -> 0..255 (before: everything above 255 was white).
    Image.fromarray(np.array([[0, 1000, 25700], [32896, 65535, 60000]], dtype=np.uint16)).save(tmp_path / "deep.png")
    out = _decode(tmp_path / "deep.png")
    assert out[..., 0].tolist() == [[0, 4, 100], [128, 255, 233]]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    # Float in 0..1 -> 0..255 (before: all black).
    Image.fromarray(np.array([[0.0, 0.2, 1.0]], dtype=np.float32)).save(tmp_path / "unit.tif")
    assert _decode(tmp_path / "unit.tif")[..., 0].tolist() == [[0, 51, 255]]
    # Float outside 0..1 -> from its own min..max; NaN reads as the minimum.
    Image.fromarray(np.array([[-1.0, 0.0, 3.0, np.nan]], dtype=np.float32)).save(tmp_path / "hdr.tif")
    assert _decode(tmp_path / "hdr.tif")[..., 0].tolist() == [[0, 64, 255, 0]]
    # Transparency is still composited on white, a palette still expanded.
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 255, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    assert _decode(tmp_path / "alpha.png").tolist() == [[[255, 0, 0], [255, 255, 255], [127, 127, 127]]]
    Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    assert _decode(tmp_path / "palette.png").tolist() == [[[255, 0, 0], [0, 0, 255], [0, 0, 0]]]


def test_a_picture_over_max_image_pixels_is_refused_with_its_row(tmp_path):
    Image.new("RGB", (100, 50), (1, 2, 3)).save(tmp_path / "big.png")
    assert _decode(tmp_path / "big.png", max_pixels=5000).shape == (50, 100, 3)  # exactly at the limit
    with pytest.raises(ImageDecodeError, match="is 100 x 50 = 5000 pixels, over data.max_image_pixels=4999") as err:
        _decode(tmp_path / "big.png", max_pixels=4999)
    assert err.value.reason == "image_too_large"
    (tmp_path / "t2i.jsonl").write_text(json.dumps({"image": "big.png", "caption": "a red circle"}) + "\n")
    with pytest.raises(DataError) as err:
        Manifest("ds", "t2i", "t2i.jsonl", root=str(tmp_path), max_image_pixels=4999).read(0)
    assert err.value.reason == "image_too_large" and str(err.value).startswith(f"{tmp_path / 't2i.jsonl'}:1: ")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_a_16k_png_is_refused_before_it_is_decoded(tmp_path):
    """A valid 16384 x 16384 grey PNG (268 MB of pixels, 260 KB on disk): refused for well under 1 GB."""
    side = 16384
    packer, row = zlib.compressobj(1), b"\0" * (side + 1)  # filter byte + one row of black
    idat = b"".join(packer.compress(row * 1024) for _ in range(side // 1024)) + packer.flush()
    path = tmp_path / "huge.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    code = (
        "import resource, sys\n"
        "from umm.data.images import ImageDecodeError, decode_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    decode_image(open({str(path)!r}, 'rb'), 'huge.png')\n"
        "except ImageDecodeError as exc:\n"
        "    print(exc.reason, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    reason, grown_mb = done.stdout.split()
    assert reason == "image_too_large", done.stderr
    assert int(grown_mb) < 100
