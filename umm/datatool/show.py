"""``umm data show -n N --out x.png``: the first N samples of the data stream, drawn as they are packed.

The samples are those the stream of a single-process run yields first (same mix draws, token-budget
batches, cfg dropout and plans as training: umm/data/loader.py), each panel titled with its batch,
dataset, file:line and token count (umm/datatool/render.py draws them).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from umm.config.schema import RootConfig
from umm.data.budget import Sample
from umm.data.plan import TextItem
from umm.datatool.build import DataToolError, Parts
from umm.datatool.render import ImagePiece, Panel, TextPiece, render, to_pixels


def first_samples(parts: Parts, n: int) -> List[Tuple[int, Sample]]:
    """(batch number, sample) of the first ``n`` samples, in the order they are packed."""
    stream = parts.plan_stream()
    shown: List[Tuple[int, Sample]] = []
    while len(shown) < n:
        batch = stream.next_batch()
        shown += [(stream.batches, sample) for sample in batch]
    return shown[:n]


def panel(parts: Parts, batch: int, sample: Sample) -> Panel:
    pieces = []
    for item in sample.plan.items:
        dropped = bool(item.enable_cfg and item.cfg_dropped)
        if isinstance(item, TextItem):
            text = parts.tokenizer.decode(item.ids, skip_special_tokens=False)  # unknown words stay visible
            pieces.append(TextPiece(text, item.loss, item.enable_cfg, dropped))
        else:
            pieces.append(ImagePiece(to_pixels(item.image), item.role, item.enable_cfg, dropped))
    return Panel(f"batch {batch} | {sample.plan.source} | {sample.num_tokens} tokens", pieces)


def run_show(cfg: RootConfig, n: int, out: str) -> int:
    parts = Parts(cfg)
    samples = first_samples(parts, n)
    image = render([panel(parts, batch, sample) for batch, sample in samples])
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG")
    except OSError as exc:
        raise DataToolError(f"cannot write {path} ({exc.strerror or exc}); pass another --out") from None
    print(f"umm data show: {len(samples)} samples of data {cfg.data.name} (batches 1-{samples[-1][0]}) drawn to "
          f"{path} ({image.width}x{image.height})")
    return 0
