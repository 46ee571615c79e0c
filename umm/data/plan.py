"""The sequence plan: what one training sample is, before packing.

Recipes (``umm/methods``) turn a dataset row into a ``SamplePlan``; ``umm.data.packing`` packs
a list of plans into one ``PackedBatch`` by upstream BAGEL's rules (reference/bagel.md §3.2).
Field meanings follow upstream's plan items: ``loss`` (CE for text, MSE for a VAE image),
``enable_cfg`` (item may be dropped for classifier-free guidance), ``special_token_loss`` /
``special_token_label`` (loss on the closing ``<|im_end|>`` / ``<|vision_end|>``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

import torch


@dataclass
class TextItem:
    ids: List[int]
    loss: bool = False
    enable_cfg: bool = False
    special_token_loss: bool = False
    special_token_label: Optional[int] = None
    # cfg dropout decided before packing (the loader rolls it so token budgets count real tokens);
    # None: packing draws it with its generator.
    cfg_dropped: Optional[bool] = None


@dataclass
class ImageItem:
    """An image in [-1, 1], shape [3, H, W], already resized to the role's stride.

    role: ``vit`` (understanding input), ``vae_clean`` (clean latent condition) or
    ``vae_noised`` (generation target; ``loss`` must be true).
    ``timestep_logit``: the recorded N(0,1) draw for a noised image; None draws one at packing.
    """

    image: torch.Tensor
    role: str
    loss: bool = False
    enable_cfg: bool = False
    special_token_loss: bool = False
    special_token_label: Optional[int] = None
    timestep_logit: Optional[float] = None
    cfg_dropped: Optional[bool] = None  # as TextItem.cfg_dropped


PlanItem = Union[TextItem, ImageItem]


@dataclass
class SamplePlan:
    items: List[PlanItem] = field(default_factory=list)
    # Where the sample came from (dataset name, file, row): shown in errors and NaN reports.
    source: str = ""
