"""What the sampler shows: ``train.sample_prompts`` read into ``SampleSpec`` objects.

``train.sample_prompts`` is one of:

- null: the last rows of each of the run's datasets, taken in turn, at most half of each dataset;
  the loader holds these rows out of training (``held_out_rows``) (``t2i``/``mdp_t2i``: the caption or
  prompt; ``edit``/``mdp_edit``: the source image and instruction; ``vlm``: the first image and the
  first question; ``interleaved``/``irg``/``unicot``: the first text as a text-to-image prompt). Kinds
  without text (``images``, ``mdp_geo``) give none, so a run on pictures only samples nothing.
- a list (in YAML or as an override) whose entries are a prompt string, ``{prompt: str}``,
  ``{image: path, instruction: str}`` (an edit) or ``{image: path, question: str}`` (understanding);
  image paths are relative to the working directory;
- the path of a ``.jsonl`` file (one such entry per line) or ``.yaml``/``.yml`` file (a list of them);
  image paths are relative to the file's folder.

At most ``train.num_sample_prompts`` are used. Every problem is one ``SamplePromptsError`` raised
before the model loads.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

from PIL import Image

from umm.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from umm.errors import UmmError

KEY = "train.sample_prompts"


class SamplePromptsError(UmmError):
    pass


@dataclass
class SampleSpec:
    """One sample: ``kind`` is t2i (``text`` a prompt), edit (``image`` + instruction) or vlm
    (``image`` + question); ``source`` names where it came from (a data row or the prompts' origin)."""

    kind: str
    text: str
    source: str
    image: Optional[Image.Image] = None
    row: Optional[Tuple[str, int]] = None  # (manifest path, row index) of a spec taken from the run's data


def _open_image(path: str, where: str, max_pixels: int) -> Image.Image:
    try:
        with open(path, "rb") as handle:
            return decode_image(handle, f"{where}: image {path}", max_pixels)
    except FileNotFoundError:
        raise SamplePromptsError(f"{where}: image file not found: {path}") from None
    except OSError as exc:  # a folder, no permission
        raise SamplePromptsError(f"{where}: cannot read image {path} ({exc})") from None
    except ImageDecodeError as exc:
        raise SamplePromptsError(exc.message) from None


def _entry(value: Any, where: str, base_dir: str, max_pixels: int) -> SampleSpec:
    if isinstance(value, str):
        value = {"prompt": value}
    if not isinstance(value, dict):
        raise SamplePromptsError(f"{where} must be a prompt string or a mapping, got {value!r:.80}")
    texts = [k for k in ("prompt", "instruction", "question") if k in value]
    unknown = sorted(set(value) - {"prompt", "instruction", "question", "image"})
    if unknown or len(texts) != 1:
        raise SamplePromptsError(
            f"{where} = {value!r:.120}: give exactly one of 'prompt', 'instruction' (with 'image') or 'question' "
            f"(with 'image'){f'; unknown keys {unknown}' if unknown else ''}")
    key = texts[0]
    text = value[key]
    if not isinstance(text, str) or not text.strip():
        raise SamplePromptsError(f"{where}.{key} must be a non-empty string")
    if key == "prompt":
        if "image" in value:
            raise SamplePromptsError(f"{where}: a 'prompt' takes no 'image' (use 'instruction' for an edit)")
        return SampleSpec("t2i", text, where)
    if not isinstance(value.get("image"), str):
        raise SamplePromptsError(f"{where}: '{key}' needs 'image' (a path)")
    image = _open_image(os.path.join(base_dir, value["image"]), where, max_pixels)
    return SampleSpec("edit" if key == "instruction" else "vlm", text, where, image)


def _read_file(path: str) -> List[Any]:
    if not os.path.isfile(path):
        raise SamplePromptsError(f"{KEY} = {path!r}: file not found (give a .jsonl or .yaml file, or a list)")
    if path.endswith(".jsonl"):
        entries = []
        with open(path) as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        entries.append((json.loads(line), f"{path}:{number}"))
                    except json.JSONDecodeError as exc:
                        raise SamplePromptsError(f"{path}:{number}: malformed JSON line ({exc})") from None
        return entries
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            with open(path) as handle:
                data = yaml.safe_load(handle)
        except yaml.YAMLError as exc:
            raise SamplePromptsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, list):
            raise SamplePromptsError(f"{path} must hold a list of prompts, got {type(data).__name__}")
        return [(value, f"{path}[{i}]") for i, value in enumerate(data)]
    raise SamplePromptsError(f"{KEY} = {path!r}: a prompts file ends in .jsonl, .yaml or .yml")


def given_specs(value: Any, limit: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> List[SampleSpec]:
    """The specs of a list or a prompts file (``value`` is ``train.sample_prompts``, not null); pictures
    over ``max_pixels`` (``data.max_image_pixels``) are refused as the loader refuses them."""
    if isinstance(value, str):
        path = os.path.abspath(value)
        entries, base_dir = _read_file(path), os.path.dirname(path)
    elif isinstance(value, (list, tuple)):
        entries, base_dir = [(v, f"{KEY}[{i}]") for i, v in enumerate(value)], os.getcwd()
    else:
        raise SamplePromptsError(f"{KEY} must be null, a list of prompts or a .jsonl/.yaml file, got {value!r:.80}")
    if not entries:
        raise SamplePromptsError(f"{KEY} is empty: give at least one prompt, or null for rows of the run's data "
                                 "(train.num_sample_prompts=0 turns sampling off)")
    return [_entry(v, where, base_dir, max_pixels) for v, where in entries[:limit]]


def _question(conversations: List[dict]) -> Optional[str]:
    for turn in conversations:
        if turn["from"] == "human":
            text = turn["value"].replace("<image>", " ").strip()
            return " ".join(text.split()) or None
    return None


def spec_of_example(example) -> Optional[SampleSpec]:
    """The sample a data row stands for (None for a kind without text)."""
    f, source = example.fields, example.source
    if example.kind == "t2i":
        return SampleSpec("t2i", f["caption"][0], source)
    if example.kind == "mdp_t2i" and f["prompt"].strip():
        return SampleSpec("t2i", f["prompt"], source)
    if example.kind == "edit":
        return SampleSpec("edit", f["instructions"][0][0], source, f["images"][0])
    if example.kind == "mdp_edit" and f["edit_instruction"].strip():
        return SampleSpec("edit", f["edit_instruction"], source, f["source_image"])
    if example.kind == "vlm" and f["images"]:
        question = _question(f["conversations"])
        return SampleSpec("vlm", question, source, f["images"][0]) if question else None
    if example.kind in ("interleaved", "irg"):
        text = next((p["text"] for p in f["parts"] if p["type"] == "text"), None)
        return SampleSpec("t2i", text, source) if text else None
    if example.kind == "unicot":
        return SampleSpec("t2i", f["prompt"], source)
    return None


def data_specs(data, limit: int) -> List[SampleSpec]:
    """Up to ``limit`` specs from the last rows of the run's datasets, one dataset after another in
    turn (datasets that share a file give its rows once)."""
    from umm.data.datasets import DataError, Manifest, ManifestError

    manifests, seen = [], set()
    for name, ds in data.datasets.items():
        try:
            manifest = Manifest(name, ds.kind, ds.path, root=data.root, allow_outside_root=data.allow_outside_root,
                                image_dir=ds.image_dir, max_image_pixels=data.max_image_pixels)
        except ManifestError as exc:
            raise SamplePromptsError(f"{KEY} is null (samples from the run's data) but {exc}") from None
        if (manifest.path, ds.kind) not in seen:
            seen.add((manifest.path, ds.kind))
            manifests.append(manifest)
    out: List[SampleSpec] = []
    # Walk back from each dataset's last row, a few rows at most per spec (rows without text are skipped),
    # never into the first half: the rows shown are held out of training, and most rows must train.
    cursors = {m.name: len(m) - 1 for m in manifests}
    stops = {m.name: len(m) - len(m) // 2 for m in manifests}
    budget = 4 * limit
    while len(out) < limit and budget > 0 and any(cursors[n] >= stops[n] for n in cursors):
        for manifest in manifests:
            index = cursors[manifest.name]
            if index < stops[manifest.name] or len(out) >= limit:
                continue
            cursors[manifest.name] -= 1
            budget -= 1
            try:
                spec = spec_of_example(manifest.read(index))
            except DataError:
                continue  # a bad row is the loader's to report; pick another
            if spec is not None:
                spec.row = (manifest.path, index)
                out.append(spec)
    return out


def held_out_rows(specs: List[SampleSpec]) -> Dict[str, FrozenSet[int]]:
    """manifest path -> the row indices the specs show, which the loader must not train on."""
    rows: Dict[str, set] = {}
    for spec in specs:
        if spec.row is not None:
            rows.setdefault(spec.row[0], set()).add(spec.row[1])
    return {path: frozenset(r) for path, r in rows.items()}


def sample_specs(cfg) -> List[SampleSpec]:
    """The specs a run samples (empty when sampling is off)."""
    limit = cfg.train.num_sample_prompts
    if limit <= 0:
        return []
    if cfg.train.sample_prompts is None:
        return data_specs(cfg.data, limit)
    return given_specs(cfg.train.sample_prompts, limit, cfg.data.max_image_pixels)
