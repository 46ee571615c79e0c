"""Synthetic IRG trajectories for the tiny model: prompt → think → first image → reflection → improved image.

Each trajectory asks for one shape in one colour. The first image is close but wrong in one detail
(the colour or the shape; same place and size), the reflection names that detail and restates the
prompt, and the improved image is the first one with the detail fixed. The manifest is the ``irg``
kind of ``umm.data.datasets`` (the interleaved format with the five parts in trajectory order); the
IRG recipe decides per learning mode which parts carry loss, so the row's own flags describe only
the full trajectory.

Layout under ``out``: ``trajectories.jsonl``, ``images/<index>_first.png``, ``images/<index>_improved.png``
and ``COMPLETE`` (JSON of the generator settings; a complete dir with the same settings is reused).
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Dict, List, Tuple

from umm.data.outdir import MARKER, NEW_DIR_FIX, check_writable, commit, read_marker, temp_dir
from umm.data.shapes import COLOURS, SHAPES, random_spec, render_spec

MANIFEST = "trajectories.jsonl"
ERROR_KINDS = ("colour", "shape")


def prompt_text(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def think_text(colour: str, shape: str) -> str:
    return f"draw a {colour} {shape} on white"


def reflection_text(colour: str, shape: str, wrong: str, error: str) -> str:
    """Names what is wrong in the first image and restates the goal."""
    if error == "colour":
        return f"the {shape} is {wrong} not {colour} so draw a {colour} {shape}"
    return f"the {colour} shape is a {wrong} not a {shape} so draw a {colour} {shape}"


def all_prompts() -> List[Tuple[str, str]]:
    """Every (colour, shape) the generator asks for; the evaluation prompts of scripts/irg_infer.py."""
    return [(c, s) for c in COLOURS for s in SHAPES]


def words() -> List[str]:
    """Every word the IRG texts use (the tiny tokenizer's vocabulary must hold them)."""
    texts = [think_text(c, s) for c, s in all_prompts()]
    texts += [reflection_text(c, s, w, "colour") for c, s in all_prompts() for w in COLOURS]
    texts += [reflection_text(c, s, w, "shape") for c, s in all_prompts() for w in SHAPES]
    return sorted({w for t in texts for w in t.split()})


def trajectory(index: int, size: int, seed: int) -> Dict:
    """One trajectory: texts, the two images (PIL) and what was wrong; a pure function of its args."""
    rng = random.Random(f"irg/{seed}/{index}")
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    spec = random_spec(colour, shape, size, rng)
    error = rng.choice(ERROR_KINDS)
    if error == "colour":
        wrong = rng.choice([c for c in COLOURS if c != colour])
        first = dataclasses.replace(spec, colour=wrong)
    else:
        wrong = rng.choice([s for s in SHAPES if s != shape])
        first = dataclasses.replace(spec, shape=wrong)
    return {
        "colour": colour,
        "shape": shape,
        "error": error,
        "wrong": wrong,
        "prompt": prompt_text(colour, shape),
        "think": think_text(colour, shape),
        "reflection": reflection_text(colour, shape, wrong, error),
        "first": render_spec(first, size),
        "improved": render_spec(spec, size),
    }


def row(traj: Dict, first_path: str, improved_path: str) -> Dict:
    """The manifest row: the five parts in order, flagged as the full trajectory."""
    return {
        "parts": [
            {"type": "text", "text": traj["prompt"]},
            {"type": "text", "text": traj["think"], "loss": True},
            {"type": "image", "image": first_path, "vae": True, "vit": True},
            {"type": "text", "text": traj["reflection"], "loss": True},
            {"type": "image", "image": improved_path, "loss": True, "vae": False, "vit": False},
        ],
        "error": traj["error"],
    }


def write_irg_dataset(out, *, num: int = 512, size: int = 64, seed: int = 0, what: str = "the synthetic IRG data dir",
                      fix: str = NEW_DIR_FIX) -> Path:
    """Write ``num`` trajectories under ``out`` (no-op when a complete set with these settings exists).
    ``out`` must be absent, empty or a set umm made (umm/data/outdir.py): nothing else is ever deleted;
    ``what`` and ``fix`` word the error otherwise, as the caller names ``out``."""
    out = Path(out)
    settings = {"generator": "umm.data.synthetic_irg", "num": num, "size": size, "seed": seed}
    if read_marker(out) == settings:
        return out
    check_writable(out, what, fix)
    tmp = temp_dir(out)
    (tmp / "images").mkdir()
    lines = []
    for i in range(num):
        traj = trajectory(i, size, seed)
        first, improved = f"images/{i:05d}_first.png", f"images/{i:05d}_improved.png"
        traj["first"].save(tmp / first)
        traj["improved"].save(tmp / improved)
        lines.append(json.dumps(row(traj, first, improved)))
    (tmp / MANIFEST).write_text("\n".join(lines) + "\n")
    (tmp / MARKER).write_text(json.dumps(settings))
    commit(tmp, out, what)
    return out
