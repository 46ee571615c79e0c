"""Sample during and after training: a grid of the run's samples, and on the synthetic shapes the
colour/shape check.

The samples are ``train.sample_prompts`` (umm/train/sample_prompts.py; by default rows of the run's
own datasets): text-to-image prompts are generated, edit pairs edited, VLM questions answered.
Every rank runs the sampler in lockstep (a sharded model's forward is collective); rank 0 writes
``<run_dir>/samples/<tag>.png`` (each sample with its text, umm/train/sample_grid.py) and
``<tag>.json`` (each sample's kind, text, source and answer), and logs the grid to TensorBoard.
When the data is umm's synthetic shapes (its ``COMPLETE`` marker under ``data.root``), the final
samples add the check: every colour x shape caption is generated and ``final.json`` gets the
fraction whose colour (and shape) the pixel classifier reads as the prompt's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from umm.data.outdir import read_marker
from umm.data.shapes import COLOURS, SHAPES
from umm.train.sample_prompts import SampleSpec

ANSWER_TOKENS = 32  # a VLM sample's answer is cut here


def fixed_prompts(n: int) -> List[Tuple[str, str]]:
    """(colour, shape) pairs: colours cycle fastest, shapes shift each round, so any n covers both."""
    colours, shapes = list(COLOURS), list(SHAPES)
    out = []
    for i in range(n):
        rnd = i // len(colours)
        out.append((colours[i % len(colours)], shapes[(i + rnd) % len(shapes)]))
    return out


def is_shapes_data(root: str) -> bool:
    """Whether ``root`` holds umm's synthetic shapes (umm/data/synthetic.py's marker)."""
    return (read_marker(root) or {}).get("generator") == "umm.data.synthetic"


class _Sampler:
    """The model in eval mode with the run's image sizes and sampler settings."""

    def __init__(self, trainer):
        from umm.data.transforms import ImageTransform
        from umm.model.sampling import ImageGenConfig, Inferencer

        cfg = trainer.cfg
        self.cfg, self.trainer = cfg, trainer
        self.size = int(cfg.data.vae_transform.max_size)
        self.vae = ImageTransform(cfg.data.vae_transform)
        self.vit = ImageTransform(cfg.data.vit_transform)
        shift = cfg.train.sample_timestep_shift
        self.t2i_cfg = ImageGenConfig(num_timesteps=cfg.train.sample_steps, cfg_text_scale=cfg.train.cfg_text_scale,
                                      timestep_shift=shift)
        # Edits keep the sampler's upstream image-guidance defaults, with the run's steps and text scale.
        self.edit_cfg = ImageGenConfig(num_timesteps=cfg.train.sample_steps, cfg_text_scale=cfg.train.cfg_text_scale,
                                       cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel",
                                       timestep_shift=shift)
        self.inferencer = Inferencer(trainer.bagel, trainer.ae, trainer.tokenizer.special, trainer.tokenizer)

    def generator(self, i: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.train.seed + i)

    def run(self, spec: SampleSpec, i: int) -> Tuple[Optional[torch.Tensor], Optional[str]]:
        """(generated image [3, H, W] in [-1, 1], answer text) of one spec."""
        inf = self.inferencer
        if spec.kind == "t2i":
            return inf.text_to_image(spec.text, self.size, self.size, config=self.t2i_cfg,
                                     generator=self.generator(i)), None
        if spec.kind == "edit":
            device = inf.device
            image = self.vae(spec.image).to(device)
            return inf.edit_image(image, spec.text, vit_image=self.vit(spec.image).to(device), config=self.edit_cfg,
                                  generator=self.generator(i)), None
        ids = inf.answer(self.vit(spec.image).to(inf.device), spec.text, max_new_tokens=ANSWER_TOKENS)
        return None, self.trainer.tokenizer.decode(ids)


def _in_eval(trainer, fn):
    """``fn()`` with the model in eval mode, sharded weights gathered, no grad, the run's precision, and
    the compiled blocks run eagerly: sampling's no-grad, KV-cached and one-token calls would each
    compile new graphs (4 recompiles on the slice through the app, BENCHMARKS.md), minutes of compiling
    at the first samples of a cold start, for a few forwards."""
    from umm.train.precision import autocast

    cfg, env, model = trainer.cfg, trainer.env, trainer.model
    was_training = model.training
    model.eval()
    sharded = env.distributed and hasattr(model, "unshard")
    if sharded:  # the sampler calls submodules directly: gather the root unit's weights first
        model.unshard()
    try:
        with torch.no_grad(), autocast(env.device, cfg.train.precision), torch.compiler.set_stance("force_eager"):
            return fn()
    finally:
        if sharded:
            model.reshard()
        model.train(was_training)


def _cell(spec: SampleSpec, image: Optional[torch.Tensor], answer: Optional[str]):
    from umm.data.shapes import to_image
    from umm.train.sample_grid import Cell

    images = ([spec.image] if spec.image is not None else []) + ([to_image(image)] if image is not None else [])
    label = {"t2i": "prompt", "edit": "edit", "vlm": "Q"}[spec.kind]
    lines = [f"{label}: {spec.text}"] + ([f"A: {answer}"] if answer is not None else [])
    return Cell(images, lines)


def _shape_check(sampler: _Sampler, n: int) -> dict:
    from umm.data.shapes import classify
    from umm.data.synthetic import caption

    pairs = fixed_prompts(n)
    images = [sampler.run(SampleSpec("t2i", caption(c, s), "shapes check"), i)[0] for i, (c, s) in enumerate(pairs)]
    predicted = [classify(img) for img in images]
    return {
        "num_images": len(pairs),
        "colour_accuracy": sum(p[0] == c for p, (c, _) in zip(predicted, pairs)) / len(pairs),
        "shape_accuracy": sum(p[1] == s for p, (_, s) in zip(predicted, pairs)) / len(pairs),
        "checked": [{"prompt": caption(c, s), "colour": p[0], "shape": p[1]} for (c, s), p in zip(pairs, predicted)],
    }


def write_samples(trainer, tag: str) -> Optional[dict]:
    from umm.train.sample_grid import render

    cfg, env = trainer.cfg, trainer.env
    specs = trainer.sample_specs
    check = tag == "final" and is_shapes_data(cfg.data.root)
    if not specs and not check:
        return None
    sampler = _Sampler(trainer)

    def sample():
        outputs = [sampler.run(spec, i) for i, spec in enumerate(specs)]
        # The check covers every colour x shape.
        return outputs, (_shape_check(sampler, max(len(specs), len(COLOURS) * len(SHAPES))) if check else None)

    outputs, scores = _in_eval(trainer, sample)
    if not env.is_main:
        return None
    out_dir = Path(cfg.run_dir) / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"step": trainer.step, "sample_steps": cfg.train.sample_steps, "cfg_text_scale": cfg.train.cfg_text_scale,
              "samples": [{"kind": s.kind, "text": s.text, "source": s.source, **({"answer": a} if a is not None else {})}
                          for s, (_, a) in zip(specs, outputs)]}
    message = f"samples {tag}: {len(specs)} in {out_dir / (tag + '.png')}" if specs else f"samples {tag}:"
    if specs:
        grid = render([_cell(s, im, a) for s, (im, a) in zip(specs, outputs)], sampler.size)
        grid.save(out_dir / f"{tag}.png", format="PNG")
        trainer.logger.image("samples", grid, trainer.step)
    if scores is not None:
        result.update(scores)
        message += (f"; synthetic shapes: colour accuracy {scores['colour_accuracy']:.2f}, shape accuracy "
                    f"{scores['shape_accuracy']:.2f} ({scores['num_images']} images)")
    (out_dir / f"{tag}.json").write_text(json.dumps(result, indent=1))
    trainer.logger.message(message)
    return {k: scores[k] for k in ("colour_accuracy", "shape_accuracy", "num_images")} if scores else None
