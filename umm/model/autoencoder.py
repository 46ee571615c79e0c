"""FLUX autoencoder (the "ae" BAGEL uses), with FLUX's module and state-dict names.

``ae.safetensors`` holds unprefixed ``encoder.*`` / ``decoder.*`` keys; the module tree below
reproduces them exactly (reference/bagel.md §2). Latents are scaled as FLUX does:
``encode`` returns ``scale * (z - shift)`` and ``decode`` undoes it before the decoder.
Pixels are in [-1, 1].
"""
from __future__ import annotations

from dataclasses import fields
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from umm.config.schema import AEBuildConfig
from umm.errors import UmmError

# FLUX hard-codes 32 groups, so every width must be a multiple of 32.
_GROUPS = 32


class AEConfigError(UmmError, ValueError):
    """An ae_config.json (or AE build config) that cannot describe a FLUX autoencoder."""


def downsample_of(p: AEBuildConfig) -> int:
    return 2 ** (len(p.ch_mult) - 1)


def validate_ae_params(p: AEBuildConfig, *, source: str = "ae config") -> AEBuildConfig:
    widths = [p.ch * m for m in p.ch_mult]
    if any(w % _GROUPS for w in widths):
        raise AEConfigError(
            f"{source}: autoencoder widths ch*ch_mult = {widths} must all be multiples of {_GROUPS} "
            f"(FLUX's GroupNorm groups); change ch or ch_mult"
        )
    return p


def ae_params_from_dict(d: dict, *, source: str = "ae config") -> AEBuildConfig:
    """FLUX ``AutoEncoderParams`` as stored in ``ae_config.json`` (plus a derived ``downsample``)."""
    names = {f.name for f in fields(AEBuildConfig)}
    extra = set(d) - names - {"downsample"}
    if extra:
        raise AEConfigError(f"{source}: unknown keys {sorted(extra)}; allowed: {sorted(names)}")
    p = AEBuildConfig(**{k: (list(v) if k == "ch_mult" else v) for k, v in d.items() if k in names})
    if "downsample" in d and d["downsample"] != downsample_of(p):
        raise AEConfigError(
            f"{source}: downsample {d['downsample']} disagrees with ch_mult {p.ch_mult} "
            f"(which gives {downsample_of(p)}); fix one of them"
        )
    return validate_ae_params(p, source=source)


def ae_params_to_dict(p: AEBuildConfig) -> dict:
    """The ``ae_config.json`` content for these params."""
    d = {f.name: getattr(p, f.name) for f in fields(AEBuildConfig)}
    d["ch_mult"] = list(p.ch_mult)
    d["downsample"] = downsample_of(p)
    return d


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_GROUPS, channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (mid block only)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (m(hn).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric padding (right/bottom only), as FLUX does.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: ``block`` list plus an optional ``downsample``/``upsample``."""

    def __init__(self, blocks: List[ResnetBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class Encoder(nn.Module):
    def __init__(self, p: AEBuildConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = p.ch
        for level, mult in enumerate(p.ch_mult):
            blocks = []
            for _ in range(p.num_res_blocks):
                blocks.append(ResnetBlock(block_in, p.ch * mult))
                block_in = p.ch * mult
            stage = _Level(blocks)
            if level != len(p.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = _Mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: AEBuildConfig):
        super().__init__()
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in)
        # Built from the deepest level up, stored so that up[0] is the full-resolution level.
        ups: List[_Level] = []
        for level in reversed(range(len(p.ch_mult))):
            blocks = []
            for _ in range(p.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, p.ch * p.ch_mult[level]))
                block_in = p.ch * p.ch_mult[level]
            stage = _Level(blocks)
            if level != 0:
                stage.upsample = Upsample(block_in)
            ups.insert(0, stage)
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, params: AEBuildConfig):
        super().__init__()
        self.params = validate_ae_params(params)
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor

    @property
    def downsample(self) -> int:
        return downsample_of(self.params)

    @property
    def z_channels(self) -> int:
        return self.params.z_channels

    def moments(self, images: Tensor) -> Tensor:
        """Encoder output: posterior mean and log-variance stacked on channels."""
        return self.encoder(images)

    def encode(
        self,
        images: Tensor,
        sample: bool = True,
        eps: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Scaled latent of images in [-1, 1], ``[B, 3, H, W] -> [B, z, H/8, W/8]``.

        ``sample=True`` draws from the posterior as upstream does in training and inference;
        ``eps`` supplies that N(0, 1) draw (reference vectors), else ``generator`` is used.
        """
        mean, logvar = self.moments(images).chunk(2, dim=1)
        z = mean
        if sample:
            if eps is None:
                # Drawn where the generator lives (the samplers' is on the CPU, so a seed draws the same
                # noise on any device), then moved.
                where = generator.device if generator is not None else mean.device
                eps = torch.randn(mean.shape, generator=generator, device=where, dtype=mean.dtype).to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * eps
        return self.scale_factor * (z - self.shift_factor)

    def decode(self, latent: Tensor) -> Tensor:
        """Images in roughly [-1, 1] from a scaled latent."""
        return self.decoder(latent / self.scale_factor + self.shift_factor)

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(self.encode(images, sample=False))


def patchify_latent(latent: Tensor, patch: int = 2) -> Tensor:
    """``[z, p*h, p*w] -> [h*w, p*p*z]``: row-major tokens, features in (p, q, c) order."""
    c, H, W = latent.shape
    h, w = H // patch, W // patch
    x = latent[:, : h * patch, : w * patch].reshape(c, h, patch, w, patch)
    return x.permute(1, 3, 2, 4, 0).reshape(h * w, patch * patch * c)


def unpatchify_latent(tokens: Tensor, h: int, w: int, patch: int = 2) -> Tensor:
    """Inverse of :func:`patchify_latent`: ``[h*w, p*p*z] -> [z, p*h, p*w]``."""
    c = tokens.shape[-1] // (patch * patch)
    x = tokens.reshape(h, w, patch, patch, c)
    return x.permute(4, 0, 2, 1, 3).reshape(c, h * patch, w * patch)
