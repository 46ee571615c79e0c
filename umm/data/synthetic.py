"""Synthetic datasets of coloured shapes for the tiny model: every dataset kind, small and deterministic.

Pictures come from ``umm.data.shapes`` (one flat shape on white). Per kind (formats in
umm/data/datasets.py):

- ``t2i.jsonl``: "a red circle" -> the picture.
- ``edit.jsonl``: a picture, "make the circle blue" / "turn the red circle into a square", the edited one
  (same place and size).
- ``interleaved.jsonl``: "draw a red circle" -> picture (loss) -> "what colour is it" -> "red" (loss) ->
  "now make it blue" -> edited picture (loss).
- ``vlm.jsonl``: "<image> what colour is the shape" -> "red", "what shape is it" -> "circle"; images
  stored inline as base64 PNG (the other kinds use files), so both image encodings are exercised.
- ``unicot.jsonl``: chains for "a blue square" that start from a picture wrong in colour and shape:
  a macro plan, then micro steps (instruction, edit text, resulting picture, summary, evaluation),
  and a final answer (methods.md §3.5).

Layout: ``<out>/<kind>.jsonl``, ``<out>/images/<kind>/<row>_<name>.png`` and ``COMPLETE`` (JSON of the
settings). ``generate`` is a no-op when ``COMPLETE`` holds the same settings.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import random
import shutil
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

from PIL import Image

from umm.data.outdir import MARKER, NEW_DIR_FIX, check_writable, commit, read_marker, temp_dir
from umm.data.shapes import COLOURS, SHAPES, ShapeSpec, random_spec, render_spec

KINDS = ("t2i", "edit", "interleaved", "vlm", "unicot")


@dataclass(frozen=True)
class SyntheticSettings:
    size: int = 64
    seed: int = 0
    num_t2i: int = 480
    num_edit: int = 240
    num_interleaved: int = 120
    num_vlm: int = 240
    num_unicot: int = 120


# ---- texts (the tiny tokenizer is word level: ``words`` lists every word these can produce) ----

def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def colour_instruction(shape: str, colour: str) -> str:
    return f"make the {shape} {colour}"


def shape_instruction(colour: str, old: str, new: str) -> str:
    return f"turn the {colour} {old} into a {new}"


QUESTION_COLOUR = "what colour is it"
VLM_COLOUR = "what colour is the shape"
VLM_SHAPE = "what shape is it"
DONE = "everything is good"


def draw(colour: str, shape: str) -> str:
    return f"draw {caption(colour, shape)}"


def chain_plan(start: ShapeSpec, goal: ShapeSpec) -> str:
    return f"first draw {caption(start.colour, start.shape)} then make it {goal.colour} then turn it into a {goal.shape}"


def chain_edit(attribute: str, old: str, new: str) -> str:
    return f"change the {attribute} from {old} to {new}"


def chain_evaluation(goal: ShapeSpec, colour_right: bool) -> str:
    shape_todo = f"the shape should be a {goal.shape} not done yet"
    if colour_right:
        return f"the colour is right and {shape_todo}"
    return f"the colour should be {goal.colour} and {shape_todo}"


def chain_final(goal: ShapeSpec) -> str:
    return f"the image shows {caption(goal.colour, goal.shape)}"


def _all_texts() -> List[str]:
    specs = [ShapeSpec(c, s, 0, 0, 1) for c in COLOURS for s in SHAPES]
    texts = [QUESTION_COLOUR, VLM_COLOUR, VLM_SHAPE, DONE]
    for a in specs:
        texts += [caption(a.colour, a.shape), draw(a.colour, a.shape), f"{draw(a.colour, a.shape)} on white",
                  f"now {colour_instruction(a.shape, a.colour)}", shape_instruction(a.colour, a.shape, a.shape),
                  chain_evaluation(a, True), chain_evaluation(a, False), chain_final(a), chain_plan(a, a)]
    texts += [chain_edit(attr, o, o) for attr, options in (("colour", COLOURS), ("shape", SHAPES)) for o in options]
    return texts


def words() -> List[str]:
    """The vocabulary of all synthetic texts (lowercase words, no punctuation)."""
    return sorted({w for text in _all_texts() for w in text.split()})


# ---- rows --------------------------------------------------------------------------------------

class _Writer:
    def __init__(self, out: str, kind: str):
        self.out, self.kind = out, kind
        os.makedirs(os.path.join(out, "images", kind), exist_ok=True)

    def save(self, image: Image.Image, row: int, name: str) -> str:
        rel = f"images/{self.kind}/{row:05d}_{name}.png"
        image.save(os.path.join(self.out, rel), format="PNG")
        return rel


def _inline(image: Image.Image) -> Dict[str, str]:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"bytes": base64.b64encode(buf.getvalue()).decode("ascii")}


def _rng(kind: str, settings: SyntheticSettings, row: int) -> random.Random:
    return random.Random(f"synthetic/{kind}/{settings.seed}/{row}")


def _spec(rng: random.Random, size: int, colour: str = None, shape: str = None) -> ShapeSpec:
    return random_spec(colour or rng.choice(list(COLOURS)), shape or rng.choice(SHAPES), size, rng)


def _other(rng: random.Random, options, current):
    return rng.choice([o for o in options if o != current])


def _t2i(row: int, s: SyntheticSettings, w: _Writer) -> Dict:
    rng = _rng("t2i", s, row)
    # Cycle through all (colour, shape) pairs so every prompt is equally represented.
    pairs = [(c, sh) for c in COLOURS for sh in SHAPES]
    colour, shape = pairs[row % len(pairs)]
    spec = _spec(rng, s.size, colour, shape)
    return {"image": w.save(render_spec(spec, s.size), row, "image"), "caption": caption(colour, shape)}


def _edit_pair(rng: random.Random, size: int) -> Tuple[ShapeSpec, ShapeSpec, str]:
    source = _spec(rng, size)
    if rng.random() < 0.5:
        target = dataclasses.replace(source, colour=_other(rng, COLOURS, source.colour))
        instruction = colour_instruction(source.shape, target.colour)
    else:
        target = dataclasses.replace(source, shape=_other(rng, SHAPES, source.shape))
        instruction = shape_instruction(source.colour, source.shape, target.shape)
    return source, target, instruction


def _edit(row: int, s: SyntheticSettings, w: _Writer) -> Dict:
    source, target, instruction = _edit_pair(_rng("edit", s, row), s.size)
    return {"source": w.save(render_spec(source, s.size), row, "source"), "instruction": instruction,
            "target": w.save(render_spec(target, s.size), row, "target")}


def _interleaved(row: int, s: SyntheticSettings, w: _Writer) -> Dict:
    rng = _rng("interleaved", s, row)
    first = _spec(rng, s.size)
    second = dataclasses.replace(first, colour=_other(rng, COLOURS, first.colour))
    return {"parts": [
        {"type": "text", "text": draw(first.colour, first.shape)},
        {"type": "image", "image": w.save(render_spec(first, s.size), row, "first"), "loss": True},
        {"type": "text", "text": QUESTION_COLOUR, "cfg": False},  # never drop the question of an answer
        {"type": "text", "text": first.colour, "loss": True},
        {"type": "text", "text": f"now {colour_instruction(first.shape, second.colour)}"},
        {"type": "image", "image": w.save(render_spec(second, s.size), row, "second"), "loss": True},
    ]}


def _vlm(row: int, s: SyntheticSettings, w: _Writer) -> Dict:
    spec = _spec(_rng("vlm", s, row), s.size)
    return {"images": [_inline(render_spec(spec, s.size))], "conversations": [
        {"from": "human", "value": f"<image>\n{VLM_COLOUR}"},
        {"from": "gpt", "value": spec.colour},
        {"from": "human", "value": VLM_SHAPE},
        {"from": "gpt", "value": spec.shape},
    ]}


def _unicot(row: int, s: SyntheticSettings, w: _Writer) -> Dict:
    rng = _rng("unicot", s, row)
    goal = _spec(rng, s.size)
    start = dataclasses.replace(goal, colour=_other(rng, COLOURS, goal.colour),
                                shape=_other(rng, SHAPES, goal.shape))
    middle = dataclasses.replace(start, colour=goal.colour)
    steps = [
        {"instruction": draw(start.colour, start.shape),
         "edit": f"{draw(start.colour, start.shape)} on white",
         "image": w.save(render_spec(start, s.size), row, "step0"),
         "summary": caption(start.colour, start.shape),
         "evaluation": chain_evaluation(goal, colour_right=False)},
        {"instruction": colour_instruction(start.shape, goal.colour),
         "edit": chain_edit("colour", start.colour, goal.colour),
         "image": w.save(render_spec(middle, s.size), row, "step1"),
         "summary": caption(middle.colour, middle.shape),
         "evaluation": chain_evaluation(goal, colour_right=True)},
        {"instruction": shape_instruction(middle.colour, middle.shape, goal.shape),
         "edit": chain_edit("shape", middle.shape, goal.shape),
         "image": w.save(render_spec(goal, s.size), row, "step2"),
         "summary": caption(goal.colour, goal.shape),
         "evaluation": DONE},
    ]
    return {"prompt": caption(goal.colour, goal.shape), "plan": chain_plan(start, goal), "steps": steps,
            "final": chain_final(goal)}


_BUILDERS: Dict[str, Callable[[int, SyntheticSettings, _Writer], Dict]] = {
    "t2i": _t2i, "edit": _edit, "interleaved": _interleaved, "vlm": _vlm, "unicot": _unicot,
}


def _marker(settings: SyntheticSettings) -> str:
    return json.dumps({"generator": "umm.data.synthetic", "version": 2, **dataclasses.asdict(settings)},
                      sort_keys=True)


def is_complete(out: str, settings: SyntheticSettings = SyntheticSettings()) -> bool:
    return read_marker(out) == json.loads(_marker(settings))


def generate(out: str, settings: SyntheticSettings = SyntheticSettings(), *, what: str = "the synthetic data dir",
             fix: str = NEW_DIR_FIX) -> bool:
    """Write the datasets under ``out``; returns False (and does nothing) if already complete. ``out``
    must be absent, empty or a set umm made (umm/data/outdir.py): nothing else is ever deleted; ``what``
    and ``fix`` word the error otherwise, as the caller names ``out``."""
    if is_complete(out, settings):
        return False
    check_writable(out, what, fix)
    tmp = temp_dir(out)
    for kind in KINDS:
        writer = _Writer(str(tmp), kind)
        count = getattr(settings, f"num_{kind}")
        with open(tmp / f"{kind}.jsonl", "w") as handle:
            for row in range(count):
                handle.write(json.dumps(_BUILDERS[kind](row, settings, writer)) + "\n")
    (tmp / MARKER).write_text(_marker(settings))
    if is_complete(out, settings):  # another process (rank) finished first: keep its copy
        shutil.rmtree(tmp)
        return False
    commit(tmp, out, what)
    return True
