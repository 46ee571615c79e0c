"""Gradients reach both experts from a mixed batch; a text-only batch leaves generation-only parts untouched."""
import torch
from torch.utils.checkpoint import checkpoint

from umm.model.io import build_bagel
from umm.model.parts import part_of
from tests.model.builders import mixed_batch, pack_plans, random_latent, text_plan, tiny_dims


def tiny_model():
    model = build_bagel(tiny_dims(), seed=0)
    with torch.no_grad():  # upstream zero-inits llm2vae, which would block gradients into the gen expert
        model.llm2vae.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    return model


def loss_of(model, batch, latent=None):
    out = model(batch, latent, generator=torch.Generator().manual_seed(0))
    ce = out.ce_per_token.mean() if out.ce_per_token.numel() else 0.0
    mse = out.mse_per_token.mean() if out.mse_per_token.numel() else 0.0
    return ce + mse


def grads_by_part(model):
    parts = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            parts.setdefault(part_of(name), []).append((name, p.grad))
    return parts


def test_mixed_batch_reaches_every_part():
    dims = tiny_dims()
    model, batch = tiny_model(), mixed_batch(dims)
    loss_of(model, batch, random_latent(batch, dims)).backward()
    parts = grads_by_part(model)
    assert set(parts) == {"llm_und", "llm_gen", "embed", "lm_head", "vit", "connector", "gen_heads"}
    for part, grads in parts.items():
        for name, g in grads:
            assert g is not None and g.abs().sum() > 0, f"{part}: {name} got no gradient"


def test_text_only_batch_leaves_gen_params_without_grad():
    dims = tiny_dims()
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    batch = pack_plans([text_plan(g), text_plan(g, 20)], dims)
    assert batch.num_gen == 0 and batch.padded_images is None
    loss_of(model, batch).backward()
    parts = grads_by_part(model)
    for part in ("llm_gen", "gen_heads", "vit", "connector"):
        assert all(grad is None for _, grad in parts[part]), part
    for part in ("llm_und", "embed", "lm_head"):
        assert all(grad is not None for _, grad in parts[part]), part


def test_activation_checkpointing_gives_the_same_gradients():
    dims = tiny_dims()
    batch = mixed_batch(dims)
    latent = random_latent(batch, dims)
    grads = []
    for wrap in (None, lambda layer, *args: checkpoint(layer, *args, use_reentrant=False)):
        model = tiny_model()
        model.language_model.model.layer_wrapper = wrap
        loss_of(model, batch, latent).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_autocast_keeps_the_residual_stream_in_its_dtype_over_fp32_weights():
    """Under bf16 autocast the residual stream is bf16 (as upstream's FSDP bf16 weights make it), the
    weights and their gradients stay fp32, and the loss stays close to the fp32 forward's."""
    dims = tiny_dims()
    model, batch = tiny_model(), mixed_batch(dims)
    latent = random_latent(batch, dims)
    reference = loss_of(model, batch, latent)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch, latent, generator=torch.Generator().manual_seed(0), return_intermediates=True)
    inter = out.intermediates
    assert inter["llm_input_embeds"].dtype == torch.bfloat16
    assert all(inter[f"hidden_after_layer.{i}"].dtype == torch.bfloat16 for i in range(dims.llm.num_hidden_layers))
    loss = out.ce_per_token.mean() + out.mse_per_token.mean()
    torch.testing.assert_close(loss, reference, rtol=2e-2, atol=2e-2)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def test_expert_reordering_round_trips_and_its_gradient_is_index_selects():
    from umm.model.qwen2_mot import ExpertRouting

    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(11, generator=g)
    routing = ExpertRouting.from_indexes(perm[:4], perm[4:])
    x = torch.randn(11, 3, dtype=torch.float64, requires_grad=True)
    experts = routing.to_experts(x)
    assert torch.equal(experts, x[perm]) and torch.equal(routing.to_sequence(experts), x)
    torch.autograd.gradcheck(routing.to_experts, (x,))
    torch.autograd.gradcheck(routing.to_sequence, (x,))
