"""Sample images during and after training: a PNG grid of fixed prompts, and the colour/shape check.

The prompts are the synthetic set's captions ("a red circle"), spread over all colours and shapes.
Every rank runs the sampler in lockstep (a sharded model's forward is collective); rank 0 writes
``<run_dir>/samples/<tag>.png`` and, for the final samples, ``samples/final.json`` with the
fraction of images whose colour (and shape) the pixel classifier reads as the prompt's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from umm.data.shapes import COLOURS, SHAPES


def fixed_prompts(n: int) -> List[Tuple[str, str]]:
    """(colour, shape) pairs: colours cycle fastest, shapes shift each round, so any n covers both."""
    colours, shapes = list(COLOURS), list(SHAPES)
    out = []
    for i in range(n):
        rnd = i // len(colours)
        out.append((colours[i % len(colours)], shapes[(i + rnd) % len(shapes)]))
    return out


def write_samples(trainer, tag: str) -> Optional[dict]:
    from umm.data.shapes import classify
    from umm.data.synthetic import caption
    from umm.model.sampling import ImageGenConfig, Inferencer, save_png
    from umm.train.precision import autocast

    cfg, env = trainer.cfg, trainer.env
    n = cfg.train.num_sample_prompts
    if tag == "final":  # the check covers every colour x shape
        n = max(n, len(COLOURS) * len(SHAPES))
    pairs = fixed_prompts(n)
    size = int(cfg.data.vae_transform.max_size)
    gen_cfg = ImageGenConfig(num_timesteps=cfg.train.sample_steps, cfg_text_scale=cfg.train.cfg_text_scale,
                             timestep_shift=cfg.train.sample_timestep_shift)
    inferencer = Inferencer(trainer.bagel, trainer.ae, trainer.tokenizer.special, trainer.tokenizer)
    model = trainer.model
    was_training = model.training
    model.eval()
    sharded = env.distributed and hasattr(model, "unshard")
    if sharded:  # the sampler calls submodules directly: gather the root unit's weights first
        model.unshard()
    try:
        with torch.no_grad(), autocast(env.device, cfg.train.precision):
            images = [
                inferencer.text_to_image(caption(c, s), size, size, config=gen_cfg,
                                         generator=torch.Generator().manual_seed(cfg.train.seed + i))
                for i, (c, s) in enumerate(pairs)
            ]
    finally:
        if sharded:
            model.reshard()
        model.train(was_training)
    if not env.is_main:
        return None
    out_dir = Path(cfg.run_dir) / "samples"
    save_png(images[: max(cfg.train.num_sample_prompts, 1)], out_dir / f"{tag}.png")
    predicted = [classify(img) for img in images]
    colour_acc = sum(p[0] == c for p, (c, _) in zip(predicted, pairs)) / len(pairs)
    shape_acc = sum(p[1] == s for p, (_, s) in zip(predicted, pairs)) / len(pairs)
    result = {"step": trainer.step, "num_images": len(pairs), "colour_accuracy": colour_acc,
              "shape_accuracy": shape_acc, "sample_steps": cfg.train.sample_steps,
              "cfg_text_scale": cfg.train.cfg_text_scale,
              "images": [{"prompt": caption(c, s), "colour": p[0], "shape": p[1]} for (c, s), p in zip(pairs, predicted)]}
    (out_dir / f"{tag}.json").write_text(json.dumps(result, indent=1))
    trainer.logger.message(f"samples {tag}: colour accuracy {colour_acc:.2f}, shape accuracy {shape_acc:.2f} "
                           f"({len(pairs)} images, {out_dir / (tag + '.png')})")
    return {k: result[k] for k in ("colour_accuracy", "shape_accuracy", "num_images")}
