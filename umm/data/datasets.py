"""Datasets on disk: rows of a storage format (umm/data/readers.py) become ``Example`` objects.

A dataset is ``<data.root>/<datasets.<name>.path>``: a JSONL file, a parquet file or folder of them
(columns are the row's fields), or for kind ``images`` also tar shards or a folder of pictures. Image
fields hold a path relative to ``image_dir`` (default: the file's folder; ``"images/0001.png"`` or
``{"path": ...}``), the file inline (``{"bytes": "<base64>"}``), or raw bytes (a binary parquet
column, Hugging Face's ``{"bytes": <binary>}``). Paths may not leave ``data.root`` (symlinks
included) unless ``data.allow_outside_root`` is true. Row layouts per ``kind`` (docs/DATA.md has
examples), each also in the layout upstream's dataset class reads:

- ``t2i``: ``{"image": IMG, "caption": str | [str, ...]}``, or BAGEL's ``captions`` (a JSON string of
  ``{name: caption}``); one caption is picked per use.
- ``images``: ``{"image": IMG}`` (unlabelled pictures, e.g. for recA).
- ``edit``: ``{"source": IMG, "instruction": str, "target": IMG}``, or BAGEL's chains
  ``{"image_list": [IMG, ...], "instruction_list": [[alternative, ...] per step]}``.
- ``interleaved`` (also ``irg``): ``{"parts": [PART, ...]}`` in sequence order, where a PART is
  ``{"type": "text", "text": str, "loss": bool}`` or
  ``{"type": "image", "image": IMG, "loss": bool, "vae": bool, "vit": bool}``; optional ``"cfg": bool``
  on any part (droppable for classifier-free guidance; default: true for parts without loss). A text
  part defaults to ``loss: false``; an image part to ``vae: true, vit: true`` (false for a generated
  image that ends the row). Or IRG's ``{"conversation": <JSON turns>}`` with upstream's defaults.
- ``vlm``: LLaVA rows ``{"image": IMG | [IMG, ...] (or "images"), "conversations": [{"from":
  "human"|"gpt"|"think", "value": str}, ...]}``; ``<image>`` in a human turn marks where each image
  goes; ``think`` turns are UniCoT's.
- ``unicot``: ``{"prompt": str, "plan": str, "image": IMG (optional initial state), "steps": [{"instruction":
  str, "edit": str, "image": IMG, "summary": str, "evaluation": str}, ...], "final": str}``.
- ``mdp_t2i`` / ``mdp_edit`` / ``mdp_geo``: UniCoT's MDP rows (``system_prompt, prompt, think, image``;
  ``..., source_image, edit_instruction, target_image``; ``instruction_list, image_list, task_type``).

Bad rows raise ``DataError`` naming the file and line (parquet: row, tar: member);
``umm.data.loader`` applies the ``data.on_error`` policy (raise, or skip and count).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from PIL import Image

from umm.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from umm.data.readers import ReaderError, RowError, open_reader
from umm.errors import UmmError

log = logging.getLogger("umm.data")


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

    def __init__(self, data: Dict[str, Any], source: str, base_dir: str, root: str, allow_outside_root: bool,
                 max_pixels: int):
        self.data = data
        self.max_pixels = max_pixels
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
        if isinstance(ref, (bytes, bytearray)):  # a binary column (parquet) or a tar member
            return self._decode(io.BytesIO(ref), f"{where} (inline bytes)")
        if isinstance(ref, str):
            ref = {"path": ref}
        if isinstance(ref, dict) and ref.get("bytes") is not None and not isinstance(ref["bytes"], str):
            return self.image(ref["bytes"], where)  # Hugging Face's image struct {bytes, path}
        if not isinstance(ref, dict) or not ({"path", "bytes"} & set(ref)):
            raise self.fail(f"{where} must be a path or {{'bytes': <base64>}}, got {ref!r:.80}", "bad_field")
        if "bytes" in ref:
            try:
                payload = base64.b64decode(ref["bytes"], validate=True)
            except (binascii.Error, TypeError, ValueError) as exc:
                raise self.fail(f"{where} has invalid base64 bytes ({exc})", "bad_image") from None
            return self._decode(io.BytesIO(payload), f"{where} (inline bytes)")
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
            return self._decode(handle, f"{where} image {path}")

    def _decode(self, handle, what: str) -> Image.Image:
        try:
            return decode_image(handle, what, self.max_pixels)
        except ImageDecodeError as exc:
            raise self.fail(exc.message, exc.reason) from None


def _captions(row: _Row) -> List[str]:
    if "caption" not in row.data and "captions" in row.data:
        value = row.data["captions"]  # BAGEL's t2i parquet: a JSON string of {name: caption}
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise row.fail(f"field 'captions' is not valid JSON ({exc})", "bad_field") from None
        captions, key = (list(value.values()) if isinstance(value, dict) else value), "captions"
    else:
        captions, key = row.get(row.data, "caption"), "caption"
        if isinstance(captions, str):
            captions = [captions]
    if not isinstance(captions, list) or not captions:
        raise row.fail(f"field {key!r} must hold at least one caption (a string, a list, or for 'captions' a "
                       "JSON dict)", "bad_field")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            raise row.fail(f"caption {i} is empty", "empty_text")
    return captions


def _parse_t2i(row: _Row) -> Dict[str, Any]:
    captions = _captions(row)
    return {"image": row.image(row.get(row.data, "image"), "'image'"), "caption": captions}


def _parse_images(row: _Row) -> Dict[str, Any]:
    return {"image": row.image(row.get(row.data, "image"), "'image'")}


def _alternatives(row: _Row, value: Any, where: str) -> List[str]:
    alternatives = [value] if isinstance(value, str) else value
    if not isinstance(alternatives, list) or not alternatives:
        raise row.fail(f"{where} must be a non-empty list of instructions", "bad_field")
    for j, text in enumerate(alternatives):
        if not isinstance(text, str) or not text.strip():
            raise row.fail(f"{where}[{j}] is empty or not a string", "empty_text")
    return list(alternatives)


def _parse_edit(row: _Row) -> Dict[str, Any]:
    """A chain of images with the instructions between them: BAGEL's ``image_list`` /
    ``instruction_list`` (alternatives per step), or one ``source`` -> ``target`` pair."""
    if "image_list" in row.data:
        refs, steps = row.get(row.data, "image_list"), row.get(row.data, "instruction_list")
        if not isinstance(refs, list) or len(refs) < 2:
            raise row.fail("field 'image_list' must list at least 2 images", "bad_field")
        if not isinstance(steps, list) or len(steps) < len(refs) - 1:
            raise row.fail(f"field 'instruction_list' needs one list of instructions per step "
                           f"({len(refs) - 1} for {len(refs)} images)", "bad_field")
        instructions = [_alternatives(row, a, f"instruction_list[{i}]") for i, a in enumerate(steps[:len(refs) - 1])]
        images = [row.image(ref, f"image_list[{i}]") for i, ref in enumerate(refs)]
        return {"images": images, "instructions": instructions}
    instruction = row.text(row.data, "instruction")  # cheap checks before decoding images
    source, target = row.get(row.data, "source"), row.get(row.data, "target")
    return {"images": [row.image(source, "'source'"), row.image(target, "'target'")],
            "instructions": [[instruction]]}


def _parse_parts(row: _Row) -> List[Dict[str, Any]]:
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
            # Clean copies by default, except after a generated image that nothing follows.
            copies = not loss or i + 1 < len(parts)
            vae, vit = row.flag(part, "vae", copies), row.flag(part, "vit", copies)
            if not (loss or vae or vit):
                raise row.fail(f"{where} image has loss, vae and vit all false: it would not be used", "bad_field")
            out.append({"type": "image", "image": row.image(row.get(part, "image", where), f"{where}.image"),
                        "loss": loss, "vae": vae, "vit": vit, "cfg": row.flag(part, "cfg", not loss)})
        else:
            raise row.fail(f"{where} has type {kind!r}; expected 'text' or 'image'", "bad_field")
    return out


def _irg_flag(part: Dict[str, Any], key: str, default: bool) -> bool:
    value = part.get(key, default)
    return bool(value) if isinstance(value, (bool, int)) else default


def _parse_conversation(row: _Row) -> List[Dict[str, Any]]:
    """IRG's ``conversation`` (a JSON string or list of turns) as parts, read as upstream's
    ``MultiThinkInterleaveT2IDataset.parse_row``: a user turn is one text (``need_loss`` default
    false); an assistant turn lists text parts (``need_loss`` default true) and base64 image parts
    (``need_loss`` / ``need_vae`` / ``need_vit`` default false); every part may be dropped for
    classifier-free guidance. Turns and parts upstream ignores (other roles, empty content, unknown
    types) are ignored; an image part that does not decode, or has no flag set, is dropped (logged)."""
    turns = row.get(row.data, "conversation")
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as exc:
            raise row.fail(f"field 'conversation' is not valid JSON ({exc})", "malformed_line") from None
    if not isinstance(turns, list):
        raise row.fail("field 'conversation' must be a list of turns", "bad_field")
    out: List[Dict[str, Any]] = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or not turn.get("role") or not turn.get("content"):
            continue
        content = turn["content"]
        if turn["role"] == "user" and isinstance(content, str):
            out.append({"type": "text", "text": content, "loss": _irg_flag(turn, "need_loss", False), "cfg": True})
        if turn["role"] != "assistant" or not isinstance(content, list):
            continue
        for i, part in enumerate(content):
            if not isinstance(part, dict) or not part.get("type") or not part.get("content"):
                continue
            if part["type"] == "text" and isinstance(part["content"], str):
                out.append({"type": "text", "text": part["content"], "loss": _irg_flag(part, "need_loss", True),
                            "cfg": True})
            elif part["type"] == "image":
                flags = {k: _irg_flag(part, f"need_{k}", False) for k in ("loss", "vae", "vit")}
                where = f"conversation[{t}].content[{i}]"
                try:
                    if not any(flags.values()):
                        raise row.fail(f"{where} image has need_loss, need_vae and need_vit all false", "bad_field")
                    image = row.image({"bytes": part["content"]}, where)
                except DataError as exc:
                    log.warning("dropping an image part, as upstream does: %s", exc)
                    continue
                out.append({"type": "image", "image": image, **flags, "cfg": True})
    return out


def _parse_interleaved(row: _Row) -> Dict[str, Any]:
    out = _parse_conversation(row) if "conversation" in row.data and "parts" not in row.data else _parse_parts(row)
    if not any(p["loss"] for p in out):
        raise row.fail("no part has loss, so the row would train nothing", "no_loss")
    fields = {key: value for key, value in row.data.items() if key not in ("parts", "conversation")}
    fields["parts"] = out
    return fields


VLM_ROLES = ("human", "gpt", "think")


def _parse_vlm(row: _Row) -> Dict[str, Any]:
    if "video" in row.data:
        raise row.fail("video rows are not supported (no frame sampler)", "bad_field")
    refs = row.data["images"] if "images" in row.data else row.data.get("image", [])
    refs = refs if isinstance(refs, list) else [refs]
    turns = row.get(row.data, "conversations")
    if not isinstance(turns, list) or not turns:
        raise row.fail("field 'conversations' must be a non-empty list", "bad_field")
    out = []
    for i, turn in enumerate(turns):
        speaker = row.get(turn, "from", f"conversations[{i}]")
        if speaker not in VLM_ROLES:
            raise row.fail(f"conversations[{i}].from is {speaker!r}; expected one of {list(VLM_ROLES)}", "bad_field")
        out.append({"from": speaker, "value": row.text(turn, "value", f"conversations[{i}]")})
    if not any(t["from"] in ("gpt", "think") for t in out):
        raise row.fail("conversation has no 'gpt' turn, so the row would train nothing", "no_loss")
    images = [row.image(ref, f"images[{i}]") for i, ref in enumerate(refs)]
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


def _string(row: _Row, key: str) -> str:
    """A text field that may be empty (upstream's MDP rows add it as an empty text all the same)."""
    value = row.get(row.data, key)
    if not isinstance(value, str):
        raise row.fail(f"field {key!r} must be a string, got {type(value).__name__}", "bad_field")
    return value


def _parse_mdp_t2i(row: _Row) -> Dict[str, Any]:
    texts = {key: _string(row, key) for key in ("system_prompt", "prompt", "think")}
    return {**texts, "image": row.image(row.get(row.data, "image"), "'image'")}


def _parse_mdp_edit(row: _Row) -> Dict[str, Any]:
    texts = {key: _string(row, key) for key in ("system_prompt", "prompt", "think", "edit_instruction")}
    return {**texts, "source_image": row.image(row.get(row.data, "source_image"), "'source_image'"),
            "target_image": row.image(row.get(row.data, "target_image"), "'target_image'")}


GEO_STEPS = ("step-1", "step-2", "step-3", "step-4")


def _parse_mdp_geo(row: _Row) -> Dict[str, Any]:
    """UniCoT's sequential-decomposition rows: the task (``instruction_list[0]``) and the first image,
    by ``task_type`` the intermediate image (``image_list[1]``, step-2/4) and the reasoning text
    (``instruction_list[-1]``, step-3/4), then the final image (``image_list[-1]``)."""
    task = row.get(row.data, "task_type")
    if task not in GEO_STEPS:
        raise row.fail(f"field 'task_type' is {task!r}; expected one of {list(GEO_STEPS)}", "bad_field")
    instructions, refs = row.get(row.data, "instruction_list"), row.get(row.data, "image_list")
    if not isinstance(instructions, list) or not instructions or not all(isinstance(t, str) for t in instructions):
        raise row.fail("field 'instruction_list' must be a non-empty list of strings", "bad_field")
    middle = task in ("step-2", "step-4")
    if not isinstance(refs, list) or len(refs) < (2 if middle else 1):
        raise row.fail(f"field 'image_list' must list at least {2 if middle else 1} images for {task}", "bad_field")
    return {
        "task_type": task, "task": instructions[0], "reasoning": instructions[-1],
        "first": row.image(refs[0], "image_list[0]"),
        "middle": row.image(refs[1], "image_list[1]") if middle else None,
        "last": row.image(refs[-1], f"image_list[{len(refs) - 1}]"),
    }


PARSERS: Dict[str, Callable[[_Row], Dict[str, Any]]] = {
    "t2i": _parse_t2i,
    "images": _parse_images,
    "edit": _parse_edit,
    "interleaved": _parse_interleaved,
    "irg": _parse_interleaved,
    "vlm": _parse_vlm,
    "unicot": _parse_unicot,
    "mdp_t2i": _parse_mdp_t2i,
    "mdp_edit": _parse_mdp_edit,
    "mdp_geo": _parse_mdp_geo,
}
# Storage formats without row fields hold pictures only.
IMAGE_ONLY_FORMATS = ("tar", "folder")


class ManifestError(UmmError):
    """The dataset as a whole is unusable (missing, unreadable, empty, a kind its format cannot hold)."""


def _inside(path: str, root: str, allow_outside_root: bool, what: str) -> str:
    path = os.path.realpath(os.path.join(root, path))
    if not allow_outside_root and os.path.commonpath([path, root]) != root:
        raise ManifestError(f"{what} resolves outside data.root {root} (set data.allow_outside_root=true to allow it)")
    return path


class Manifest:
    """Random access to the rows of one dataset, whatever its storage format (umm/data/readers.py)."""

    def __init__(self, name: str, kind: str, path: str, *, root: str, allow_outside_root: bool = False,
                 image_dir: Optional[str] = None, max_image_pixels: int = DEFAULT_MAX_PIXELS):
        if kind not in PARSERS:
            raise ManifestError(f"data.datasets.{name}.kind is {kind!r}; expected one of {sorted(PARSERS)}")
        self.name, self.kind = name, kind
        self.root = os.path.realpath(root)
        self.allow_outside_root = allow_outside_root
        self.max_image_pixels = max_image_pixels
        self.path = _inside(path, self.root, allow_outside_root, f"data.datasets.{name}.path {path!r}")
        if not os.path.exists(self.path):
            raise ManifestError(f"data.datasets.{name}: manifest not found: {self.path} (check data.root and path)")
        try:
            self.reader = open_reader(self.path)
        except ReaderError as exc:
            raise ManifestError(f"data.datasets.{name}: {exc}") from None
        if self.reader.format in IMAGE_ONLY_FORMATS and kind != "images":
            raise ManifestError(f"data.datasets.{name}: {self.path} is a {self.reader.format} of pictures, which only "
                                f"kind 'images' can read (kind is {kind!r})")
        if image_dir is not None:
            self.base_dir = _inside(image_dir, self.root, allow_outside_root, f"data.datasets.{name}.image_dir {image_dir!r}")
        else:
            self.base_dir = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def blocks(self) -> Optional[List[int]]:
        """Row counts of the units read together (parquet row groups), None when rows stand alone."""
        return self.reader.blocks

    def source(self, index: int) -> str:
        return self.reader.source(index)

    def read(self, index: int) -> Example:
        source = self.source(index)
        try:
            data = self.reader.raw(index)
        except RowError as exc:
            raise DataError(source, exc.message, exc.reason) from None
        row = _Row(data, source, self.base_dir, self.root, self.allow_outside_root, self.max_image_pixels)
        return Example(kind=self.kind, fields=PARSERS[self.kind](row), source=source, dataset=self.name)
