"""Measure that a large parquet of images streams with flat memory through umm's loader.

Writes a BAGEL-style text-to-image parquet (an ``image`` column of JPEG bytes, ``captions`` a JSON
string; ``--rows`` rows in row groups of ``--row-group`` rows), then reads it through the real batch
stream (umm/data/loader.py: reader, row order, decode, transforms, SFT plan, packing) and prints the
process's RSS and peak RSS after 1k, 5k and every further 5k rows. A reader that held the file would
grow by the file's size; a streaming one stays flat after the first row groups.

    python scripts/measure_streaming.py [--rows 10000] [--size 256] [--out /tmp/umm_stream]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def write_parquet(path: str, rows: int, size: int, row_group: int) -> None:
    """Noisy JPEGs (so they do not compress to nothing), written one row group at a time."""
    rng = np.random.default_rng(0)
    captions = [json.dumps({"short": "a red circle"}), json.dumps({"short": "a blue square", "long": "a big blue square"})]
    schema = pa.schema([("image", pa.binary()), ("captions", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, row_group):
            images, texts = [], []
            for i in range(start, min(rows, start + row_group)):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
                images.append(buf.getvalue())
                texts.append(captions[i % 2])
            writer.write_table(pa.table({"image": images, "captions": texts}, schema=schema), row_group_size=row_group)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=256, help="image side in px")
    ap.add_argument("--row-group", type=int, default=100)
    ap.add_argument("--out", default="/tmp/umm_stream")
    args = ap.parse_args()

    from umm.config.schema import DataConfig, DatasetConfig, ImageTransformConfig, MethodConfig, RootConfig
    from umm.data.loader import build_loader
    from umm.data.packing import PackGeometry
    from umm.data.synthetic import words
    from umm.methods import get_recipe
    from umm.model.tokenizer import build_word_level, from_backend
    from umm.train.save_metrics import process_peak_gib, resident_gib

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "t2i.parquet")
    if not os.path.isfile(path) or pq.read_metadata(path).num_rows != args.rows:
        t = time.time()
        write_parquet(path, args.rows, args.size, args.row_group)
        print(f"wrote {path}: {args.rows} rows, {os.path.getsize(path) / 2**20:.1f} MiB in {time.time() - t:.0f} s")
    print(f"parquet: {os.path.getsize(path) / 2**20:.1f} MiB, {pq.read_metadata(path).num_row_groups} row groups")

    cfg = RootConfig()
    cfg.data = DataConfig(
        name="stream", root=args.out, datasets={"t2i": DatasetConfig(kind="t2i", path="t2i.parquet")},
        expected_num_tokens=1024, max_num_tokens=1152, max_num_tokens_per_sample=512, prefer_buffer_before=768,
        max_buffer_size=8, vae_transform=ImageTransformConfig(stride=16, min_size=64, max_size=64),
        vit_transform=ImageTransformConfig(stride=14, min_size=56, max_size=56))
    cfg.method = MethodConfig(name="sft", recipe="sft")
    geometry = PackGeometry(vit_patch_size=14, vit_max_num_patch_per_side=4, latent_downsample=16, max_latent_size=8)
    tokenizer = from_backend(build_word_level(words()))
    stream = build_loader(cfg, get_recipe(cfg.method), tokenizer, tokenizer.special, geometry=geometry)

    print(f"{'rows':>6} {'batches':>7} {'rss MiB':>8} {'peak MiB':>8} {'s':>5}")
    print(f"{0:>6} {0:>7} {resident_gib() * 1024:>8.0f} {process_peak_gib() * 1024:>8.0f} {0:>5}")
    marks = [1000] + list(range(5000, args.rows + 1, 5000))
    batches, start = 0, time.time()
    try:
        while marks:
            next(stream)
            batches += 1
            rows = stream.skip_stats()["data/rows_read"]
            if rows >= marks[0]:
                print(f"{rows:>6} {batches:>7} {resident_gib() * 1024:>8.0f} {process_peak_gib() * 1024:>8.0f} {time.time() - start:>5.0f}")
                marks = [m for m in marks if m > rows]
    finally:
        stream.close()


if __name__ == "__main__":
    main()
