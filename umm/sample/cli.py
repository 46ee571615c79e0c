"""``umm sample <run dir | checkpoint | model dir> --mode t2i|edit|understand|think --prompt TEXT [...]``

Modes, as upstream's inferencer runs them (reference/bagel.md §7):
- ``t2i``: an image from the prompt;
- ``edit``: ``--image`` (VAE latent + ViT) then the instruction, an image of the input's size;
- ``understand``: ``--image`` (ViT, optional) then the question, a decoded answer;
- ``think``: BAGEL's think mode: a system prompt, (``--image``,) the prompt, a planning text
  decoded first, then the image after it.
Writes ``<out>/<mode>-seed<seed>.png`` (image modes) and ``.json`` (prompt, knobs, seed, texts,
paths). The same seed gives the same image on the same device.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from umm.errors import UmmError, one_line

# Upstream's think-mode system prompts (inferencer.py): the text the model was trained to see.
GEN_THINK_SYSTEM_PROMPT = ("You should first think about the planning process in the mind and then generate the image. \n"
                           "The planning process is enclosed within <think> </think> tags, i.e. "
                           "<think> planning process here </think> image here")

# Guidance per mode when not given: upstream's T2I (GenEval script: image scale 1) and edit settings.
MODE_DEFAULTS = {
    "t2i": dict(cfg_img_scale=1.0, cfg_interval=(0.4, 1.0), cfg_renorm_type="global"),
    "think": dict(cfg_img_scale=1.0, cfg_interval=(0.4, 1.0), cfg_renorm_type="global"),
    "edit": dict(cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel"),
}


class SampleError(UmmError, ValueError):
    pass


def _transforms(source, inferencer):
    """(VAE transform, ViT transform): the run's data transforms, else the model's largest sizes."""
    from umm.config.schema import ImageTransformConfig
    from umm.data.transforms import ImageTransform

    cfg = getattr(source.run_cfg, "data", None)
    if cfg is not None:
        return ImageTransform(cfg.vae_transform), ImageTransform(cfg.vit_transform)
    b, v = inferencer.dims.bagel, inferencer.dims.vit
    vae_max = min(1024, b.max_latent_size * b.latent_downsample)
    vit_max = min(980, b.vit_max_num_patch_per_side * v.patch_size)
    return (ImageTransform(ImageTransformConfig(stride=b.latent_downsample, min_size=min(512, vae_max), max_size=vae_max)),
            ImageTransform(ImageTransformConfig(stride=v.patch_size, min_size=min(224, vit_max), max_size=vit_max)))


def _gen_config(args):
    from umm.model.sampling import ImageGenConfig

    knobs = dict(MODE_DEFAULTS[args.mode])
    for name in ("cfg_img_scale", "cfg_interval", "cfg_renorm_type"):
        if getattr(args, name) is not None:
            knobs[name] = tuple(getattr(args, name)) if name == "cfg_interval" else getattr(args, name)
    return ImageGenConfig(num_timesteps=args.num_timesteps, timestep_shift=args.timestep_shift,
                          cfg_text_scale=args.cfg_text_scale, cfg_renorm_min=args.cfg_renorm_min, **knobs).validate()


def _think(inf, prompt, vae_img, vit_img, height, width, config, args, generator):
    """Upstream's think mode for generation: the system prompt opens the conditional and the
    image-unconditional contexts; the text-unconditional one is taken just before the prompt."""
    ctx = inf.add_text(inf.new_context(), GEN_THINK_SYSTEM_PROMPT)
    cfg_img_ctx = inf.add_text(inf.new_context(), GEN_THINK_SYSTEM_PROMPT)
    if vae_img is not None:
        inf.add_image(ctx, vae_img, vit_image=vit_img, generator=generator)
    cfg_text_ctx = ctx.clone()
    inf.add_text(ctx, prompt)
    inf.add_text(cfg_img_ctx, prompt)
    think = inf.generate_text(ctx, args.max_new_tokens, temperature=args.temperature, generator=generator)
    inf.add_text(ctx, think)
    image = inf.generate_image(ctx, height, width, cfg_text_ctx=cfg_text_ctx, cfg_img_ctx=cfg_img_ctx,
                               config=config, generator=generator)
    return image, think


def _free_stem(out: Path, stem: str) -> str:
    n, found = 1, stem
    while (out / f"{found}.json").exists() or (out / f"{found}.png").exists():
        n += 1
        found = f"{stem}-{n}"
    return found


def sample(args) -> dict:
    from umm.data.images import ImageDecodeError, decode_image
    from umm.export.source import resolve
    from umm.model.sampling import save_png
    from umm.sample.place import load_inferencer

    if args.mode in ("edit",) and not args.image:
        raise SampleError("--mode edit needs --image (the picture to edit)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device != "cpu" else "fp32")]
    source = resolve(args.source, args.model_dir)
    inf, dmap = load_inferencer(source, args.weights, device=device, device_map=args.device_map, dtype=dtype)
    vae_tf, vit_tf = _transforms(source, inf)
    vae_img = vit_img = None
    if args.image:
        try:
            with open(args.image, "rb") as handle:
                picture = decode_image(handle, f"--image {args.image}")
        except OSError as e:  # missing, a folder, no permission
            raise SampleError(f"cannot read --image {args.image}: {e}") from None
        except ImageDecodeError as e:
            raise SampleError(e.message) from None
        vae_img, vit_img = vae_tf(picture), vit_tf(picture)
    height, width = (vae_img.shape[1:] if vae_img is not None else (vae_tf.cfg.max_size,) * 2)
    if args.mode != "edit":  # an edit keeps the input's size
        height, width = args.height or height, args.width or width
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    record = {"mode": args.mode, "prompt": args.prompt, "image_in": args.image, "seed": args.seed,
              "source": str(source.checkpoint or source.model_dir), "model_dir": str(source.model_dir),
              "weights": args.weights, "dtype": str(dtype).removeprefix("torch."),
              "device_map": {k: str(v) for k, v in dmap.items()}}
    image = text = None
    with torch.inference_mode():
        if args.mode == "understand":
            ids = inf.answer(vit_img, args.prompt, args.max_new_tokens, temperature=args.temperature, generator=generator)
            text = inf.tokenizer.decode(ids)
            record.update(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        else:
            config = _gen_config(args)
            record.update(height=height, width=width, **{k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in dataclasses.asdict(config).items()})
            if args.mode == "t2i":
                image = inf.text_to_image(args.prompt, height, width, config=config, generator=generator)
            elif args.mode == "edit":
                image = inf.edit_image(vae_img, args.prompt, vit_image=vit_img, config=config, generator=generator)
            else:
                image, ids = _think(inf, args.prompt, vae_img, vit_img, height, width, config, args, generator)
                text = inf.tokenizer.decode(ids)
                record.update(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = _free_stem(out, f"{args.mode}-seed{args.seed}")
    if image is not None:
        record["image"] = str(save_png(image, out / f"{stem}.png"))
    if text is not None:
        record["text"] = text
    record["json"] = str(out / f"{stem}.json")
    Path(record["json"]).write_text(json.dumps(record, indent=1))
    return record


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="umm sample", description="Sample images and answers (see umm/sample/cli.py).")
    p.add_argument("source", help="a run dir (its newest complete checkpoint), a checkpoint dir, or a model dir")
    p.add_argument("--mode", choices=("t2i", "edit", "understand", "think"), required=True)
    p.add_argument("--prompt", required=True, help="the prompt, edit instruction or question")
    p.add_argument("--image", help="input picture (edit: required; understand, think: optional)")
    p.add_argument("--out", default="samples", help="output dir (default: ./samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="a run's EMA or raw weights")
    p.add_argument("--model-dir", help="configs, autoencoder and tokenizer (default: the run's model.path)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when there is one)")
    p.add_argument("--device-map", choices=("auto",), help="spread the model over the GPUs (and host memory) with accelerate")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--height", type=int, help="image height (default: the input image's, else the largest)")
    p.add_argument("--width", type=int)
    g = p.add_argument_group("image sampling (upstream's knobs)")
    g.add_argument("--num-timesteps", type=int, default=50)
    g.add_argument("--timestep-shift", type=float, default=3.0)
    g.add_argument("--cfg-text-scale", type=float, default=4.0)
    g.add_argument("--cfg-img-scale", type=float, help="default: 1.0 (t2i, think), 2.0 (edit)")
    g.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"), help="default: 0.4 1.0, edit 0.0 1.0")
    g.add_argument("--cfg-renorm-min", type=float, default=0.0)
    g.add_argument("--cfg-renorm-type", choices=("global", "channel", "text_channel"),
                   help="default: global, edit text_channel")
    t = p.add_argument_group("text decoding (understand, think)")
    t.add_argument("--max-new-tokens", type=int, default=256)
    t.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    return p


def main(argv=None) -> int:
    from umm.model.sampling import SamplingError

    args = parser().parse_args(argv)
    try:
        record = sample(args)
    except (UmmError, SamplingError, OSError) as e:
        print(f"umm sample: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"umm sample: wrote {record.get('image') or record['json']}" + (f"; text: {record['text']!r}" if "text" in record else ""))
    return 0
