"""Cheap checks that a checkpoint's safetensors files are whole, before anything loads them.

A COMPLETE marker says umm wrote every file; it cannot say a file stayed whole afterwards (a partial
copy, another tool filling the disk). A safetensors file is an 8-byte header length, a JSON header
and the tensor bytes; the header's largest data offset fixes the file's exact size. Reading the
header and comparing sizes costs a few kilobytes per file and catches truncation, which loading
would report only as a raw ``SafetensorError``.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import List, Optional, Tuple

from umm.train.checkpoint import CheckpointError, complete_checkpoints, read_meta
from umm.train.sharded_state import shard_file

# Files every checkpoint has besides its ranks' shards (ema.safetensors unless its run kept no EMA);
# the rest (adapters) are checked when present.
REQUIRED = ("model.safetensors", "ema.safetensors")
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def safetensors_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a whole safetensors file, or None when it is."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"it has {size} bytes, less than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                return f"it has {size} bytes, its header alone claims {8 + n}"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return "it is missing"
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    except (ValueError, UnicodeDecodeError):
        return "its header is not valid JSON"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError, AttributeError):
        return "its header lists no valid data offsets"
    if 8 + n + end != size:
        return f"it has {size} bytes, its header needs {8 + n + end} (truncated or partly copied)"
    return None


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


def _kept_ema(ckpt: Path) -> bool:
    try:
        return bool(read_meta(ckpt).get("ema", True))
    except CheckpointError:  # meta.json itself is checked by _rank_shards
        return True


def damaged_files(ckpt: Path) -> List[Tuple[Path, str]]:
    """[(file, problem)] for the checkpoint's safetensors files that are not whole (and its meta.json)."""
    ckpt = Path(ckpt)
    shards, damaged = _rank_shards(ckpt)
    kept_ema = _kept_ema(ckpt)
    required = [name for name in REQUIRED if kept_ema or name != "ema.safetensors"]
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
