"""Cheap checks that a checkpoint's safetensors files are whole, before anything loads them.

A COMPLETE marker says umm wrote every file; it cannot say a file stayed whole afterwards (a partial
copy, another tool filling the disk): each file's header is checked against its size
(umm/train/safetensors_file.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple

from umm.train.checkpoint import CheckpointError, complete_checkpoints, read_meta
from umm.train.safetensors_file import safetensors_problem
from umm.train.sharded_state import shard_file

# Files a consolidated checkpoint has besides its ranks' shards (ema.safetensors unless its run kept no
# EMA; none in one of only shards: meta.json's "consolidated" false); the rest (adapters) are checked
# when present.
REQUIRED = ("model.safetensors", "ema.safetensors")


def _rank_shards(ckpt: Path) -> Tuple[List[Path], List[Tuple[Path, str]]]:
    """The shard file of every rank that wrote the checkpoint (state/meta.json names how many)."""
    meta = ckpt / "state" / "meta.json"
    try:
        info = json.loads(meta.read_text())
        world_size = int(info["world_size"])
    except FileNotFoundError:
        return [], [(meta, "it is missing")]
    except (OSError, ValueError, TypeError, KeyError):
        return [], [(meta, "it is not JSON with a world_size")]
    if "format" not in info:  # written before the sharded state; the resume says so
        return [], []
    return [ckpt / "state" / shard_file(rank) for rank in range(world_size)], []


def _meta(ckpt: Path) -> dict:
    try:
        return read_meta(ckpt)
    except CheckpointError:  # meta.json itself is checked by _rank_shards
        return {}


def damaged_files(ckpt: Path) -> List[Tuple[Path, str]]:
    """[(file, problem)] for the checkpoint's safetensors files that are not whole (and its meta.json)."""
    ckpt = Path(ckpt)
    shards, damaged = _rank_shards(ckpt)
    meta = _meta(ckpt)
    required = [name for name in REQUIRED if meta.get("consolidated", True)
                and (meta.get("ema", True) or name != "ema.safetensors")]
    files = sorted({ckpt / name for name in required} | set(shards) | set(ckpt.rglob("*.safetensors")))
    found = [(f, safetensors_problem(f)) for f in files]
    return damaged + [(f, problem) for f, problem in found if problem is not None]


def describe(damaged: List[Tuple[Path, str]]) -> str:
    return "; ".join(f"{f} is damaged: {problem}" for f, problem in damaged)


def newest_intact(checkpoints_dir: Path) -> Tuple[Optional[Path], List[Tuple[Path, List[Tuple[Path, str]]]]]:
    """The newest complete checkpoint whose files are whole, and the newer damaged ones skipped
    [(checkpoint, its damaged files)]. Only damaged ones there: a CheckpointError naming them."""
    skipped = []
    for ckpt in reversed(complete_checkpoints(Path(checkpoints_dir))):
        damaged = damaged_files(ckpt)
        if not damaged:
            return ckpt, skipped
        skipped.append((ckpt, damaged))
    if skipped:
        raise CheckpointError(
            f"cannot resume: {describe([d for _, ds in skipped for d in ds])}; there is no older complete "
            f"checkpoint in {Path(checkpoints_dir)}. Restore the file, or move the checkpoint away to start over"
        )
    return None, skipped


def skipped_warning(chosen: Optional[Path], skipped) -> str:
    """The loud line a resume past damaged checkpoints logs."""
    names = ", ".join(str(c) for c, _ in skipped)
    return (f"WARNING: damaged checkpoint {names} skipped ({describe([d for _, ds in skipped for d in ds])}); "
            f"resuming from the previous complete checkpoint {chosen}")


def check_loadable(path: Path, what: str) -> None:
    """One file about to be loaded (``what`` names the setting that chose it)."""
    problem = safetensors_problem(Path(path))
    if problem is not None:
        raise CheckpointError(f"{what}: {path} is damaged: {problem}; point it at a whole checkpoint")
