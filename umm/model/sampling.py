"""Inference with a KV cache: Euler flow sampling with upstream's CFG rules, and text decoding.

A ``Context`` is one conversation so far: the per-layer keys/values of its tokens and the next RoPE
position (upstream's ``past_key_values`` / ``kv_lens`` / ``ropes``, reference/bagel.md §7). Adding
a text, ViT image or VAE image runs that segment once against the cache and appends it:

- text: ``<|im_start|> ids <|im_end|>``, causal, RoPE r..r+n-1, then r+n;
- ViT image: ``<|vision_start|> patches <|vision_end|>``, bidirectional, all at RoPE r, then r+1;
- VAE image (clean, t = 0): markers through the understanding expert, latents through the
  generation expert, all at RoPE r, then r+1. An input image for editing adds VAE then ViT.

Generating an image denoises the query segment ``<|vision_start|> latents <|vision_end|>`` at the
context's RoPE with ``num_timesteps - 1`` Euler steps over the shifted schedule; every step attends
the cache without changing it. Guidance, as upstream's ``_forward_flow``: inside ``cfg_interval``
and only when ``cfg_text_scale > 1``, ``v_txt = u_txt + s_txt (c - u_txt)``, then (if
``cfg_img_scale > 1``) ``v = u_img + s_img (v_txt - u_img)``, then renorm (``global`` / ``channel``
on v, ``text_channel`` on v_txt). The text-unconditional branch is the context without the latest
text (T2I: the empty context); the image-unconditional branch holds the texts only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from umm.data.packing import SpecialTokens, grid_position_ids, patchify
from umm.model.attention import CachedAttention, KVCache
from umm.model.autoencoder import AutoEncoder, patchify_latent, unpatchify_latent
from umm.model.bagel import Bagel

RENORM_TYPES = ("global", "channel", "text_channel")


class SamplingError(ValueError):
    """Bad inference input: image size, guidance settings, missing tokenizer."""


@dataclass
class Context:
    """KV cache of everything added so far and the RoPE position of the next segment."""

    cache: KVCache
    rope: int = 0

    @property
    def length(self) -> int:
        return self.cache.length

    def clone(self) -> "Context":
        """An independent copy (CFG branches); cached tensors are shared, never modified in place."""
        return Context(self.cache.clone(), self.rope)


@dataclass
class ImageGenConfig:
    """Upstream's ``generate_image`` knobs (defaults: its T2I app; edits use img 2.0, [0, 1], text_channel)."""

    num_timesteps: int = 50
    timestep_shift: float = 3.0
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: Tuple[float, float] = (0.4, 1.0)
    cfg_renorm_min: float = 0.0
    cfg_renorm_type: str = "global"

    def validate(self) -> "ImageGenConfig":
        if self.num_timesteps < 2:
            raise SamplingError(f"num_timesteps must be at least 2 (one Euler step), got {self.num_timesteps}")
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise SamplingError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {self.cfg_renorm_type!r}")
        return self


def timestep_schedule(num_timesteps: int, shift: float) -> Tensor:
    """``linspace(1, 0, n)`` bent by the shift: t' = s t / (1 + (s - 1) t)."""
    t = torch.linspace(1.0, 0.0, num_timesteps)
    return shift * t / (1 + (shift - 1) * t)


def guide(
    c: Tensor,
    u_txt: Optional[Tensor],
    u_img: Optional[Tensor],
    text_scale: float,
    img_scale: float,
    renorm_type: str = "global",
    renorm_min: float = 0.0,
) -> Tensor:
    """Combine conditional and unconditional velocities ``[N, D]`` as upstream (see module doc)."""
    if text_scale <= 1.0:
        return c
    v_txt = u_txt + text_scale * (c - u_txt)
    if renorm_type == "text_channel":
        scale = (c.norm(dim=-1, keepdim=True) / (v_txt.norm(dim=-1, keepdim=True) + 1e-8)).clamp(renorm_min, 1.0)
        v_txt = v_txt * scale
        return u_img + img_scale * (v_txt - u_img) if img_scale > 1.0 else v_txt
    v = u_img + img_scale * (v_txt - u_img) if img_scale > 1.0 else v_txt
    if renorm_type == "global":
        scale = c.norm() / (v.norm() + 1e-8)
    else:  # channel
        scale = c.norm(dim=-1, keepdim=True) / (v.norm(dim=-1, keepdim=True) + 1e-8)
    return v * scale.clamp(renorm_min, 1.0)


class Inferencer:
    """Contexts, image generation and text decoding for one ``Bagel`` (+ autoencoder, tokenizer)."""

    def __init__(self, bagel: Bagel, ae: Optional[AutoEncoder], special: SpecialTokens, tokenizer=None):
        self.bagel, self.ae, self.special, self.tokenizer = bagel, ae, special, tokenizer
        self.dims = bagel.dims

    @classmethod
    def from_loaded(cls, loaded) -> "Inferencer":
        """From ``umm.model.io.load_model_dir``'s ``LoadedModel``."""
        return cls(loaded.bagel, loaded.ae, loaded.tokenizer.special, loaded.tokenizer)

    # ---- plumbing ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.bagel.language_model.model.embed_tokens.weight.device

    def _long(self, xs) -> Tensor:
        return torch.as_tensor(xs, dtype=torch.long, device=self.device)

    def _embed_ids(self, ids: Sequence[int]) -> Tensor:
        return self.bagel.language_model.model.embed_tokens(self._long(list(ids)))

    def _framed(self, rows: Tensor) -> Tensor:
        """``<|vision_start|> rows <|vision_end|>`` in the LLM's dtype (position tables are fp32)."""
        marks = self._embed_ids([self.special.vision_start, self.special.vision_end])
        return torch.cat([marks[:1], rows.to(marks.dtype), marks[1:]])

    def new_context(self) -> Context:
        return Context(KVCache(self.dims.llm.num_hidden_layers))

    def _run(self, ctx: Context, seq: Tensor, positions: Tensor, gen_rows: Tensor, *, causal: bool, update: bool) -> Tensor:
        """One segment against ``ctx``'s cache; returns final-normed hidden states [n, H]."""
        n = seq.shape[0]
        is_gen = torch.zeros(n, dtype=torch.bool, device=self.device)
        is_gen[gen_rows] = True
        und = (~is_gen).nonzero().squeeze(1)
        attend = CachedAttention(ctx.cache, causal=causal, update=update)
        return self.bagel.llm_forward(seq, positions, und, gen_rows, attend)

    def _check_image(self, image: Tensor, stride: int, max_side: int, what: str) -> Tuple[int, int]:
        if image.dim() != 3 or image.shape[0] != 3:
            raise SamplingError(f"{what} image must be [3, H, W] in [-1, 1], got {tuple(image.shape)}")
        return self._grid(image.shape[1], image.shape[2], stride, max_side, what)

    @staticmethod
    def _grid(h: int, w: int, stride: int, max_side: int, what: str) -> Tuple[int, int]:
        """Token grid (rows, cols) of an h x w image, or an error naming the allowed sizes."""
        if h % stride or w % stride or h // stride > max_side or w // stride > max_side:
            raise SamplingError(
                f"{what} image {h}x{w} must have sides that are multiples of {stride} and at most "
                f"{stride * max_side} px; resize it first"
            )
        return h // stride, w // stride

    # ---- context updates ----------------------------------------------------------------------

    def _ids(self, text: Union[str, Sequence[int]]) -> List[int]:
        if isinstance(text, str):
            if self.tokenizer is None:
                raise SamplingError("this Inferencer has no tokenizer: pass token ids instead of a string")
            return list(self.tokenizer.encode(text))
        return [int(i) for i in text]

    @torch.no_grad()
    def add_text(self, ctx: Context, text: Union[str, Sequence[int]]) -> Context:
        ids = [self.special.bos] + self._ids(text) + [self.special.eos]
        n = len(ids)
        self._run(ctx, self._embed_ids(ids), self._long(list(range(ctx.rope, ctx.rope + n))), self._long([]),
                  causal=True, update=True)
        ctx.rope += n
        return ctx

    @torch.no_grad()
    def add_vit_image(self, ctx: Context, image: Tensor) -> Context:
        p = self.dims.vit.patch_size
        side = self.dims.bagel.vit_max_num_patch_per_side
        rows, cols = self._check_image(image, p, side, "ViT")
        patches = patchify(image.float(), p).to(self.device)
        emb = self.bagel.embed_vit(patches, grid_position_ids(rows, cols, side).to(self.device), [rows * cols])
        seq = self._framed(emb["vit_token_embeds"])
        n = seq.shape[0]
        self._run(ctx, seq, self._long([ctx.rope] * n), self._long([]), causal=False, update=True)
        ctx.rope += 1
        return ctx

    def _latent_segment(self, tokens: Tensor, t: float, rows: int, cols: int, rope: int):
        """Embeddings, positions and gen rows of ``<|vision_start|> latents <|vision_end|>``."""
        pos = grid_position_ids(rows, cols, self.dims.bagel.max_latent_size).to(self.device)
        lat = self.bagel.embed_latents(tokens, torch.full((tokens.shape[0],), t, device=self.device), pos)
        seq = self._framed(lat["vae_token_embeds"])
        n = seq.shape[0]
        return seq, self._long([rope] * n), self._long(list(range(1, n - 1)))

    @torch.no_grad()
    def add_vae_image(self, ctx: Context, image: Tensor, generator: Optional[torch.Generator] = None) -> Context:
        """A clean latent condition; the posterior is sampled as upstream does (``generator``)."""
        if self.ae is None:
            raise SamplingError("adding a VAE image needs the autoencoder (load the model dir with with_ae=True)")
        rows, cols = self._check_image(image, self.dims.bagel.latent_downsample, self.dims.bagel.max_latent_size, "VAE")
        ae_dtype = next(self.ae.parameters()).dtype
        latent = self.ae.encode(image[None].to(self.device, ae_dtype), generator=generator)[0]
        tokens = patchify_latent(latent.float(), self.dims.bagel.latent_patch_size)
        seq, pos, gen = self._latent_segment(tokens, 0.0, rows, cols, ctx.rope)
        self._run(ctx, seq, pos, gen, causal=False, update=True)
        ctx.rope += 1
        return ctx

    def add_image(self, ctx: Context, image: Tensor, *, vae: bool = True, vit: bool = True,
                  vit_image: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Context:
        """An input image as upstream adds it for editing: VAE latent, then ViT patches.

        ``vit_image``: the same picture at the ViT's size (default: ``image`` itself).
        """
        if vae:
            self.add_vae_image(ctx, image, generator)
        if vit:
            self.add_vit_image(ctx, image if vit_image is None else vit_image)
        return ctx

    # ---- image generation ---------------------------------------------------------------------

    @torch.no_grad()
    def velocity(self, ctx: Context, x_t: Tensor, t: float, rows: int, cols: int) -> Tensor:
        """Predicted velocity [rows*cols, D] of latent tokens ``x_t`` at time ``t`` after ``ctx``."""
        seq, pos, gen = self._latent_segment(x_t, t, rows, cols, ctx.rope)
        h = self._run(ctx, seq, pos, gen, causal=False, update=False)
        return self.bagel.llm2vae(h[1:-1]).float()

    @torch.no_grad()
    def generate_latent(
        self,
        ctx: Context,
        height: int,
        width: int,
        *,
        cfg_text_ctx: Optional[Context] = None,
        cfg_img_ctx: Optional[Context] = None,
        config: ImageGenConfig = ImageGenConfig(),
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Denoised latent tokens [h*w, D] of a ``height`` x ``width`` image after ``ctx``."""
        config.validate()
        bc = self.dims.bagel
        rows, cols = self._grid(height, width, bc.latent_downsample, bc.max_latent_size, "generated")
        if config.cfg_text_scale > 1.0 and cfg_text_ctx is None:
            raise SamplingError("cfg_text_scale > 1 needs cfg_text_ctx (the context without the latest text)")
        if config.cfg_text_scale > 1.0 and config.cfg_img_scale > 1.0 and cfg_img_ctx is None:
            raise SamplingError("cfg_img_scale > 1 needs cfg_img_ctx (the context with the texts only)")
        x = torch.randn(rows * cols, bc.latent_token_dim, generator=generator).to(self.device)
        ts = timestep_schedule(config.num_timesteps, config.timestep_shift).tolist()
        lo, hi = config.cfg_interval
        for t, t_next in zip(ts[:-1], ts[1:]):
            text_scale, img_scale = (config.cfg_text_scale, config.cfg_img_scale) if lo < t <= hi else (1.0, 1.0)
            c = self.velocity(ctx, x, t, rows, cols)
            u_txt = u_img = None
            if text_scale > 1.0:
                u_txt = self.velocity(cfg_text_ctx, x, t, rows, cols)
                if img_scale > 1.0:
                    # T2I passes the generation context itself: same content, same velocity.
                    u_img = c if cfg_img_ctx is ctx else self.velocity(cfg_img_ctx, x, t, rows, cols)
            v = guide(c, u_txt, u_img, text_scale, img_scale, config.cfg_renorm_type, config.cfg_renorm_min)
            x = x - v * (t - t_next)
        return x

    @torch.no_grad()
    def decode_latent(self, tokens: Tensor, height: int, width: int) -> Tensor:
        """Latent tokens -> image [3, H, W] in [-1, 1]."""
        if self.ae is None:
            raise SamplingError("decoding an image needs the autoencoder (load the model dir with with_ae=True)")
        bc = self.dims.bagel
        latent = unpatchify_latent(tokens, height // bc.latent_downsample, width // bc.latent_downsample, bc.latent_patch_size)
        ae_dtype = next(self.ae.parameters()).dtype
        return self.ae.decode(latent[None].to(ae_dtype))[0].float().clamp(-1, 1)

    def generate_image(self, ctx: Context, height: int, width: int, **kwargs) -> Tensor:
        """``generate_latent`` then decode: an image [3, H, W] in [-1, 1]."""
        return self.decode_latent(self.generate_latent(ctx, height, width, **kwargs), height, width)

    def text_to_image(
        self,
        prompt: Union[str, Sequence[int]],
        height: int,
        width: int,
        *,
        config: ImageGenConfig = ImageGenConfig(),
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Upstream T2I: uncond-text branch = empty context; uncond-image branch = the prompt context."""
        ctx = self.add_text(self.new_context(), prompt)
        return self.generate_image(ctx, height, width, cfg_text_ctx=self.new_context(), cfg_img_ctx=ctx,
                                   config=config, generator=generator)

    def edit_image(
        self,
        image: Tensor,
        instruction: Union[str, Sequence[int]],
        *,
        vit_image: Optional[Tensor] = None,
        config: ImageGenConfig = ImageGenConfig(cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel"),
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Upstream edit: image (VAE + ViT) then instruction; output at the input's size."""
        ctx = self.add_image(self.new_context(), image, vit_image=vit_image, generator=generator)
        cfg_text_ctx = ctx.clone()
        self.add_text(ctx, instruction)
        cfg_img_ctx = self.add_text(self.new_context(), instruction)
        h, w = image.shape[1:]
        return self.generate_image(ctx, h, w, cfg_text_ctx=cfg_text_ctx, cfg_img_ctx=cfg_img_ctx,
                                   config=config, generator=generator)

    # ---- text decoding ------------------------------------------------------------------------

    @torch.no_grad()
    def generate_text(
        self,
        ctx: Context,
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        generator: Optional[torch.Generator] = None,
        use_cache: bool = True,
    ) -> List[int]:
        """Token ids after ``ctx``: starts from ``<|im_start|>`` at the context's RoPE, stops at
        ``<|im_end|>`` (not returned). Greedy at temperature 0, else sampled from softmax(logits / T).

        ``use_cache=False`` re-runs all generated tokens every step (slow; checks the cached path).
        ``ctx`` is not changed; add the answer with ``add_text`` to continue the conversation.
        """
        lm = self.bagel.language_model
        work = ctx.clone()
        tokens = [self.special.bos]
        out: List[int] = []
        for _ in range(max_new_tokens):
            if use_cache:
                h = self._run(work, self._embed_ids(tokens[-1:]), self._long([ctx.rope + len(tokens) - 1]),
                              self._long([]), causal=True, update=True)
            else:
                h = self._run(ctx, self._embed_ids(tokens), self._long(list(range(ctx.rope, ctx.rope + len(tokens)))),
                              self._long([]), causal=True, update=False)
            logits = lm.lm_head(h[-1]).float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = int(torch.multinomial(probs.cpu(), 1, generator=generator))
            else:
                nxt = int(logits.argmax())
            if nxt == self.special.eos:
                break
            out.append(nxt)
            tokens.append(nxt)
        return out

    def answer(self, image: Optional[Tensor], question: Union[str, Sequence[int]], max_new_tokens: int = 64,
               **kwargs) -> List[int]:
        """Understanding: ViT image (if any), the question, then decoded answer ids."""
        ctx = self.new_context()
        if image is not None:
            self.add_vit_image(ctx, image)
        self.add_text(ctx, question)
        return self.generate_text(ctx, max_new_tokens, **kwargs)


# ---- PNG output ---------------------------------------------------------------------------------


def make_grid(images: Sequence[Tensor], nrow: Optional[int] = None, pad: int = 2) -> Tensor:
    """Images [3, H, W] in [-1, 1] (same size) tiled row-major on a white canvas."""
    if not images:
        raise SamplingError("make_grid got no images")
    c, h, w = images[0].shape
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i, im in enumerate(images):
        r, q = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, y : y + h, x : x + w] = im.detach().float().cpu()
    return grid


def save_png(image: Union[Tensor, Sequence[Tensor]], path: Union[str, Path], nrow: Optional[int] = None) -> Path:
    """Write one image [3, H, W] in [-1, 1], or a grid of several, as PNG (parent dirs created)."""
    from umm.data.shapes import to_image

    tensor = make_grid(list(image), nrow) if not isinstance(image, Tensor) or image.dim() == 4 else image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_image(tensor).save(path, format="PNG")
    return path
