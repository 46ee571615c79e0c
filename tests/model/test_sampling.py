"""Inference: cached contexts agree with the training forward, CFG rules, text decoding, PNG output."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.model.builders import SPECIAL, tiny_dims
from umm.config.schema import AEBuildConfig
from umm.data.packing import NO_DROPOUT, PackGeometry, pack
from umm.data.plan import ImageItem, SamplePlan, TextItem
from umm.model.autoencoder import AutoEncoder, patchify_latent
from umm.model.io import build_bagel
from umm.model.sampling import (
    ImageGenConfig,
    Inferencer,
    SamplingError,
    guide,
    make_grid,
    save_png,
    timestep_schedule,
)

FEW = dict(num_timesteps=4, timestep_shift=3.0)


def _randomise_heads(bagel, seed):
    # llm2vae starts at zero (as upstream); random values make every velocity depend on the input.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bagel.llm2vae.weight.normal_(0, 0.5, generator=g)
        bagel.llm2vae.bias.normal_(0, 0.1, generator=g)


@pytest.fixture(scope="module")
def inf():
    torch.manual_seed(0)
    dims = tiny_dims()
    bagel = build_bagel(dims, seed=3)
    _randomise_heads(bagel, 3)
    ae = AutoEncoder(AEBuildConfig(resolution=64, ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1, z_channels=4)).eval()
    return Inferencer(bagel, ae, SPECIAL)


def _ids(n, seed=0):
    return torch.randint(0, 950, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _image(h, w, seed=0):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_velocity_over_cached_context_equals_training_forward(inf):
    """Edit-shaped sample: clean VAE image, ViT image, text, noised target (packed, one pass) vs the
    same items added to a context one by one and the target's velocity asked for at the same t."""
    bagel, dims = inf.bagel, inf.dims
    src, vit_src, target, ids = _image(32, 48, 1), _image(28, 42, 2), _image(32, 48, 3), _ids(7)
    logit = 0.3
    plan = SamplePlan([ImageItem(src, "vae_clean"), ImageItem(vit_src, "vit"), TextItem(ids),
                       ImageItem(target, "vae_noised", loss=True, timestep_logit=logit)])
    batch = pack([plan], special=SPECIAL, geometry=PackGeometry.from_dims(dims), cfg_dropout=NO_DROPOUT)
    latent = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(4))
    noise = torch.randn(12, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = bagel(batch, latent, noise, return_intermediates=True)

    # The same clean latent the packed pass used: feed the context update its tokens directly.
    ctx = inf.new_context()
    seq, pos, gen = inf._latent_segment(patchify_latent(latent[0]), 0.0, 2, 3, ctx.rope)
    inf._run(ctx, seq, pos, gen, causal=False, update=True)
    ctx.rope += 1
    inf.add_vit_image(ctx, vit_src)
    inf.add_text(ctx, ids)
    t = float(torch.sigmoid(torch.tensor(logit)))
    x_t = out.intermediates["packed_latent_noised"][6:]
    v = inf.velocity(ctx, x_t, t, 2, 3)
    torch.testing.assert_close(v, out.intermediates["pred_velocity"], rtol=1e-4, atol=1e-4)


def test_guidance_rules():
    g = torch.Generator().manual_seed(0)
    c, ut, ui = (torch.randn(6, 16, generator=g) for _ in range(3))
    assert torch.equal(guide(c, ut, ui, 1.0, 3.0), c)  # image guidance only rides on text guidance
    v = guide(c, ut, None, 4.0, 1.0, renorm_min=1.0)  # clamp(min=1, max=1): no renorm
    torch.testing.assert_close(v, ut + 4.0 * (c - ut))
    v = guide(c, ut, ui, 4.0, 2.0, renorm_min=1.0)
    torch.testing.assert_close(v, ui + 2.0 * (ut + 4.0 * (c - ut) - ui))
    assert guide(c, ut, ui, 4.0, 2.0, "global").norm() <= c.norm() + 1e-5
    per_token = guide(c, ut, ui, 4.0, 2.0, "channel").norm(dim=-1)
    assert torch.all(per_token <= c.norm(dim=-1) + 1e-5)
    vt = ut + 4.0 * (c - ut)
    vt = vt * (c.norm(dim=-1, keepdim=True) / (vt.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0, 1)
    torch.testing.assert_close(guide(c, ut, ui, 4.0, 2.0, "text_channel"), ui + 2.0 * (vt - ui))


def test_schedule_is_shifted_linspace():
    t = timestep_schedule(5, 3.0)
    assert t[0] == 1.0 and t[-1] == 0.0 and torch.all(t[1:] < t[:-1])
    torch.testing.assert_close(t[2], torch.tensor(3 * 0.5 / (1 + 2 * 0.5)))


def test_unit_scales_equal_the_plain_path(inf):
    ctx = inf.add_text(inf.new_context(), _ids(5, 1))
    cfg_text, cfg_img = inf.new_context(), inf.add_text(inf.new_context(), _ids(3, 2))
    plain = inf.generate_latent(ctx, 32, 32, config=ImageGenConfig(cfg_text_scale=1.0, **FEW),
                                generator=torch.Generator().manual_seed(0))
    unit = inf.generate_latent(ctx, 32, 32, cfg_text_ctx=cfg_text, cfg_img_ctx=cfg_img,
                               config=ImageGenConfig(cfg_text_scale=1.0, cfg_img_scale=1.0, **FEW),
                               generator=torch.Generator().manual_seed(0))
    outside = inf.generate_latent(ctx, 32, 32, cfg_text_ctx=cfg_text, cfg_img_ctx=cfg_img,
                                  config=ImageGenConfig(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(1.0, 1.0), **FEW),
                                  generator=torch.Generator().manual_seed(0))
    guided = inf.generate_latent(ctx, 32, 32, cfg_text_ctx=cfg_text, cfg_img_ctx=cfg_img,
                                 config=ImageGenConfig(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), **FEW),
                                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, unit) and torch.equal(plain, outside)
    assert not torch.allclose(plain, guided)


def test_euler_steps_follow_the_velocity(inf):
    """Two timesteps = one Euler step from pure noise at t=1 to t=0: x0 = noise - v(noise, 1)."""
    ctx = inf.add_text(inf.new_context(), _ids(4, 3))
    x = inf.generate_latent(ctx, 16, 32, config=ImageGenConfig(num_timesteps=2, cfg_text_scale=1.0),
                            generator=torch.Generator().manual_seed(7))
    noise = torch.randn(2, 16, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(x, noise - inf.velocity(ctx, noise, 1.0, 1, 2))


def test_text_to_image_and_edit_make_images(inf, tmp_path):
    cfg = ImageGenConfig(cfg_img_scale=1.5, **FEW)
    img = inf.text_to_image(_ids(6), 64, 48, config=cfg, generator=torch.Generator().manual_seed(1))
    assert img.shape == (3, 64, 48) and img.min() >= -1 and img.max() <= 1
    edited = inf.edit_image(_image(32, 32, 9), _ids(4), vit_image=_image(28, 28, 9),
                            config=ImageGenConfig(cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel", **FEW),
                            generator=torch.Generator().manual_seed(2))
    assert edited.shape == (3, 32, 32)
    path = save_png([img[:, :32, :32], edited], tmp_path / "samples" / "grid.png", nrow=2)
    with Image.open(path) as png:
        assert png.size == (2 * 32 + 3 * 2, 32 + 2 * 2)
    single = save_png(img, tmp_path / "one.png")
    with Image.open(single) as png:
        assert png.size == (48, 64)


def test_text_decoding_with_cache_equals_without(inf):
    ctx = inf.add_vit_image(inf.new_context(), _image(28, 28, 5))
    inf.add_text(ctx, _ids(6, 4))
    before = ctx.length
    cached = inf.generate_text(ctx, 12)
    uncached = inf.generate_text(ctx, 12, use_cache=False)
    assert cached == uncached and len(cached) > 0
    assert ctx.length == before  # decoding does not change the context
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert inf.generate_text(ctx, 8, temperature=1.0, generator=g1) == inf.generate_text(
        ctx, 8, temperature=1.0, generator=g2, use_cache=False)


def test_greedy_first_token_is_the_training_forwards_argmax(inf):
    """The first decoded token after a text = argmax of the training forward's logits at <|im_start|>."""
    prompt = _ids(5, 6)
    ctx = inf.add_text(inf.new_context(), prompt)
    first = inf.generate_text(ctx, 1)
    plan = SamplePlan([TextItem(prompt), TextItem([0], loss=True)])
    batch = pack([plan], special=SPECIAL, geometry=PackGeometry.from_dims(inf.dims), cfg_dropout=NO_DROPOUT)
    with torch.no_grad():
        logits = inf.bagel(batch, return_intermediates=True).intermediates["logits_ce"]
    expected = int(logits[0].argmax())
    assert first == ([] if expected == SPECIAL.eos else [expected])


def test_bad_inputs_are_clear_errors(inf):
    ctx = inf.new_context()
    with pytest.raises(SamplingError, match="multiples of 16"):
        inf.generate_latent(ctx, 40, 32, config=ImageGenConfig(cfg_text_scale=1.0, **FEW))
    with pytest.raises(SamplingError, match="cfg_text_ctx"):
        inf.generate_latent(ctx, 32, 32, config=ImageGenConfig(**FEW))
    with pytest.raises(SamplingError, match="cfg_renorm_type"):
        inf.generate_latent(ctx, 32, 32, config=ImageGenConfig(cfg_renorm_type="norm", **FEW))
    with pytest.raises(SamplingError, match="multiples of 14"):
        inf.add_vit_image(ctx, _image(30, 28))
    with pytest.raises(SamplingError, match="no tokenizer"):
        inf.add_text(ctx, "a red circle")
    with pytest.raises(SamplingError, match="no images"):
        make_grid([])


def test_bf16_model_samples_and_decodes_text(inf):
    """The trainer samples from bf16 weights: position tables stay fp32, segments must still line up."""
    bagel = build_bagel(inf.dims, dtype=torch.bfloat16, seed=3)
    _randomise_heads(bagel, 3)
    low = Inferencer(bagel, inf.ae, SPECIAL)
    img = low.text_to_image(_ids(5), 32, 32, config=ImageGenConfig(cfg_img_scale=1.5, **FEW),
                            generator=torch.Generator().manual_seed(0))
    assert img.dtype == torch.float32 and torch.isfinite(img).all()
    ctx = low.add_vit_image(low.new_context(), _image(28, 28))
    assert len(low.generate_text(low.add_text(ctx, _ids(3)), 3)) <= 3
