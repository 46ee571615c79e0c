"""Our packing + Bagel forward reproduce upstream BAGEL's recorded tensors (bagel_tiny_ref)."""
import torch
from safetensors.torch import load_file

from umm.model.attention import dense_mask, token_layout
from umm.model.io import load_bagel
from tests.model.reference import reference_batch, require_reference

PACKED_EXACT = [
    "packed_text_ids", "packed_text_indexes", "packed_position_ids", "packed_vit_position_ids",
    "packed_vit_token_indexes", "packed_latent_position_ids", "packed_vae_token_indexes",
    "mse_loss_indexes", "ce_loss_indexes", "packed_label_ids", "ce_loss_weights",
    "packed_vit_tokens", "padded_images", "packed_timesteps",
]


def test_packing_matches_upstream():
    d = require_reference()
    inputs = load_file(str(d / "inputs.safetensors"))
    batch = reference_batch(d, load_bagel(d / "model").dims)
    for key in PACKED_EXACT:
        assert torch.equal(getattr(batch, key), inputs[key]), key
    assert batch.sequence_length == int(inputs["sequence_length"])
    assert batch.sample_lens == inputs["sample_lens"].tolist()
    assert batch.split_lens == inputs["split_lens"].tolist()
    modes = {"causal": 0, "full": 1, "noise": 2}
    assert [modes[m] for m in batch.attn_modes] == inputs["attn_modes"].tolist()
    assert batch.vit_token_seqlens == inputs["vit_token_seqlens"].tolist()
    assert [list(s) for s in batch.vae_latent_shapes] == inputs["vae_latent_shapes"].tolist()
    lay = token_layout(batch.split_lens, batch.attn_modes, batch.sample_lens)
    start = 0
    for i, n in enumerate(batch.sample_lens):
        assert torch.equal(dense_mask(lay, start, start + n), inputs[f"attn_allowed.{i}"]), i
        start += n


def test_forward_matches_upstream():
    torch.manual_seed(0)
    d = require_reference()
    inputs = load_file(str(d / "inputs.safetensors"))
    expected = load_file(str(d / "expected.safetensors"))
    model = load_bagel(d / "model")
    batch = reference_batch(d, model.dims)
    with torch.no_grad():
        out = model(batch, inputs["padded_latent"], inputs["flow_noise"], return_intermediates=True)
    got = dict(out.intermediates, ce_per_token=out.ce_per_token, mse_per_token=out.mse_per_token)
    got["ce_mean"] = out.ce_per_token.mean()
    got["ce_mean_reweighted"] = (out.ce_per_token * out.ce_weights).sum() / out.ce_weights.sum()
    got["mse_mean"] = out.mse_per_token.mean()
    got["loss_total"] = got["ce_mean"] + got["mse_mean"]
    for key in ("packed_latent_clean", "packed_latent_noised", "packed_timesteps_t"):
        torch.testing.assert_close(got[key], inputs[key], rtol=1e-4, atol=1e-4, msg=key)
    compared = [k for k in expected if not k.startswith("ae.")]
    assert len(compared) == 19
    for key in compared:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4, msg=lambda m: f"{key}: {m}")
