"""FLUX autoencoder against upstream's outputs (reference vectors) and its latent patch layout."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.model.reference import require_reference
from umm.config.schema import AEBuildConfig
from umm.model.autoencoder import (
    AEConfigError,
    AutoEncoder,
    ae_params_from_dict,
    ae_params_to_dict,
    patchify_latent,
    unpatchify_latent,
)
from umm.model.io import load_ae, read_ae_params

TOL = dict(rtol=1e-4, atol=1e-4)  # conv results move ~1e-6 with the thread count


@pytest.fixture(scope="module")
def ref():
    d = require_reference()
    return dict(
        dir=d,
        ae=load_ae(d / "model"),
        expected=load_file(str(d / "expected.safetensors")),
        inputs=load_file(str(d / "inputs.safetensors")),
        images=load_file(str(d / "batch" / "images.safetensors")),
    )


def test_module_keys_are_the_checkpoint_keys(ref):
    with safe_open(str(ref["dir"] / "model" / "ae.safetensors"), "pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    built = AutoEncoder(read_ae_params(ref["dir"] / "model"))
    assert len(stored) == 240
    assert {k: tuple(v.shape) for k, v in built.state_dict().items()} == stored


@pytest.mark.parametrize("name", ["t2i_target", "edit_src_vae", "edit_target"])
def test_encoder_and_decoder_match_upstream(ref, name):
    ae, exp = ref["ae"], ref["expected"]
    with torch.no_grad():
        x = ref["images"][name][None]
        torch.testing.assert_close(ae.moments(x), exp[f"ae.moments.{name}"], **TOL)
        torch.testing.assert_close(ae.encode(x, sample=False), exp[f"ae.encode_mean.{name}"], **TOL)
        torch.testing.assert_close(ae.decode(exp[f"ae.encode_mean.{name}"]), exp[f"ae.decode_of_mean.{name}"], **TOL)


def test_sampled_encode_with_recorded_noise_matches_upstream(ref):
    inp = ref["inputs"]
    with torch.no_grad():
        latent = ref["ae"].encode(inp["padded_images"], eps=inp["vae_posterior_eps"])
    torch.testing.assert_close(latent, inp["padded_latent"], **TOL)


def test_sampling_uses_the_generator(ref):
    x = ref["images"]["edit_target"][None]
    ae = ref["ae"]
    with torch.no_grad():
        a = ae.encode(x, generator=torch.Generator().manual_seed(1))
        b = ae.encode(x, generator=torch.Generator().manual_seed(1))
        c = ae.encode(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_patchify_matches_the_packed_latent_tokens(ref):
    inp = ref["inputs"]
    tokens = torch.cat([patchify_latent(inp[f"x0.{i}"]) for i in range(3)])
    torch.testing.assert_close(tokens, inp["packed_latent_clean"], rtol=0, atol=0)


def test_unpatchify_inverts_patchify():
    latent = torch.randn(4, 6, 10)
    tokens = patchify_latent(latent)
    assert tokens.shape == (15, 16)
    assert torch.equal(unpatchify_latent(tokens, 3, 5), latent)


def test_config_round_trip_and_errors():
    p = AEBuildConfig(ch=32, ch_mult=[1, 2, 2, 2], z_channels=4)
    d = ae_params_to_dict(p)
    assert d["downsample"] == 8 and ae_params_from_dict(d) == p
    with pytest.raises(AEConfigError, match="multiples of 32"):
        AutoEncoder(AEBuildConfig(ch=16, ch_mult=[1, 2]))
    with pytest.raises(AEConfigError, match="downsample 16 disagrees"):
        ae_params_from_dict({**d, "downsample": 16})
    with pytest.raises(AEConfigError, match="unknown keys"):
        ae_params_from_dict({**d, "chanels": 3})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cpu_generator_draws_the_same_posterior_on_cuda(ref):
    # The samplers seed a CPU generator; a model on the GPU must take it (an edit sample in training
    # failed with "Expected a 'cuda' device type for generator").
    x = ref["images"]["edit_target"][None]
    with torch.no_grad():
        cpu = ref["ae"].encode(x, generator=torch.Generator().manual_seed(1))
        gpu = load_ae(ref["dir"] / "model").cuda().encode(x.cuda(), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)
