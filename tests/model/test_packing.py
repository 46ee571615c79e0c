"""Packing rules beyond the reference batch: cfg dropout, special-token loss, routing rows, errors."""
import pytest
import torch

from umm.data.packing import CfgDropout, PackGeometry, PackingError, pack
from umm.data.plan import ImageItem, SamplePlan, TextItem
from tests.model.builders import SPECIAL, edit_plan, mixed_batch, tiny_dims

GEO = PackGeometry.from_dims(tiny_dims())
ALL = CfgDropout(1.0, 1.0, 1.0)


def img(h, w):
    return torch.zeros(3, h, w)


def pack1(items, **kw):
    return pack([SamplePlan(items, "s")], special=SPECIAL, geometry=GEO, **kw)


def test_cfg_dropout_rope_rules():
    # Dropped text: no trace, RoPE not advanced. Dropped ViT / clean VAE image: RoPE advances by 1.
    items = [
        TextItem([1, 2], enable_cfg=True),
        ImageItem(img(28, 28), "vit", enable_cfg=True),
        ImageItem(img(32, 32), "vae_clean", enable_cfg=True),
        TextItem([3], loss=True),
    ]
    b = pack1(items, cfg_dropout=ALL, generator=torch.Generator().manual_seed(0))
    assert b.packed_text_ids.tolist() == [SPECIAL.bos, 3, SPECIAL.eos]
    assert b.packed_position_ids.tolist() == [2, 3, 4]
    kept = pack1(items)
    assert kept.packed_position_ids.tolist() == [0, 1, 2, 3] + [4] * 6 + [5] * 6 + [6, 7, 8]
    assert kept.attn_modes == ["causal", "full", "full", "causal"]


def test_loader_decided_dropout_is_honoured():
    items = [TextItem([1, 2], enable_cfg=True, cfg_dropped=True), TextItem([3], enable_cfg=True, cfg_dropped=False)]
    b = pack1(items, cfg_dropout=ALL)
    assert b.packed_text_ids.tolist() == [SPECIAL.bos, 3, SPECIAL.eos]


def test_noised_image_keeps_rope_and_special_token_loss():
    items = [
        TextItem([5, 6]),
        ImageItem(img(32, 32), "vae_noised", loss=True, special_token_loss=True, special_token_label=7, timestep_logit=0.5),
        ImageItem(img(32, 32), "vae_clean"),
        TextItem([8], special_token_loss=True, special_token_label=9),
    ]
    b = pack1(items)
    assert b.packed_position_ids.tolist() == [0, 1, 2, 3] + [4] * 6 + [4] * 6 + [5, 6, 7]
    assert b.attn_modes == ["causal", "noise", "full", "causal"]
    assert b.ce_loss_indexes.tolist() == [9, 18] and b.packed_label_ids.tolist() == [7, 9]
    assert b.ce_loss_weights.tolist() == [1.0, 1.0]
    assert b.packed_timesteps[:4].tolist() == [0.5] * 4 and torch.isinf(b.packed_timesteps[4:]).all()
    assert b.mse_latent_rows.tolist() == [0, 1, 2, 3]


def test_routing_rows_point_at_the_loss_tokens():
    b = mixed_batch(tiny_dims())
    assert b.num_und + b.num_gen == b.num_tokens
    assert torch.equal(b.und_token_indexes[b.ce_und_rows], b.ce_loss_indexes)
    assert torch.equal(b.packed_vae_token_indexes[b.mse_latent_rows], b.mse_loss_indexes)
    und = set(b.und_token_indexes.tolist())
    assert und == set(b.packed_text_indexes.tolist()) | set(b.packed_vit_token_indexes.tolist())
    moved = b.to("cpu")
    assert moved.sample_lens == b.sample_lens and torch.equal(moved.packed_position_ids, b.packed_position_ids)


def test_timestep_draws_follow_the_generator():
    g = torch.Generator().manual_seed(0)
    plan = edit_plan(g)
    plan.items[-1].timestep_logit = None
    a, b = (pack([plan], special=SPECIAL, geometry=GEO, generator=torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a.packed_timesteps, b.packed_timesteps)
    assert torch.isfinite(a.packed_timesteps[-4:]).all()


@pytest.mark.parametrize(
    "item, message",
    [
        (ImageItem(img(30, 28), "vit"), "not a multiple of its stride 14"),
        (ImageItem(img(32, 160), "vae_clean"), "exceeds the position grid"),
        (ImageItem(img(32, 32), "vae_noised"), "loss=False"),
        (ImageItem(img(28, 28), "pixels"), "unknown image role"),
        (TextItem([1], special_token_loss=True), "special_token_label is None"),
    ],
)
def test_bad_items_raise_one_clear_error(item, message):
    with pytest.raises(PackingError, match=message) as e:
        pack1([item])
    assert "sample s item 0" in str(e.value)
