"""Small datasets in upstream's on-disk formats, written the way upstream's tools would (pyarrow,
tarfile, PIL), for tests that read or train on them. Texts use the tiny tokenizer's words."""
from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

COLOURS = [(220, 30, 30), (30, 160, 40), (40, 60, 220), (240, 200, 20), (150, 40, 180), (250, 130, 20)]
IRG_MODES = ("initial_thinking_understanding_learning", "initial_thinking_generation_learning",
             "initial_full_learning", "improving_thinking_understanding_learning",
             "improving_thinking_generation_learning", "improving_full_learning")


def png(i: int, size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, COLOURS[i % len(COLOURS)]).save(buf, format="PNG")
    return buf.getvalue()


def _parquet(path: Path, rows, row_group_size: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


def _conversation(i: int, mode: str):
    """One IRG row of ``mode``: a user prompt, then the assistant's parts with upstream's flags."""
    image = base64.b64encode(png(i)).decode()
    cond = {"type": "image", "content": image, "need_vae": True, "need_vit": True}
    target = {"type": "image", "content": image, "need_loss": True}
    think = {"type": "text", "content": "a red circle on white"}
    parts = {
        "initial_thinking_understanding_learning": [cond, {"type": "text", "content": "what to draw", "need_loss": False}, think],
        "initial_thinking_generation_learning": [think],
        "initial_full_learning": [think, target],
        "improving_thinking_understanding_learning": [cond, cond, {"type": "text", "content": "what should change",
                                                                   "need_loss": False}, think],
        "improving_thinking_generation_learning": [dict(think, need_loss=False), cond, think],
        "improving_full_learning": [dict(think, need_loss=False), cond, think, target],
    }[mode]
    return json.dumps([{"role": "user", "content": "draw a red circle"}, {"role": "assistant", "content": parts}])


def write_formats(root: Path, rows: int = 4) -> Path:
    """Every upstream layout under ``root`` (paths as the docs/DATA.md examples use them)."""
    root = Path(root)
    captions = [json.dumps({"short": "a red circle", "long": "a big red circle on white"}), json.dumps({"a": "a blue square"})]
    _parquet(root / "bagel/t2i/part-00000.parquet",
             [{"image": png(i), "captions": captions[i % 2]} for i in range(rows)])
    _parquet(root / "bagel/edit/part-00000.parquet",
             [{"image_list": [png(i), png(i + 1), png(i + 2)],
               "instruction_list": [["make the circle blue", "turn it blue"], ["make it a square"]]} for i in range(rows)])
    (root / "llava/images").mkdir(parents=True, exist_ok=True)
    with open(root / "llava/vlm.jsonl", "w") as f:
        for i in range(rows):
            (root / f"llava/images/{i}.png").write_bytes(png(i))
            f.write(json.dumps({"id": str(i), "image": f"{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nwhat colour is the shape"},
                {"from": "gpt", "value": "red"}]}) + "\n")
    (root / "reca/shards").mkdir(parents=True, exist_ok=True)
    for shard in range(2):
        with tarfile.open(root / f"reca/shards/data_{shard:06d}.tar", "w") as tar:
            for i in range(rows):
                for name, payload in ((f"{i:06d}.png", png(i + shard)), (f"{i:06d}.json", b'{"caption": "ignored"}')):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    (root / "reca/folder/more").mkdir(parents=True, exist_ok=True)
    for i in range(rows):
        (root / f"reca/folder/{'more/' if i % 2 else ''}{i}.png").write_bytes(png(i))
    _parquet(root / "reca/pictures.parquet", [{"image": {"bytes": png(i), "path": f"{i}.png"}} for i in range(rows)])
    for mode in IRG_MODES:
        _parquet(root / f"irg/{mode}/part-00000.parquet", [{"conversation": _conversation(i, mode)} for i in range(rows)])
    texts = {"system_prompt": "you draw shapes", "prompt": "a blue square", "think": "first a circle then a square"}
    _parquet(root / "unicot/mdp_t2i/part-00000.parquet", [dict(texts, image=png(i)) for i in range(rows)])
    _parquet(root / "unicot/mdp_edit/part-00000.parquet",
             [dict(texts, source_image=png(i), edit_instruction="make it a square", target_image=png(i + 1))
              for i in range(rows)])
    _parquet(root / "unicot/mdp_geo/part-00000.parquet",
             [{"instruction_list": ["draw a square", "the square is blue"], "image_list": [png(i), png(i + 1), png(i + 2)],
               "task_type": f"step-{i % 4 + 1}"} for i in range(rows)])
    (root / "unicot/vlm_think/images").mkdir(parents=True, exist_ok=True)
    with open(root / "unicot/vlm_think/think.jsonl", "w") as f:
        for i in range(rows):
            (root / f"unicot/vlm_think/images/{i}.png").write_bytes(png(i))
            f.write(json.dumps({"image": f"{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nis the square blue"},
                {"from": "think", "value": "<think>the shape is red</think>"},
                {"from": "gpt", "value": "no"}]}) + "\n")
    return root
