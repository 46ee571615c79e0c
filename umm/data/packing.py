"""Pack sequence plans into one NaViT-style sequence by upstream BAGEL's rules (reference/bagel.md §3.2-3.5).

Per plan item:
- text: ``<|im_start|> ids <|im_end|>``, causal split, consecutive RoPE ids; CE on ``<|im_start|>`` and
  the ids (labels ids + ``<|im_end|>``) when ``loss``; a cfg-dropped text leaves no trace (RoPE unchanged).
- vit image: ``<|vision_start|>`` patches ``<|vision_end|>``, full split, one RoPE id, RoPE += 1
  (also when cfg-dropped).
- vae image: ``<|vision_start|>`` latent tokens ``<|vision_end|>``, one RoPE id; noised target
  (``loss``): ``noise`` split, one timestep logit, RoPE not advanced; clean condition: ``full``
  split, logit -inf, RoPE += 1 (also when cfg-dropped).
RoPE restarts at 0 per sample. Besides upstream's tensors the batch carries the routing indexes
the model needs (und / gen token sets, CE and MSE rows within them), so the forward never has to
derive index sets on the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import List, Optional, Sequence, Tuple

import torch

from umm.data.plan import ImageItem, SamplePlan, TextItem
from umm.data.transfer import to_device
from umm.errors import UmmError

IMAGE_ROLES = ("vit", "vae_clean", "vae_noised")


class PackingError(UmmError, ValueError):
    """A sample plan cannot be packed (names the sample source and the item)."""


@dataclass(frozen=True)
class SpecialTokens:
    """The four ids BAGEL frames texts and images with."""

    bos: int  # <|im_start|>
    eos: int  # <|im_end|>
    vision_start: int  # <|vision_start|>
    vision_end: int  # <|vision_end|>


@dataclass(frozen=True)
class PackGeometry:
    vit_patch_size: int = 14
    vit_max_num_patch_per_side: int = 70
    # Pixels per latent token side: AE downsample (8) x latent patch (2).
    latent_downsample: int = 16
    max_latent_size: int = 64

    @classmethod
    def from_dims(cls, dims) -> "PackGeometry":
        """From ``umm.model.config.ModelDims``."""
        return cls(
            vit_patch_size=dims.vit.patch_size,
            vit_max_num_patch_per_side=dims.bagel.vit_max_num_patch_per_side,
            latent_downsample=dims.bagel.latent_downsample,
            max_latent_size=dims.bagel.max_latent_size,
        )


@dataclass(frozen=True)
class CfgDropout:
    """Drop probabilities for plan items with ``enable_cfg`` (upstream training defaults)."""

    text: float = 0.1
    vit: float = 0.3
    vae: float = 0.3


NO_DROPOUT = CfgDropout(0.0, 0.0, 0.0)


@dataclass
class PackedBatch:
    """One packed sequence. Tensors are upstream's (reference/bagel.md §3.5) plus routing indexes.

    Host-side lists (lengths, modes, shapes) stay Python lists so building masks needs no device sync.
    """

    sequence_length: int
    sample_lens: List[int]
    split_lens: List[int]
    attn_modes: List[str]
    packed_text_ids: torch.Tensor
    packed_text_indexes: torch.Tensor
    packed_position_ids: torch.Tensor
    packed_vit_tokens: torch.Tensor  # [Nv, p*p*3], (kh, kw, c)
    packed_vit_position_ids: torch.Tensor
    packed_vit_token_indexes: torch.Tensor
    vit_token_seqlens: List[int]
    padded_images: Optional[torch.Tensor]  # [n_vae, 3, Hmax, Wmax] or None
    vae_latent_shapes: List[Tuple[int, int]]
    packed_latent_position_ids: torch.Tensor
    packed_vae_token_indexes: torch.Tensor
    packed_timesteps: torch.Tensor  # timestep logits per latent token; -inf for clean images
    mse_loss_indexes: torch.Tensor
    ce_loss_indexes: torch.Tensor
    packed_label_ids: torch.Tensor
    ce_loss_weights: torch.Tensor
    # Routing: und = text + ViT tokens (sorted), gen = all latent tokens (= packed_vae_token_indexes).
    und_token_indexes: torch.Tensor
    ce_und_rows: torch.Tensor  # row of each CE position within und_token_indexes
    mse_latent_rows: torch.Tensor  # row of each noised token within the latent tokens
    sources: List[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.sequence_length

    @property
    def num_und(self) -> int:
        return self.und_token_indexes.numel()

    @property
    def num_gen(self) -> int:
        return self.packed_vae_token_indexes.numel()

    def to(self, device) -> "PackedBatch":
        """The tensors on ``device`` (from the host without waiting for the GPU: :func:`to_device`)."""
        return self._map(lambda t: to_device(t, device))

    def pin_memory(self) -> "PackedBatch":
        """The tensors in page-locked memory: what a DataLoader with ``pin_memory=True`` calls in its
        pinning thread, so the training step's upload does not pin (copy) the images itself."""
        return self._map(lambda t: t if t.is_pinned() else t.pin_memory())

    def _map(self, fn) -> "PackedBatch":
        """A copy with ``fn`` applied to every tensor field."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return PackedBatch(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})


def patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """[C, H, W] -> [(H/p)*(W/p), p*p*C], patches row-major, features (kh, kw, c)."""
    c, h, w = image.shape
    x = image.reshape(c, h // patch, patch, w // patch, patch)
    return x.permute(1, 3, 2, 4, 0).reshape((h // patch) * (w // patch), patch * patch * c)


def grid_position_ids(rows: int, cols: int, max_per_side: int) -> torch.Tensor:
    """Flattened ids row * max_per_side + col of a rows x cols grid (upstream's extrapolate mode)."""
    r = torch.arange(rows)[:, None] * max_per_side
    return (r + torch.arange(cols)[None]).reshape(-1)


class _Packer:
    def __init__(self, special: SpecialTokens, geometry: PackGeometry, generator, cfg_dropout: CfgDropout):
        self.special, self.geo, self.gen, self.drop = special, geometry, generator, cfg_dropout
        self.curr = 0
        self.text_ids: List[int] = []
        self.text_idx: List[int] = []
        self.pos: List[int] = []
        self.vit_tokens: List[torch.Tensor] = []
        self.vit_pos: List[torch.Tensor] = []
        self.vit_idx: List[int] = []
        self.vit_lens: List[int] = []
        self.vae_images: List[torch.Tensor] = []
        self.vae_shapes: List[Tuple[int, int]] = []
        self.lat_pos: List[torch.Tensor] = []
        self.vae_idx: List[int] = []
        self.timesteps: List[float] = []
        self.mse_idx: List[int] = []
        self.ce_idx: List[int] = []
        self.labels: List[int] = []
        self.ce_w: List[float] = []
        self.split_lens: List[int] = []
        self.attn_modes: List[str] = []
        self.sample_lens: List[int] = []
        self.sources: List[str] = []

    def _rand(self) -> float:
        return float(torch.rand((), generator=self.gen))

    def _dropped(self, item, prob: float) -> bool:
        if item.cfg_dropped is not None:  # decided by the data loader
            return bool(item.enable_cfg) and item.cfg_dropped
        return bool(item.enable_cfg) and prob > 0 and self._rand() < prob

    def _marker(self, token: int) -> None:
        self.text_ids.append(token)
        self.text_idx.append(self.curr)
        self.curr += 1

    def _special_loss(self, item) -> None:
        """Loss on the closing marker just placed at curr - 1."""
        if item.special_token_loss:
            if item.special_token_label is None:
                raise PackingError("special_token_loss is set but special_token_label is None")
            self.ce_idx.append(self.curr - 1)
            self.ce_w.append(1.0)
            self.labels.append(int(item.special_token_label))

    def _text(self, item: TextItem, rope: int) -> int:
        ids = [self.special.bos] + [int(i) for i in item.ids]
        start = self.curr
        self.text_ids.extend(ids)
        self.text_idx.extend(range(start, start + len(ids)))
        if item.loss:
            self.ce_idx.extend(range(start, start + len(ids)))
            self.ce_w.extend([1.0 / math.sqrt(len(ids))] * len(ids))
            self.labels.extend(ids[1:] + [self.special.eos])
        self.curr += len(ids)
        self._marker(self.special.eos)
        self._special_loss(item)
        n = len(ids) + 1
        self.split_lens.append(n)
        self.attn_modes.append("causal")
        self.pos.extend(range(rope, rope + n))
        return rope + n

    def _check_size(self, item: ImageItem, stride: int, max_side: int) -> Tuple[int, int]:
        if item.image.dim() != 3 or item.image.shape[0] != 3:
            raise PackingError(f"{item.role} image must be [3, H, W], got {tuple(item.image.shape)}")
        h, w = item.image.shape[1:]
        if h % stride or w % stride:
            raise PackingError(
                f"{item.role} image {h}x{w} is not a multiple of its stride {stride}; resize it first"
            )
        if h // stride > max_side or w // stride > max_side:
            raise PackingError(
                f"{item.role} image {h}x{w} exceeds the position grid of {max_side} tokens of {stride} px "
                f"per side ({max_side * stride} px); resize it smaller"
            )
        return h // stride, w // stride

    def _vit(self, item: ImageItem, rope: int) -> int:
        if self._dropped(item, self.drop.vit):
            return rope + 1
        g = self.geo
        rows, cols = self._check_size(item, g.vit_patch_size, g.vit_max_num_patch_per_side)
        self._marker(self.special.vision_start)
        n = rows * cols
        self.vit_tokens.append(patchify(item.image.float(), g.vit_patch_size))
        self.vit_pos.append(grid_position_ids(rows, cols, g.vit_max_num_patch_per_side))
        self.vit_idx.extend(range(self.curr, self.curr + n))
        self.vit_lens.append(n)
        self.curr += n
        self._marker(self.special.vision_end)
        self._special_loss(item)
        self.split_lens.append(n + 2)
        self.attn_modes.append("full")
        self.pos.extend([rope] * (n + 2))
        return rope + 1

    def _vae(self, item: ImageItem, rope: int) -> int:
        noised = item.role == "vae_noised"
        if noised != bool(item.loss):
            raise PackingError(f"a vae image has role {item.role} but loss={item.loss}; noised targets and only they have loss")
        if self._dropped(item, self.drop.vae):
            return rope + 1
        g = self.geo
        h, w = self._check_size(item, g.latent_downsample, g.max_latent_size)
        self._marker(self.special.vision_start)
        n = h * w
        self.vae_images.append(item.image.float())
        self.vae_shapes.append((h, w))
        self.lat_pos.append(grid_position_ids(h, w, g.max_latent_size))
        self.vae_idx.extend(range(self.curr, self.curr + n))
        if noised:
            self.mse_idx.extend(range(self.curr, self.curr + n))
            s = item.timestep_logit
            s = float(torch.randn((), generator=self.gen)) if s is None else float(s)
        else:
            s = float("-inf")
        self.timesteps.extend([s] * n)
        self.curr += n
        self._marker(self.special.vision_end)
        self._special_loss(item)
        self.split_lens.append(n + 2)
        self.attn_modes.append("noise" if noised else "full")
        self.pos.extend([rope] * (n + 2))
        return rope if noised else rope + 1

    def add(self, plan: SamplePlan) -> None:
        start, rope = self.curr, 0
        for i, item in enumerate(plan.items):
            try:
                if isinstance(item, TextItem):
                    if self._dropped(item, self.drop.text):
                        continue
                    rope = self._text(item, rope)
                elif isinstance(item, ImageItem):
                    if item.role == "vit":
                        rope = self._vit(item, rope)
                    elif item.role in ("vae_clean", "vae_noised"):
                        rope = self._vae(item, rope)
                    else:
                        raise PackingError(f"unknown image role {item.role!r}; choose one of {IMAGE_ROLES}")
                else:
                    raise PackingError(f"plan item of type {type(item).__name__} is neither TextItem nor ImageItem")
            except PackingError as e:
                raise PackingError(f"sample {plan.source or '?'} item {i}: {e}") from None
        if self.curr > start:  # a sample whose items were all cfg-dropped adds nothing
            self.sample_lens.append(self.curr - start)
            self.sources.append(plan.source)

    def build(self) -> PackedBatch:
        long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        L = self.curr
        vae_idx = long(self.vae_idx)
        is_und = torch.ones(L, dtype=torch.bool)
        is_und[vae_idx] = False
        und_idx = is_und.nonzero().squeeze(1)  # host-side, once per batch
        und_row = torch.full((L,), -1, dtype=torch.long)
        und_row[und_idx] = torch.arange(und_idx.numel())
        lat_row = torch.full((L,), -1, dtype=torch.long)
        lat_row[vae_idx] = torch.arange(vae_idx.numel())
        ce_idx, mse_idx = long(self.ce_idx), long(self.mse_idx)
        patch_dim = 3 * self.geo.vit_patch_size**2
        return PackedBatch(
            sequence_length=L,
            sample_lens=self.sample_lens,
            split_lens=self.split_lens,
            attn_modes=self.attn_modes,
            packed_text_ids=long(self.text_ids),
            packed_text_indexes=long(self.text_idx),
            packed_position_ids=long(self.pos),
            packed_vit_tokens=torch.cat(self.vit_tokens) if self.vit_tokens else torch.zeros(0, patch_dim),
            packed_vit_position_ids=torch.cat(self.vit_pos) if self.vit_pos else long([]),
            packed_vit_token_indexes=long(self.vit_idx),
            vit_token_seqlens=self.vit_lens,
            padded_images=_pad_images(self.vae_images),
            vae_latent_shapes=self.vae_shapes,
            packed_latent_position_ids=torch.cat(self.lat_pos) if self.lat_pos else long([]),
            packed_vae_token_indexes=vae_idx,
            packed_timesteps=torch.tensor(self.timesteps, dtype=torch.float32),
            mse_loss_indexes=mse_idx,
            ce_loss_indexes=ce_idx,
            packed_label_ids=long(self.labels),
            ce_loss_weights=torch.tensor(self.ce_w, dtype=torch.float32),
            und_token_indexes=und_idx,
            ce_und_rows=und_row[ce_idx],
            mse_latent_rows=lat_row[mse_idx],
            sources=self.sources,
        )


def _pad_images(images: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    if not images:
        return None
    hmax = max(im.shape[1] for im in images)
    wmax = max(im.shape[2] for im in images)
    out = torch.zeros(len(images), 3, hmax, wmax)
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]] = im
    return out


def pack(
    plans: Sequence[SamplePlan],
    *,
    special: SpecialTokens,
    geometry: PackGeometry,
    generator: Optional[torch.Generator] = None,
    cfg_dropout: CfgDropout = NO_DROPOUT,
) -> PackedBatch:
    """Pack ``plans`` in order into one sequence (CPU tensors; call ``.to(device)`` after)."""
    if not plans:
        raise PackingError("pack() got no sample plans")
    packer = _Packer(special, geometry, generator, cfg_dropout)
    for plan in plans:
        packer.add(plan)
    if packer.curr == 0:
        raise PackingError("every item of every sample was cfg-dropped; nothing to pack")
    return packer.build()
