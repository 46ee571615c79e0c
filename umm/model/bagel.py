"""The BAGEL unified model: Qwen2 MoT LLM + SigLIP understanding path + flow-matching generation path.

Module names and state-dict keys are upstream's (reference/bagel.md §1.2-1.3). ``forward`` is the
training forward (§3.5 embedding assembly, §4 losses) over one ``PackedBatch``; the trainer reduces
the per-token losses (global token means).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from umm.data.packing import PackedBatch
from umm.model.attention import PackedAttention
from umm.model.autoencoder import patchify_latent
from umm.model.config import ModelDims
from umm.model.embeddings import MLPConnector, PositionEmbedding, TimestepEmbedder
from umm.model.qwen2_mot import ExpertRouting, Qwen2MoTForCausalLM, RMSNorm
from umm.model.siglip import SiglipVisionModel


@dataclass
class BagelOutput:
    ce_per_token: torch.Tensor  # [Nc] cross-entropy per CE position
    ce_weights: torch.Tensor  # [Nc] 1/sqrt(len) weights (used with CE reweighting)
    mse_per_token: torch.Tensor  # [Nm] flow-matching MSE per noised latent token (mean over features)
    # Filled when forward(..., return_intermediates=True); names as in the reference vectors.
    intermediates: Dict[str, torch.Tensor] = field(default_factory=dict)


def timestep_from_logit(logit: torch.Tensor, shift: float) -> torch.Tensor:
    """t = shift*sigmoid(s) / (1 + (shift-1)*sigmoid(s)); s = -inf gives exactly 0 (clean image)."""
    t = torch.sigmoid(logit)
    return shift * t / (1 + (shift - 1) * t)


def residual_dtype(weight: torch.Tensor) -> torch.dtype:
    """The residual stream's dtype: the autocast dtype under autocast (as upstream's FSDP bf16 weights
    make it: half the bytes of every norm, gather and add, and of the saved activations), else the
    weights' own."""
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


class Bagel(nn.Module):
    def __init__(self, dims: ModelDims):
        super().__init__()
        self.dims = dims
        llm, vit, bc = dims.llm, dims.vit, dims.bagel
        hidden = llm.hidden_size
        self.language_model = Qwen2MoTForCausalLM(llm)
        self.time_embedder = TimestepEmbedder(hidden)
        self.vae2llm = nn.Linear(bc.latent_token_dim, hidden)
        self.llm2vae = nn.Linear(hidden, bc.latent_token_dim)
        self.latent_pos_embed = PositionEmbedding(bc.max_latent_size, hidden)
        self.vit_model = SiglipVisionModel(vit, dims.vit_num_layers, bc.vit_max_num_patch_per_side)
        self.connector = MLPConnector(vit.hidden_size, hidden, bc.connector_act)
        self.vit_pos_embed = PositionEmbedding(bc.vit_max_num_patch_per_side, hidden)
        # auto = flex on CUDA, sdpa on CPU (train.attn_backend).
        self.attn_backend = "auto"
        # flex: pad every packed sequence to this length (data.max_num_tokens) for one compiled shape.
        self.flex_pad_to: Optional[int] = None

    @property
    def layers(self) -> nn.ModuleList:
        """The LLM decoder layers (activation checkpointing / FSDP wrap units)."""
        return self.language_model.model.layers

    def init_weights(self, generator: Optional[torch.Generator] = None, std: float = 0.02) -> None:
        """Random init for a fresh model (tiny dirs, benchmarks); position tables get their fixed values."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    m.weight.normal_(0.0, std, generator=generator)
                    if getattr(m, "bias", None) is not None:
                        m.bias.zero_()
                elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                    m.weight.fill_(1.0)
                    if getattr(m, "bias", None) is not None:
                        m.bias.zero_()
            self.llm2vae.weight.zero_()  # upstream zero-initialises the velocity head
            self.llm2vae.bias.zero_()
        self.reset_fixed_tables()

    def reset_fixed_tables(self) -> None:
        """Recompute the non-checkpoint / fixed tensors (RoPE inv_freq, sin-cos tables)."""
        self.latent_pos_embed.reset_parameters()
        self.vit_pos_embed.reset_parameters()
        self.language_model.model.rotary_emb.reset_parameters()

    def latent_tokens(self, padded_latent: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """Crop each image's latent from the padded batch and patchify: [Nl, p*p*z] in pack order."""
        p = self.dims.bagel.latent_patch_size
        toks = [
            patchify_latent(padded_latent[i, :, : h * p, : w * p], p) for i, (h, w) in enumerate(batch.vae_latent_shapes)
        ]
        return torch.cat(toks) if len(toks) > 1 else toks[0]

    def embed_vit(self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: List[int]) -> Dict[str, torch.Tensor]:
        """ViT patches of one or more images -> LLM input rows (plus the intermediate tensors)."""
        # SDPA per image (no mask): flash kernels on CUDA and no flex recompiles for varying patch counts.
        attn = PackedAttention(seqlens, ["full"] * len(seqlens), seqlens, device=patches.device, backend="sdpa")
        vit_out = self.vit_model(patches, position_ids, attn)
        conn = self.connector(vit_out)
        return dict(vit_encoder_output=vit_out, vit_connector_output=conn,
                    vit_token_embeds=conn + self.vit_pos_embed(position_ids))

    def embed_latents(self, x_t: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Noised latent tokens at times t -> LLM input rows: vae2llm(x_t) + time_embedder(t) + position."""
        time_emb = self.time_embedder(t)
        emb = self.vae2llm(x_t.to(self.vae2llm.weight.dtype)) + time_emb + self.latent_pos_embed(position_ids)
        return dict(time_embeds=time_emb, vae_token_embeds=emb)

    def llm_forward(
        self,
        seq: torch.Tensor,
        position_ids: torch.Tensor,
        und_indexes: torch.Tensor,
        gen_indexes: torch.Tensor,
        attend,
        hidden_per_layer: Optional[List[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Final-normed hidden states [L, H] in sequence order; und/gen rows pick each token's expert.

        ``attend``: ``PackedAttention`` (training) or ``CachedAttention`` (inference with a KV cache).
        """
        routing = ExpertRouting.from_indexes(und_indexes, gen_indexes)
        per_layer = [] if hidden_per_layer is not None else None
        h = self.language_model.model(routing.to_experts(seq), position_ids, routing, attend, per_layer)
        if hidden_per_layer is not None:
            hidden_per_layer.extend(routing.to_sequence(x) for x in per_layer)
        return routing.to_sequence(h)

    def forward(
        self,
        batch: PackedBatch,
        padded_latent: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        *,
        generator: Optional[torch.Generator] = None,
        return_intermediates: bool = False,
    ) -> BagelOutput:
        lm = self.language_model
        embed = lm.model.embed_tokens
        device = embed.weight.device
        dtype = residual_dtype(embed.weight)
        inter: Dict[str, torch.Tensor] = {}
        L, hidden = batch.sequence_length, self.dims.llm.hidden_size

        seq = torch.zeros(L, hidden, device=device, dtype=dtype)
        seq = seq.index_copy(0, batch.packed_text_indexes, embed(batch.packed_text_ids).to(dtype))

        if batch.vit_token_seqlens:
            vit = self.embed_vit(batch.packed_vit_tokens, batch.packed_vit_position_ids, batch.vit_token_seqlens)
            seq = seq.index_copy(0, batch.packed_vit_token_indexes, vit["vit_token_embeds"].to(dtype))
            inter.update(vit)

        x0 = None
        if batch.num_gen:
            if padded_latent is None:
                raise ValueError("the batch has VAE images: pass padded_latent = autoencoder.encode(batch.padded_images)")
            x0 = self.latent_tokens(padded_latent, batch)
            t = timestep_from_logit(batch.packed_timesteps.to(device), self.dims.bagel.timestep_shift)
            if noise is None:
                noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
            lat = self.embed_latents(x_t, t, batch.packed_latent_position_ids)
            seq = seq.index_copy(0, batch.packed_vae_token_indexes, lat["vae_token_embeds"].to(dtype))
            inter.update(lat, packed_latent_clean=x0, packed_latent_noised=x_t, packed_timesteps_t=t, flow_noise=noise)

        attn = PackedAttention(
            batch.split_lens, batch.attn_modes, batch.sample_lens,
            device=device, backend=self.attn_backend, pad_to=self.flex_pad_to,
        )
        per_layer = [] if return_intermediates else None
        # Training batches carry expert-order rows of the loss tokens, so no device-side search is needed.
        routing = ExpertRouting.from_indexes(batch.und_token_indexes, batch.packed_vae_token_indexes)
        h = lm.model(routing.to_experts(seq), batch.packed_position_ids, routing, attn, per_layer)
        h_und, h_gen = routing.split(h)

        logits = lm.lm_head(h_und.index_select(0, batch.ce_und_rows))
        ce = F.cross_entropy(logits.float(), batch.packed_label_ids, reduction="none")

        if batch.mse_latent_rows.numel():
            pred = self.llm2vae(h_gen.index_select(0, batch.mse_latent_rows))
            target = (noise - x0).index_select(0, batch.mse_latent_rows)
            mse_el = (pred.float() - target.float()) ** 2
        else:
            pred = target = mse_el = h.new_zeros(0, self.dims.bagel.latent_token_dim, dtype=torch.float32)
        mse = mse_el.mean(-1)

        out = BagelOutput(ce_per_token=ce, ce_weights=batch.ce_loss_weights, mse_per_token=mse)
        if return_intermediates:
            inter.update(
                llm_input_embeds=seq,
                last_hidden_state=routing.to_sequence(h),
                logits_ce=logits,
                pred_velocity=pred,
                target_velocity=target,
                mse_per_element=mse_el,
            )
            inter.update({f"hidden_after_layer.{i}": routing.to_sequence(x) for i, x in enumerate(per_layer)})
            out.intermediates = inter
        return out
