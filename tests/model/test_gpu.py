"""CUDA-only checks of the full model: flex vs SDPA, bf16 autocast, torch.compile (skipped without a GPU)."""
import pytest
import torch

from umm.model.io import build_bagel
from tests.model.builders import mixed_batch, random_latent, tiny_dims

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def run(model, batch, latent, noise):
    out = model(batch, latent, noise)
    loss = out.ce_per_token.mean() + out.mse_per_token.mean()
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def setup():
    dims = tiny_dims()
    model = build_bagel(dims, seed=0, device="cuda")
    with torch.no_grad():
        model.llm2vae.weight.normal_(0, 0.02)
    batch = mixed_batch(dims).to("cuda")
    latent = random_latent(batch, dims).cuda()
    noise = torch.randn(batch.num_gen, dims.bagel.latent_token_dim, device="cuda")
    return model, batch, latent, noise


def test_flex_and_sdpa_give_the_same_losses_and_grads():
    model, batch, latent, noise = setup()
    results = {}
    for backend in ("sdpa", "flex"):
        model.attn_backend = backend
        results[backend] = run(model, batch, latent, noise)
    (l_s, g_s), (l_f, g_f) = results["sdpa"], results["flex"]
    torch.testing.assert_close(l_s, l_f, rtol=1e-4, atol=1e-4)
    assert g_s.keys() == g_f.keys()
    for n in g_s:
        torch.testing.assert_close(g_s[n], g_f[n], rtol=1e-3, atol=1e-4, msg=n)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_bf16_autocast_trains(backend):
    model, batch, latent, noise = setup()
    model.attn_backend = backend
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grads = run(model, batch, latent, noise)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


def test_compiled_layers_match_eager():
    model, batch, latent, noise = setup()
    model.attn_backend = "flex"
    eager_loss, eager_grads = run(model, batch, latent, noise)
    for layer in model.layers:
        layer.compile()
    loss, grads = run(model, batch, latent, noise)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-4)
    for n in grads:
        torch.testing.assert_close(grads[n], eager_grads[n], rtol=1e-3, atol=1e-4, msg=n)
