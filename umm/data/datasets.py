"""Dataset manifests on disk: JSONL files whose rows become ``Example`` objects.

A manifest is a JSONL file (one JSON object per line; blank lines are ignored) at
``<data.root>/<datasets.<name>.path>``. Image fields hold either a path relative to the manifest's
directory (``"images/0001.png"`` or ``{"path": "images/0001.png"}``) or the encoded file inline
(``{"bytes": "<base64 of a PNG/JPEG file>"}``). Paths may not leave ``data.root`` (symlinks included)
unless ``data.allow_outside_root`` is true. Row formats per ``kind`` (docs/DATA.md has examples):

- ``t2i``: ``{"image": IMG, "caption": str | [str, ...]}`` (one caption is picked per use).
- ``images``: ``{"image": IMG}`` (unlabelled pictures, e.g. for recA).
- ``edit``: ``{"source": IMG, "instruction": str, "target": IMG}``.
- ``interleaved`` (also ``irg``): ``{"parts": [PART, ...]}`` in sequence order, where a PART is
  ``{"type": "text", "text": str, "loss": bool}`` or
  ``{"type": "image", "image": IMG, "loss": bool, "vae": bool, "vit": bool}``; optional ``"cfg": bool``
  on any part (droppable for classifier-free guidance; default: true for parts without loss). A text
  part defaults to ``loss: false``; an image part to ``loss: false, vae: true, vit: true``.
- ``vlm``: ``{"images": [IMG, ...] (or "image": IMG), "conversations": [{"from": "human"|"gpt",
  "value": str}, ...]}``; ``<image>`` in a human turn marks where each image goes (LLaVA format).
- ``unicot``: ``{"prompt": str, "plan": str, "image": IMG (optional initial state), "steps": [{"instruction":
  str, "edit": str, "image": IMG, "summary": str, "evaluation": str}, ...], "final": str}``.

Bad rows raise ``DataError`` naming the manifest file and line; ``umm.data.loader`` applies the
``data.on_error`` policy (raise, or skip and count).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from PIL import Image, UnidentifiedImageError

from umm.errors import UmmError


class DataError(UmmError):
    """A bad row or sample: ``source`` is ``<file>:<line>``, ``reason`` a short category for counters."""

    def __init__(self, source: str, message: Optional[str] = None, reason: str = "bad_row"):
        # One-argument form: DataLoader workers re-raise an exception from its text alone.
        super().__init__(source if message is None else f"{source}: {message}")
        self.source = source
        self.message = message
        self.reason = reason


@dataclass
class Example:
    """One decoded row: ``fields`` is the JSON row with every image reference replaced by a PIL image."""

    kind: str
    fields: Dict[str, Any]
    source: str
    dataset: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)


class _Row:
    """Field access for one row that turns every problem into a DataError naming the row."""

    def __init__(self, data: Dict[str, Any], source: str, base_dir: str, root: str, allow_outside_root: bool):
        self.data = data
        self.source = source
        self.base_dir = base_dir
        self.root = root
        self.allow_outside_root = allow_outside_root

    def fail(self, message: str, reason: str = "bad_row") -> DataError:
        return DataError(self.source, message, reason)

    def get(self, obj: Dict[str, Any], key: str, where: str = "row") -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise self.fail(f"{where} is missing the field {key!r}", "missing_field")
        return obj[key]

    def text(self, obj: Dict[str, Any], key: str, where: str = "row") -> str:
        value = self.get(obj, key, where)
        if not isinstance(value, str):
            raise self.fail(f"{where} field {key!r} must be a string, got {type(value).__name__}", "bad_field")
        if not value.strip():
            raise self.fail(f"{where} field {key!r} is empty", "empty_text")
        return value

    def flag(self, obj: Dict[str, Any], key: str, default: bool) -> bool:
        value = obj.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(f"field {key!r} must be true or false, got {value!r}", "bad_field")
        return value

    def image(self, ref: Any, where: str) -> Image.Image:
        if isinstance(ref, str):
            ref = {"path": ref}
        if not isinstance(ref, dict) or not ({"path", "bytes"} & set(ref)):
            raise self.fail(f"{where} must be a path or {{'bytes': <base64>}}, got {ref!r:.80}", "bad_field")
        if "bytes" in ref:
            try:
                payload = base64.b64decode(ref["bytes"], validate=True)
            except (binascii.Error, TypeError, ValueError) as exc:
                raise self.fail(f"{where} has invalid base64 bytes ({exc})", "bad_image") from None
            return _decode_image(io.BytesIO(payload), f"{self.source} {where} (inline bytes)", self.source)
        path = os.path.realpath(os.path.join(self.base_dir, ref["path"]))
        if not self.allow_outside_root and os.path.commonpath([path, self.root]) != self.root:
            raise self.fail(
                f"{where} path {ref['path']!r} resolves outside data.root {self.root} "
                "(set data.allow_outside_root=true to allow it)",
                "outside_root",
            )
        if not os.path.isfile(path):
            raise self.fail(f"{where} image file not found: {path}", "missing_image")
        with open(path, "rb") as handle:
            return _decode_image(handle, f"{where} image {path}", self.source)


def _decode_image(handle, what: str, source: str) -> Image.Image:
    """Fully decode (so truncated files fail here, not in a worker later) and convert to RGB."""
    try:
        with Image.open(handle) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise DataError(source, f"{what} is not an image file", "not_an_image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(source, f"{what} cannot be decoded ({exc})", "corrupt_image") from None


def _parse_t2i(row: _Row) -> Dict[str, Any]:
    captions = row.get(row.data, "caption")
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list) or not captions:
        raise row.fail("field 'caption' must be a string or a non-empty list of strings", "bad_field")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            raise row.fail(f"caption {i} is empty", "empty_text")
    return {"image": row.image(row.get(row.data, "image"), "'image'"), "caption": captions}


def _parse_images(row: _Row) -> Dict[str, Any]:
    return {"image": row.image(row.get(row.data, "image"), "'image'")}


def _parse_edit(row: _Row) -> Dict[str, Any]:
    instruction = row.text(row.data, "instruction")  # cheap checks before decoding images
    source, target = row.get(row.data, "source"), row.get(row.data, "target")
    return {"source": row.image(source, "'source'"), "instruction": instruction,
            "target": row.image(target, "'target'")}


def _parse_interleaved(row: _Row) -> Dict[str, Any]:
    parts = row.get(row.data, "parts")
    if not isinstance(parts, list) or not parts:
        raise row.fail("field 'parts' must be a non-empty list", "bad_field")
    out = []
    for i, part in enumerate(parts):
        where = f"parts[{i}]"
        kind = row.get(part, "type", where)
        if kind == "text":
            loss = row.flag(part, "loss", False)
            out.append({"type": "text", "text": row.text(part, "text", where), "loss": loss,
                        "cfg": row.flag(part, "cfg", not loss)})
        elif kind == "image":
            loss = row.flag(part, "loss", False)
            vae, vit = row.flag(part, "vae", True), row.flag(part, "vit", True)
            if not (loss or vae or vit):
                raise row.fail(f"{where} image has loss, vae and vit all false: it would not be used", "bad_field")
            out.append({"type": "image", "image": row.image(row.get(part, "image", where), f"{where}.image"),
                        "loss": loss, "vae": vae, "vit": vit, "cfg": row.flag(part, "cfg", not loss)})
        else:
            raise row.fail(f"{where} has type {kind!r}; expected 'text' or 'image'", "bad_field")
    if not any(p["loss"] for p in out):
        raise row.fail("no part has loss: true, so the row would train nothing", "no_loss")
    fields = {key: value for key, value in row.data.items() if key != "parts"}
    fields["parts"] = out
    return fields


def _parse_vlm(row: _Row) -> Dict[str, Any]:
    refs = row.data["images"] if "images" in row.data else row.data.get("image", [])
    refs = refs if isinstance(refs, list) else [refs]
    images = [row.image(ref, f"images[{i}]") for i, ref in enumerate(refs)]
    turns = row.get(row.data, "conversations")
    if not isinstance(turns, list) or not turns:
        raise row.fail("field 'conversations' must be a non-empty list", "bad_field")
    out = []
    for i, turn in enumerate(turns):
        speaker = row.get(turn, "from", f"conversations[{i}]")
        if speaker not in ("human", "gpt"):
            raise row.fail(f"conversations[{i}].from is {speaker!r}; expected 'human' or 'gpt'", "bad_field")
        out.append({"from": speaker, "value": row.text(turn, "value", f"conversations[{i}]")})
    if not any(t["from"] == "gpt" for t in out):
        raise row.fail("conversation has no 'gpt' turn, so the row would train nothing", "no_loss")
    placeholders = sum(t["value"].count("<image>") for t in out if t["from"] == "human")
    if placeholders not in (0, len(images)):
        raise row.fail(f"{placeholders} <image> placeholders for {len(images)} images", "bad_field")
    return {"images": images, "conversations": out}


def _parse_unicot(row: _Row) -> Dict[str, Any]:
    steps = row.get(row.data, "steps")
    if not isinstance(steps, list) or not steps:
        raise row.fail("field 'steps' must be a non-empty list", "bad_field")
    parsed = []
    for i, step in enumerate(steps):
        where = f"steps[{i}]"
        parsed.append({
            "instruction": row.text(step, "instruction", where),
            "edit": row.text(step, "edit", where),
            "image": row.image(row.get(step, "image", where), f"{where}.image"),
            "summary": row.text(step, "summary", where),
            "evaluation": row.text(step, "evaluation", where),
        })
    initial = row.data.get("image")
    return {
        "prompt": row.text(row.data, "prompt"),
        "plan": row.text(row.data, "plan"),
        "image": None if initial is None else row.image(initial, "'image'"),
        "steps": parsed,
        "final": row.text(row.data, "final"),
    }


PARSERS: Dict[str, Callable[[_Row], Dict[str, Any]]] = {
    "t2i": _parse_t2i,
    "images": _parse_images,
    "edit": _parse_edit,
    "interleaved": _parse_interleaved,
    "irg": _parse_interleaved,
    "vlm": _parse_vlm,
    "unicot": _parse_unicot,
}


class ManifestError(UmmError):
    """The manifest as a whole is unusable (missing, wrong format, empty)."""


class Manifest:
    """Random access to the rows of one JSONL manifest (byte offsets indexed once)."""

    def __init__(self, name: str, kind: str, path: str, *, root: str, allow_outside_root: bool = False):
        if kind not in PARSERS:
            raise ManifestError(f"data.datasets.{name}.kind is {kind!r}; expected one of {sorted(PARSERS)}")
        self.name, self.kind = name, kind
        self.root = os.path.realpath(root)
        self.path = os.path.realpath(os.path.join(self.root, path))
        self.allow_outside_root = allow_outside_root
        if not allow_outside_root and os.path.commonpath([self.path, self.root]) != self.root:
            raise ManifestError(
                f"data.datasets.{name}.path {path!r} resolves outside data.root {self.root} "
                "(set data.allow_outside_root=true to allow it)"
            )
        if self.path.endswith(".parquet"):
            raise ManifestError(
                f"data.datasets.{name}.path {self.path} is parquet; reading parquet needs pyarrow, which is "
                "not installed: convert it to JSONL (docs/DATA.md)"
            )
        if not os.path.isfile(self.path):
            raise ManifestError(f"data.datasets.{name}: manifest not found: {self.path} (check data.root and path)")
        self.base_dir = os.path.dirname(self.path)
        self.offsets: List[int] = []
        self.line_numbers: List[int] = []
        with open(self.path, "rb") as handle:
            offset = 0
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    self.offsets.append(offset)
                    self.line_numbers.append(number)
                offset += len(line)
        if not self.offsets:
            raise ManifestError(f"data.datasets.{name}: manifest {self.path} has no rows")
        self._handle = None
        self._handle_pid: Optional[int] = None

    def __len__(self) -> int:
        return len(self.offsets)

    def source(self, index: int) -> str:
        return f"{self.path}:{self.line_numbers[index]}"

    def _line(self, index: int) -> bytes:
        # One handle per process: DataLoader workers fork after construction.
        if self._handle is None or self._handle_pid != os.getpid():
            self._handle = open(self.path, "rb")
            self._handle_pid = os.getpid()
        self._handle.seek(self.offsets[index])
        return self._handle.readline()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"], state["_handle_pid"] = None, None
        return state

    def read(self, index: int) -> Example:
        source = self.source(index)
        try:
            data = json.loads(self._line(index))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(source, f"malformed JSON line ({exc})", "malformed_line") from None
        if not isinstance(data, dict):
            raise DataError(source, f"a row must be a JSON object, got {type(data).__name__}", "malformed_line")
        row = _Row(data, source, self.base_dir, self.root, self.allow_outside_root)
        return Example(kind=self.kind, fields=PARSERS[self.kind](row), source=source, dataset=self.name)
