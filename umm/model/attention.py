"""Attention over a packed sequence by upstream BAGEL's rules (reference/bagel.md §3.4).

Rules per (query, key) pair: same sample only; text (``causal``) sees everything before it;
tokens of one ``full`` or ``noise`` split see each other; a ``noise`` split is visible only to
itself. One rule function (:func:`allowed`) feeds both backends:

- ``sdpa``: per-sample ``scaled_dot_product_attention`` with an explicit boolean mask (CPU/GPU);
  a sample that is one ``full`` split needs no mask, one ``causal`` split uses ``is_causal``.
- ``flex``: compiled ``flex_attention`` with a ``BlockMask`` over the whole padded sequence (CUDA).

The layout comes from host-side lists (split_lens, attn_modes, sample_lens), so building it
never syncs with the device.
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # opaque objects for custom ops (torch >= 2.12); older torch traces per-sample SDPA instead
    from torch._library.opaque_object import register_opaque_type
    from torch._opaque_base import OpaqueBase
except ImportError:
    register_opaque_type, OpaqueBase = None, object

from umm.data.transfer import to_device

ATTN_MODES = ("causal", "full", "noise")

# SDPA's backends for mask-free runs of samples (the ViT's images): not cuDNN's, which builds a graph
# for every new shape (200-350 ms of host time at each new count of same-size ViT images on an H100, a
# step of 400 ms taking 600-730); flash is what upstream's ViT runs (flash_attn_varlen_func), with no
# cost per shape. Masked samples keep torch's choice: flash takes no mask and the memory-efficient
# kernel no grouped-query heads (torch 2.11), so without cuDNN they would fall to the math path.
PACKED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
FLEX_BLOCK_SIZE = 128
EAGER_MASK_PAIRS = 2**24  # (query, key) pairs an uncompiled block mask evaluates at once


class AttentionLayoutError(ValueError):
    """split_lens / attn_modes / sample_lens do not describe one consistent packed sequence."""


@dataclass
class TokenLayout:
    """Per-token ids that define the mask: sample, split, full-or-noise split, noise split (-1 = none)."""

    document: torch.Tensor
    split: torch.Tensor
    full: torch.Tensor
    noise: torch.Tensor


def token_layout(split_lens: Sequence[int], attn_modes: Sequence[str], sample_lens: Sequence[int],
                 device="cpu") -> TokenLayout:
    """The per-token ids, built on ``device`` from per-split values (a few numbers from the host).

    On the host, expanding to 16k tokens took 5-10 ms per tensor on an H100 node (four tensors, per
    attention, per step); on the GPU it is four small kernels that need no sync (``output_size``).
    """
    if len(split_lens) != len(attn_modes):
        raise AttentionLayoutError(f"{len(split_lens)} split_lens but {len(attn_modes)} attn_modes")
    bad = [m for m in attn_modes if m not in ATTN_MODES]
    if bad:
        raise AttentionLayoutError(f"unknown attn modes {bad}; allowed: {ATTN_MODES}")
    length = sum(split_lens)
    if length != sum(sample_lens):
        raise AttentionLayoutError(f"split_lens sum to {length} but sample_lens to {sum(sample_lens)}")
    n = len(split_lens)
    per_split = torch.tensor([
        list(split_lens),
        list(range(n)),
        [i if m != "causal" else -1 for i, m in enumerate(attn_modes)],
        [i if m == "noise" else -1 for i, m in enumerate(attn_modes)],
    ], dtype=torch.long)
    per_sample = torch.tensor([list(sample_lens), list(range(len(sample_lens)))], dtype=torch.long)
    per_split, per_sample = to_device(per_split, device), to_device(per_sample, device)
    split, full, noise = per_split[1:].repeat_interleave(per_split[0], dim=1, output_size=length)
    document = per_sample[1].repeat_interleave(per_sample[0], output_size=length)
    return TokenLayout(document=document, split=split, full=full, noise=noise)


def allowed(q: torch.Tensor, kv: torch.Tensor, lay: TokenLayout) -> torch.Tensor:
    """May query position ``q`` attend key position ``kv``? (broadcasting index tensors)."""
    causal = q >= kv
    same_full = (lay.full[q] == lay.full[kv]) & (lay.full[q] >= 0)
    hidden_noise = (lay.noise[kv] >= 0) & (lay.split[q] != lay.split[kv])
    return (causal | same_full) & ~hidden_noise & (lay.document[q] == lay.document[kv])


def dense_mask(lay: TokenLayout, start: int, end: int) -> torch.Tensor:
    """Boolean [end-start, end-start] mask of positions [start, end) (True = may attend)."""
    idx = torch.arange(start, end, device=lay.document.device)
    return allowed(idx[:, None], idx[None, :], lay)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``scaled_dot_product_attention`` of [H, L, D] tensors, called with a batch dimension: the
    fused GPU kernels (flash, memory-efficient) take only 4-D inputs, and 3-D ones ran the fp32 math
    path (on one H100 the ViT's attention was fp32 and unaligned 729-long batched products)."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], **kwargs)[0]


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if backend not in ("sdpa", "flex"):
        raise ValueError(f"train.attn_backend must be auto, sdpa or flex, got {backend!r}")
    if backend == "flex" and device.type != "cuda":
        raise ValueError("attn_backend=flex needs CUDA (flex attention has no CPU backward); use sdpa or auto")
    return backend


def pad_splits(split_lens: Sequence[int], attn_modes: Sequence[str], sample_lens: Sequence[int],
               pad_to: Optional[int] = None) -> Tuple[List[int], List[str], List[int]]:
    """The packed sequence padded for flex: to ``pad_to`` (or the next power of two), a multiple of the block.

    Padding rows are causal splits of at most one block, each its own sample, so they cost only
    diagonal blocks and every padded row still sees itself; real tokens never see them.
    """
    length = sum(sample_lens)
    target = max(length, pad_to) if pad_to else max(FLEX_BLOCK_SIZE, 1 << (length - 1).bit_length())
    pad = target - length + (-target % FLEX_BLOCK_SIZE)
    chunks = [min(FLEX_BLOCK_SIZE, pad - i) for i in range(0, pad, FLEX_BLOCK_SIZE)]
    return list(split_lens) + chunks, list(attn_modes) + ["causal"] * len(chunks), list(sample_lens) + chunks


def flex_block_mask(split_lens: Sequence[int], attn_modes: Sequence[str], sample_lens: Sequence[int], device,
                    pad_to: Optional[int] = None, compile: bool = True):
    """BlockMask of the padded sequence (see :func:`pad_splits`) from the one rule :func:`allowed`, as
    torch's ``create_block_mask`` builds it.

    Only the count of allowed pairs per block is compiled (one fused reduction: no [L, L] mask in
    memory); the blocks are ordered eagerly. torch's compiled ``create_block_mask`` (torch 2.11) also
    compiled that ordering: two Triton sort kernels that took 138 s and 41 s to compile on an H100,
    most of a cold start (BENCHMARKS.md, tenth run).
    """
    from torch.nn.attention.flex_attention import BlockMask

    lay = token_layout(*pad_splits(split_lens, attn_modes, sample_lens, pad_to), device=device)
    length = lay.document.numel()
    blocks = length // FLEX_BLOCK_SIZE
    if compile:
        counts = _compiled_block_counts()(lay.document, lay.split, lay.full, lay.noise, 0, blocks)
    else:  # a few query blocks at a time: the [rows, L] masks of long packs stay small
        step = max(1, EAGER_MASK_PAIRS // (FLEX_BLOCK_SIZE * length))
        counts = torch.cat([_block_counts(lay.document, lay.split, lay.full, lay.noise, i, min(i + step, blocks))
                            for i in range(0, blocks, step)])
    full = counts == FLEX_BLOCK_SIZE**2

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(q_idx, kv_idx, lay)

    return BlockMask.from_kv_blocks(*_ordered((counts > 0) & ~full), *_ordered(full), BLOCK_SIZE=FLEX_BLOCK_SIZE,
                                    mask_mod=mask_mod, seq_lengths=(length, length))


def _block_counts(document, split, full, noise, start: int, stop: int) -> torch.Tensor:
    """Allowed (query, key) pairs in each FLEX_BLOCK_SIZE² block of query blocks [start, stop): [stop - start, L / block]."""
    b, n = FLEX_BLOCK_SIZE, document.numel()
    q = torch.arange(start * b, stop * b, device=document.device)[:, None]
    kv = torch.arange(n, device=document.device)[None, :]
    pairs = allowed(q, kv, TokenLayout(document=document, split=split, full=full, noise=noise))
    return pairs.view(stop - start, b, n // b, b).sum((1, 3))


@functools.cache
def _compiled_block_counts():
    return torch.compile(_block_counts, dynamic=False, fullgraph=True)


def _ordered(blocks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A [Qb, KVb] block selection as flex's ordered form: per query block the count [1, 1, Qb] and
    the selected key blocks first, ascending [1, 1, Qb, KVb] (int32, as create_block_mask gives)."""
    dense = blocks.to(torch.int32)
    order = torch.argsort(dense, dim=-1, descending=True, stable=True)
    return dense.sum(-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, attention_fn) -> torch.Tensor:
    """[H, L, D] inputs zero-padded to the block mask's length; returns [Hq, L, D]."""
    length, padded = q.shape[1], block_mask.shape[-2]
    if padded > length:
        q, k, v = (F.pad(t, (0, 0, 0, padded - length)) for t in (q, k, v))
    return attention_fn(q[None], k[None], v[None], block_mask=block_mask, enable_gqa=True)[0, :, :length]


_compiled_flex = None


def _flex_attention():
    global _compiled_flex
    if torch.compiler.is_compiling():
        # Inside a compiled block: the block's graph takes flex attention in directly (no nested
        # compile, and no guard on the global below that would recompile the block once).
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class PerSampleSdpa(OpaqueBase):
    """SDPA over each sample of a packed sequence (the ``sdpa`` backend), from host-side lengths.

    Opaque to torch.compile (it reaches a compiled block only through :func:`per_sample_sdpa`):
    traced, its per-sample lengths and masks would be guards that change with every pack (the
    ViT's images on GPU, every sequence on CPU), one recompile each. Samples side by side of one
    length and one mask-free mode (ViT images of one size) run as one batched call: one kernel with
    work for every SM, where one call each left an H100 mostly idle and the host launching them.
    """

    def __init__(self, split_lens: Sequence[int], attn_modes: Sequence[str], sample_lens: Sequence[int], device):
        lay = None  # built only if a sample needs an explicit mask (ViT images never do)
        self.blocks: List[Tuple[int, int, Optional[torch.Tensor], bool]] = []
        start, split = 0, 0
        for n in sample_lens:
            end, first, taken = start + n, split, 0
            while taken < n:
                taken += split_lens[split]
                split += 1
            modes = attn_modes[first:split]
            if len(modes) == 1 and modes[0] == "full":
                self.blocks.append((start, end, None, False))
            elif len(modes) == 1 and modes[0] == "causal":
                self.blocks.append((start, end, None, True))
            else:
                lay = lay or token_layout(split_lens, attn_modes, sample_lens, device=device)
                self.blocks.append((start, end, dense_mask(lay, start, end), False))
            start = end
        # Runs of samples computed by one call: (sample length, count, mask, causal).
        self.runs: List[Tuple[int, int, Optional[torch.Tensor], bool]] = []
        for a, b, mask, causal in self.blocks:
            last = self.runs[-1] if self.runs else None
            if mask is None and last is not None and last[2] is None and last[0] == b - a and last[3] == causal:
                self.runs[-1] = (last[0], last[1] + 1, None, causal)
            else:
                self.runs.append((b - a, 1, mask, causal))
        self._mask_cache = {}

    def _masks(self, dtype: torch.dtype) -> List[Optional[torch.Tensor]]:
        """Additive masks in the attention dtype, converted once per forward instead of once per layer."""
        if torch.compiler.is_compiling():
            # Traced into a compiled block (torch without opaque types): the boolean masks (SDPA reads
            # True as "may attend"), since a cache write is a side effect that stops a checkpointed
            # block from compiling.
            return [m for _, _, m, _ in self.runs]
        if dtype not in self._mask_cache:
            self._mask_cache[dtype] = [
                None if m is None else torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))
                for _, _, m, _ in self.runs
            ]
        return self._mask_cache[dtype]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[H, L, D] in, [Hq, L, D] out."""
        # split (not slicing): its backward is one cat instead of a zero-filled tensor per run.
        lens = [length * count for length, count, _, _ in self.runs]
        outs = []
        for qs, ks, vs, mask, (length, count, _, causal) in zip(
                q.split(lens, 1), k.split(lens, 1), v.split(lens, 1), self._masks(q.dtype), self.runs):
            with nullcontext() if mask is not None else sdpa_kernel(PACKED_SDPA_BACKENDS):
                if count == 1:
                    outs.append(sdpa(qs, ks, vs, attn_mask=mask, is_causal=causal, enable_gqa=True))
                    continue
                # [H, count * length, D] -> [count, H, length, D]: the run's samples as a batch.
                batch = [t.unflatten(1, (count, length)).transpose(0, 1) for t in (qs, ks, vs)]
                out = F.scaled_dot_product_attention(*batch, is_causal=causal, enable_gqa=True)
            outs.append(out.transpose(0, 1).flatten(1, 2))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _opaque_op():
    """``per_sample_sdpa(q, k, v, samples)``: one operator that a compiled block calls without tracing
    into it; None where torch has no opaque types (the block then traces ``samples`` and recompiles
    when the per-sample lengths change)."""
    if register_opaque_type is None:
        return None
    try:
        register_opaque_type(PerSampleSdpa, typ="reference")
    except TypeError:  # an earlier form of the API
        return None

    @torch.library.custom_op("umm::per_sample_sdpa", mutates_args=())
    def per_sample_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, samples: PerSampleSdpa) -> torch.Tensor:
        """``samples(q, k, v)`` as one operator that a compiled block calls without tracing into it."""
        # Contiguous, as the fake says: CUDA's SDPA returns [H, L, D] laid out as [L, H, D], so a pack
        # of one ViT image failed inductor's stride check (seen at 7B on an H100); a cat already is.
        return samples(q, k, v).contiguous()

    @per_sample_sdpa.register_fake
    def _(q, k, v, samples):
        return q.new_empty(q.shape)

    def _save(ctx, inputs, output):
        q, k, v, ctx.samples = inputs
        ctx.save_for_backward(q, k, v)

    @torch.library.custom_op("umm::per_sample_sdpa_backward", mutates_args=())
    def per_sample_sdpa_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 samples: PerSampleSdpa) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SDPA's own backward, through the forward run again (attention is a small part of a block, and
        checkpointed blocks run it again anyway)."""
        # torch.func: an operator's own kernel runs below autograd, where torch.autograd.grad sees no graph.
        return tuple(g.contiguous() for g in torch.func.vjp(samples, q, k, v)[1](grad))

    @per_sample_sdpa_backward.register_fake
    def _(grad, q, k, v, samples):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _backward(ctx, grad):
        return (*per_sample_sdpa_backward(grad, *ctx.saved_tensors, ctx.samples), None)

    per_sample_sdpa.register_autograd(_backward, setup_context=_save)
    return per_sample_sdpa


per_sample_sdpa = _opaque_op()


class PackedAttention:
    """The mask of one packed sequence, built once per forward and applied by every layer.

    ``__call__(q, k, v)`` takes [L, Hq, D], [L, Hkv, D], [L, Hkv, D] and returns [L, Hq, D].
    """

    def __init__(
        self,
        split_lens: Sequence[int],
        attn_modes: Sequence[str],
        sample_lens: Sequence[int],
        *,
        device: torch.device,
        backend: str = "auto",
        pad_to: Optional[int] = None,
    ):
        """``pad_to`` (flex): pad the sequence to at least this length, so the compiled kernel sees one
        static shape for every batch (the trainer passes data.max_num_tokens, as upstream does);
        without it the length is rounded up to a power of two (few shapes, few recompiles)."""
        self.backend = resolve_backend(backend, torch.device(device))
        self.pad_to = pad_to
        self.length = int(sum(sample_lens))
        if self.backend == "sdpa":
            self.per_sample = PerSampleSdpa(split_lens, attn_modes, sample_lens, device)
        else:
            self.block_mask = flex_block_mask(split_lens, attn_modes, sample_lens, device, self.pad_to)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int = 0) -> torch.Tensor:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        if self.backend == "sdpa":
            # The operator only where a block is being compiled: eagerly it would run the forward twice.
            if per_sample_sdpa is not None and torch.compiler.is_compiling():
                out = per_sample_sdpa(q, k, v, self.per_sample)
            else:
                out = self.per_sample(q, k, v)
        else:
            out = flex_attend(q, k, v, self.block_mask, _flex_attention())
        return out.transpose(0, 1)


class KVCache:
    """Per-layer keys/values [n, Hkv, D] of one context (inference; one sample)."""

    def __init__(self, num_layers: int):
        self.layers: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.layers[0] is None else self.layers[0][0].shape[0]

    def clone(self) -> "KVCache":
        """A copy that can grow independently (CFG branches); tensors are shared until appended."""
        other = KVCache(len(self.layers))
        other.layers = list(self.layers)
        return other


class CachedAttention:
    """A new segment attending a context's KV cache and itself (SDPA; inference).

    The segment sees every cached token; within itself it is causal (text) or full (image, denoising).
    ``update=True`` appends the segment's keys/values to the cache (denoising steps pass False).
    """

    def __init__(self, cache: KVCache, *, causal: bool, update: bool):
        self.cache, self.causal, self.update = cache, causal, update

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int = 0) -> torch.Tensor:
        past = self.cache.layers[layer]
        if past is not None:
            k, v = torch.cat([past[0], k]), torch.cat([past[1], v])
        if self.update:
            self.cache.layers[layer] = (k, v)
        n, total = q.shape[0], k.shape[0]
        mask = None
        if self.causal and n > 1:
            qi = torch.arange(total - n, total, device=q.device)[:, None]
            mask = qi >= torch.arange(total, device=q.device)[None]
        out = sdpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True)
        return out.transpose(0, 1)
