"""CUDA-only checks of the full model: flex vs SDPA, bf16 autocast, torch.compile (skipped without a GPU)."""
import pytest
import torch

from umm.model.attention import PackedAttention
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


@pytest.mark.parametrize("num_samples", [1, 3])
def test_per_sample_sdpa_matches_its_fake_kernel(num_samples):
    """Real and fake kernels agree on shapes and strides (inductor asserts them in compiled blocks):
    CUDA's SDPA returns its output in another layout than the contiguous one a cat of several gives."""
    from umm.model.attention import PerSampleSdpa, per_sample_sdpa

    if per_sample_sdpa is None:
        pytest.skip("this torch has no opaque types")
    lens = [729, 300, 81][:num_samples]
    q, k, v = (torch.randn(16, sum(lens), 72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    samples = PerSampleSdpa(lens, ["full"] * num_samples, lens, "cuda")
    torch.library.opcheck(per_sample_sdpa, (q, k, v, samples))


def test_vit_like_packs_of_new_image_counts_run_no_cudnn_attention():
    """Packs of 3, 4 and 5 same-size images (a new batch shape each) run flash attention: cuDNN's
    graph build per new shape was 200-350 ms of host time a step on an H100."""
    from torch.profiler import ProfilerActivity, profile

    names = []
    for count in (3, 4, 5):
        lens = [729] * count
        q = torch.randn(sum(lens), 16, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        attn = PackedAttention(lens, ["full"] * count, lens, device=torch.device("cuda"), backend="sdpa")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            attn(q, q, q).sum().backward()
        names += [e.name for e in prof.events()]
    assert any("flash" in n for n in names)
    assert not [n for n in names if "cudnn_attention" in n]


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


def test_a_training_step_never_waits_for_the_gpu():
    """Batch upload, forward, loss, backward, clip, AdamW + EMA: the host only queues work.

    A host-device sync in the step (``.item()``, a data-dependent shape, a copy from pageable host
    memory, which makes CUDA drain its queue first) lets the GPU idle while the host catches up.
    The profiler shows each: a synchronizing runtime call, or a pageable memcpy on the GPU.
    """
    from torch.profiler import ProfilerActivity, profile

    from umm.config.schema import MethodConfig, OptimConfig
    from umm.train.distributed import DistEnv
    from umm.train.ema import Ema
    from umm.train.loss import compute_loss
    from umm.train.optim import build_optimizer, clip_for_step

    dims = tiny_dims()
    model = build_bagel(dims, seed=0, device="cuda")
    model.attn_backend = "flex"
    host_batch = mixed_batch(dims)
    latent = random_latent(host_batch, dims).cuda()
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_optimizer([p for _, p in params], OptimConfig(lr=1e-4), env.device)
    ema = Ema(params, 0.99, optimizer=opt)
    method = MethodConfig(name="t", recipe="sft")

    def step():
        batch = host_batch.to("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch, latent)
        compute_loss(out, method, env, grad_accum=1).loss.backward()
        clip_for_step(opt, [p for _, p in params], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update()

    for _ in range(2):  # flex compiles, optimizer state appears
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert ema.fused and any("adamw_ema" in n for n in names)  # the whole step was recorded
    # cudaDeviceSynchronize is the test's own (after the step) and the profiler's.
    waits = {n for n in names if n in ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy") or "Pageable" in n}
    assert not waits
