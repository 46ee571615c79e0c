"""Build the tiny BAGEL model dir that tests and ``make train`` load (nothing is downloaded).

The dir has the upstream layout (llm/vit/bagel/ae configs, ``ema.safetensors``, ``ae.safetensors``)
plus a word-level ``tokenizer.json`` over the synthetic data's vocabulary and BAGEL's special
tokens. The Bagel is randomly initialised; the autoencoder is trained here on rendered shape
pictures until it reconstructs them (PSNR target), because a random AE would make every generated
sample noise. ``COMPLETE`` marks a finished dir; building into a complete dir does nothing.
"""
from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import shutil
import string
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, List, Optional, Union

import torch

from umm.config.schema import AEBuildConfig
from umm.data.shapes import COLOURS, SHAPES, render, to_tensor
from umm.errors import MissingFileError, UmmError
from umm.model.autoencoder import AutoEncoder, ae_params_from_dict

MARKER = "COMPLETE"
PathLike = Union[str, Path]

# Generic words for prompts people type at the tiny model, besides the synthetic data's own words.
_BASE_WORDS = """
a an the this that these those it its is are was be been not no yes and or but so then now first
next last of in on at to from into with without by for as than same other another each every all
some one two three four five six seven eight nine ten what which where how why who can could
should would will do does did make makes made turn change draw paint show shows generate create
keep put give see look think answer question image picture photo shape shapes colour color colours
colors background object thing left right top bottom middle center centre big small large little
round here there there's it's i you we they he she me my your our please thanks ok good bad right
wrong correct done yet again step plan reflect reflection check result final user assistant system
""".split()


class TinyModelError(UmmError, RuntimeError):
    """The tiny model dir could not be built as asked (e.g. the autoencoder missed its PSNR target)."""


def vocabulary() -> List[str]:
    """Every word the tiny tokenizer knows: generic words, the synthetic data's words, digits, punctuation."""
    from umm.data import synthetic, synthetic_irg

    words = _BASE_WORDS + list(COLOURS) + list(SHAPES) + synthetic.words() + synthetic_irg.words()
    words += list(string.digits) + list(string.punctuation)
    return list(dict.fromkeys(w.lower() for w in words))


@dataclass
class AETraining:
    """How the tiny autoencoder learns to reconstruct shape pictures (CPU, about two minutes).

    Small batches and many steps learn fastest per picture seen (measured: 1600 steps of 4 reach
    ~27 dB where 400 of 16 reach ~22 dB).
    """

    image_size: int = 64
    num_images: int = 2048
    num_val: int = 64
    batch_size: int = 4
    lr: float = 1e-3
    max_steps: int = 1600
    # Check PSNR every `eval_every` steps from `min_steps` on; stop once it reaches `target_psnr`.
    min_steps: int = 1000
    eval_every: int = 100
    target_psnr: float = 26.0
    # Below this after max_steps the build fails (the floor for useful samples).
    min_psnr: float = 25.0
    seed: int = 0
    # log-variance of the posterior, fixed after training so encode(sample=True) stays sharp.
    posterior_logvar: float = -12.0


def shape_images(n: int, size: int, seed: int) -> torch.Tensor:
    """``[n, 3, size, size]`` pictures cycling through every (colour, shape), random placement."""
    combos = list(itertools.product(COLOURS, SHAPES))
    return torch.stack([to_tensor(render(*combos[i % len(combos)], size, seed=seed + i)) for i in range(n)])


@torch.no_grad()
def psnr(ae: AutoEncoder, images: torch.Tensor, sample: bool = False) -> float:
    """Reconstruction PSNR in dB on the [0, 1] pixel scale."""
    rec = ae.decode(ae.encode(images, sample=sample)).clamp(-1, 1)
    mse = ((rec - images) / 2).pow(2).mean().item()
    return float("inf") if mse == 0 else -10.0 * math.log10(mse)


def train_autoencoder(
    params: AEBuildConfig, cfg: AETraining = AETraining(), log: Callable[[str], None] = print
) -> tuple[AutoEncoder, float]:
    """Train a FLUX AE of ``params`` on shape pictures; returns it (eval mode, frozen) and its val PSNR."""
    torch.manual_seed(cfg.seed)
    # A private copy: the latent scale/shift measured below must not leak into the caller's config.
    params = ae_params_from_dict({f.name: getattr(params, f.name) for f in fields(AEBuildConfig)})
    ae = AutoEncoder(params)
    train = shape_images(cfg.num_images, cfg.image_size, cfg.seed)
    val = shape_images(cfg.num_val, cfg.image_size, cfg.seed + 10**6)
    opt = torch.optim.Adam(ae.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.max_steps, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed)
    start, score, step = time.time(), float("-inf"), 0
    for step in range(1, cfg.max_steps + 1):
        x = train[torch.randint(0, len(train), (cfg.batch_size,), generator=g)]
        loss = (ae.decode(ae.encode(x, sample=False)) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % cfg.eval_every and step != cfg.max_steps:
            continue
        msg = f"autoencoder step {step}/{cfg.max_steps}: loss {loss.item():.4f}"
        if step >= cfg.min_steps:
            score = psnr(ae.eval(), val)
            ae.train()
            msg += f", val PSNR {score:.2f} dB"
        log(f"{msg} ({time.time() - start:.0f}s)")
        if score >= cfg.target_psnr:
            break
    _fix_posterior(ae, cfg.posterior_logvar)
    ae = ae.eval().requires_grad_(False)
    _normalise_latents(ae, train[: cfg.num_val * 4])
    score = psnr(ae, val, sample=True)
    if score < cfg.min_psnr:
        raise TinyModelError(
            f"tiny autoencoder reached only {score:.2f} dB PSNR after {step} steps (need {cfg.min_psnr}); "
            "raise AETraining.max_steps"
        )
    return ae, score


@torch.no_grad()
def _fix_posterior(ae: AutoEncoder, logvar: float) -> None:
    """Make the encoder's log-variance channels a constant, so posterior samples equal the mean
    up to exp(logvar / 2) (the AE was trained on means; upstream samples the posterior)."""
    conv = ae.encoder.conv_out
    z = ae.params.z_channels
    conv.weight[z:].zero_()
    conv.bias[z:].fill_(logvar)


@torch.no_grad()
def _normalise_latents(ae: AutoEncoder, images: torch.Tensor) -> None:
    """Set FLUX's shift/scale so the scaled latents of shape pictures have mean 0 and std 1, the
    scale the flow-matching noise N(0, 1) assumes (FLUX's own factors do the same for its AE)."""
    mean = ae.moments(images).chunk(2, dim=1)[0]
    ae.params.shift_factor = ae.shift_factor = round(mean.mean().item(), 4)
    ae.params.scale_factor = ae.scale_factor = round(1.0 / mean.std().item(), 4)


def build_tiny_model_dir(
    out: PathLike,
    model_cfg,
    *,
    ae_training: AETraining = AETraining(),
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """Write a complete tiny model dir at ``out`` from ``model_cfg`` (schema ``ModelConfig``).

    No-op when ``out/COMPLETE`` exists. Built in a temporary sibling dir and renamed when whole;
    concurrent builders of the same dir wait on a lock file and then find it complete.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / MARKER).is_file():
            log(f"tiny model dir {out} is complete; nothing to do")
            return out
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists without a {MARKER} marker; delete it and build again")
        return _build(out, model_cfg, ae_training, seed, log)


def _build(out: Path, model_cfg, ae_training: AETraining, seed: int, log: Callable[[str], None]) -> Path:
    from umm.model.config import dims_from_build_config
    from umm.model.io import build_bagel, save_model_dir
    from umm.model.tokenizer import build_word_level

    dims = dims_from_build_config(model_cfg)
    tok = build_word_level(vocabulary())
    if tok.get_vocab_size() > dims.llm.vocab_size:
        raise TinyModelError(
            f"tiny tokenizer has {tok.get_vocab_size()} tokens but model.llm.vocab_size is {dims.llm.vocab_size}; raise it"
        )
    ae, score = train_autoencoder(model_cfg.ae, ae_training, log)
    bagel = build_bagel(dims, seed=seed)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model_dir(bagel, tmp, ae=ae)
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "build_info.json").write_text(
        json.dumps({"ae_val_psnr_db": round(score, 2), "vocab_words": tok.get_vocab_size(), "seed": seed}, indent=2)
    )
    (tmp / MARKER).write_text("")
    if out.exists():
        out.rmdir()  # empty (checked under the lock)
    tmp.rename(out)
    log(f"tiny model dir written to {out} (autoencoder PSNR {score:.2f} dB)")
    return out


def tiny_model_config(overrides: Optional[dict] = None, yaml_path: Optional[PathLike] = None):
    """The schema ``ModelConfig`` with ``conf/model/tiny.yaml``'s values (the one place they live)."""
    from omegaconf import OmegaConf

    from umm.config.schema import ModelConfig

    path = Path(yaml_path) if yaml_path else Path(__file__).resolve().parents[2] / "conf" / "model" / "tiny.yaml"
    if not path.is_file():
        raise MissingFileError(f"tiny model preset {path} is missing")
    raw = OmegaConf.load(path)
    raw.pop("defaults", None)
    raw.pop("path", None)  # may interpolate other groups; the builder takes the target dir separately
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), raw, OmegaConf.create(overrides or {}))
    return cfg
