"""Two-turn IRG inference: think → first image → read it back → reflect → improved image.

    python scripts/irg_infer.py --run outputs/irg_tiny/stage2 --synthetic --out outputs/irg_tiny/infer
    python scripts/irg_infer.py --run outputs/irg_try1/stage2 --prompts "a red circle" "a blue square"
    python scripts/irg_infer.py --model-dir artifacts/models/tiny --checkpoint <ckpt dir> --prompts "a red circle"

``--run``: a stage's run dir; the model dir, image sizes and the newest complete checkpoint come
from it. Writes per prompt ``<n>_<prompt>.png`` (first | improved, side by side) and
``results.json`` (texts, and for the synthetic shape prompts the pixel classifier's reading of both
images and the prompt-match rate of each turn).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from pathlib import Path

import torch


def load(args):
    """(Inferencer, checkpoint used, VAE image size, ViT transform)."""
    from umm.config import load_resolved
    from umm.config.schema import ImageTransformConfig
    from umm.data.transforms import ImageTransform
    from umm.model.io import load_model_dir, materialize_from_file
    from umm.model.sampling import Inferencer
    from umm.train.checkpoint import latest_complete

    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if args.run:
        cfg = load_resolved(Path(args.run) / "resolved.yaml")
        model_dir = cfg.model.path
        if checkpoint is None:
            checkpoint = latest_complete(Path(args.run) / "checkpoints")
            if checkpoint is None:
                raise SystemExit(f"no complete checkpoint in {Path(args.run) / 'checkpoints'}")
        size, vit_cfg = cfg.data.vae_transform.max_size, cfg.data.vit_transform
    else:
        model_dir = args.model_dir
        size = args.size
        vit_cfg = ImageTransformConfig(stride=14, min_size=args.vit_size, max_size=args.vit_size)
    loaded = load_model_dir(model_dir, device=args.device)
    if checkpoint is not None:
        materialize_from_file(loaded.bagel, checkpoint / f"{args.weights}.safetensors", device=args.device,
                              dtype=torch.float32)
    loaded.bagel.eval()
    return Inferencer.from_loaded(loaded), checkpoint, size, ImageTransform(vit_cfg)


def settings_from(args):
    from umm.methods.irg import TwoTurnSettings

    s = TwoTurnSettings(max_text_tokens=args.max_text_tokens, temperature=args.temperature)
    s.first = dataclasses.replace(s.first, num_timesteps=args.steps, cfg_text_scale=args.cfg_text_1,
                                  timestep_shift=args.shift)
    s.second = dataclasses.replace(s.second, num_timesteps=args.steps, cfg_text_scale=args.cfg_text_2,
                                   cfg_img_scale=args.cfg_img_2, timestep_shift=args.shift)
    return s


def shape_prompt(prompt: str):
    """(colour, shape) when the prompt is a synthetic one ("a red circle"), else None."""
    from umm.data.shapes import COLOURS, SHAPES

    words = prompt.split()
    if len(words) == 3 and words[0] == "a" and words[1] in COLOURS and words[2] in SHAPES:
        return words[1], words[2]
    return None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a stage's run dir (resolved.yaml + checkpoints/)")
    src.add_argument("--model-dir", help="a BAGEL model dir (with --checkpoint: its configs, AE, tokenizer)")
    parser.add_argument("--checkpoint", help="checkpoint dir to load weights from (default: the run's newest)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompts", nargs="+")
    which.add_argument("--synthetic", action="store_true", help="every synthetic shape prompt")
    parser.add_argument("--out", help="output dir (default: <run>/irg_infer)")
    parser.add_argument("--size", type=int, default=64, help="image side without --run")
    parser.add_argument("--vit-size", type=int, default=56, help="ViT input side without --run")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps per image")
    parser.add_argument("--shift", type=float, default=3.0, help="timestep shift at inference")
    parser.add_argument("--cfg-text-1", type=float, default=4.0, help="turn 1 text guidance")
    parser.add_argument("--cfg-text-2", type=float, default=4.0, help="turn 2 text guidance")
    parser.add_argument("--cfg-img-2", type=float, default=2.0, help="turn 2 image guidance")
    parser.add_argument("--max-text-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-prompt", type=int, default=1, help="trajectories per prompt (seeds)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from umm.data.shapes import classify
    from umm.data.synthetic_irg import all_prompts, prompt_text
    from umm.methods.irg import two_turn
    from umm.model.sampling import save_png

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    inferencer, checkpoint, size, vit_transform = load(args)
    settings = settings_from(args)
    prompts = [prompt_text(c, s) for c, s in all_prompts()] if args.synthetic else args.prompts
    prompts = [p for p in prompts for _ in range(args.samples_per_prompt)]
    out = Path(args.out or Path(args.run or ".") / "irg_infer")
    out.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.time()
    for i, prompt in enumerate(prompts):
        gen = torch.Generator().manual_seed(args.seed + i)  # one seed per trajectory
        r = two_turn(inferencer, prompt, size=(size, size), vit_transform=vit_transform, settings=settings,
                     generator=gen)
        save_png([r.first, r.improved], out / f"{i:03d}_{re.sub(r'[^a-z0-9]+', '_', prompt.lower())}.png", nrow=2)
        row = {"prompt": prompt, "think": r.think, "reflection": r.reflection}
        target = shape_prompt(prompt)
        if target is not None:
            row["first_reads_as"], row["improved_reads_as"] = list(classify(r.first)), list(classify(r.improved))
            for turn in ("first", "improved"):
                read = tuple(row[f"{turn}_reads_as"])
                row[f"{turn}_matches"] = read == target
                row[f"{turn}_colour_matches"] = read[0] == target[0]
        rows.append(row)
        print(f"{prompt!r}: think {r.think!r}; reflection {r.reflection!r}"
              + (f"; first {row['first_reads_as']} improved {row['improved_reads_as']}" if target else ""))
    scored = [r for r in rows if "first_matches" in r]
    summary = {"checkpoint": str(checkpoint) if checkpoint else None, "weights": args.weights,
               "num_prompts": len(rows), "seconds": round(time.time() - start, 1),
               "settings": dataclasses.asdict(settings)}
    if scored:
        # Prompt match = the classifier reads both the colour and the shape of the prompt.
        summary["first_turn_match_rate"] = sum(r["first_matches"] for r in scored) / len(scored)
        summary["improved_match_rate"] = sum(r["improved_matches"] for r in scored) / len(scored)
        summary["first_turn_colour_rate"] = sum(r["first_colour_matches"] for r in scored) / len(scored)
        summary["improved_colour_rate"] = sum(r["improved_colour_matches"] for r in scored) / len(scored)
        print(f"prompt match (colour and shape): first turn {summary['first_turn_match_rate']:.2f}, improved "
              f"{summary['improved_match_rate']:.2f}; colour only: first turn {summary['first_turn_colour_rate']:.2f}, "
              f"improved {summary['improved_colour_rate']:.2f} ({len(scored)} trajectories)")
    (out / "results.json").write_text(json.dumps({"summary": summary, "prompts": rows}, indent=1))
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
