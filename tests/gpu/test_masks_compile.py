"""CPU checks of the GPU path: the flex BlockMask agrees with the SDPA masks block by block, and
compiled blocks (inductor) give the eager losses and gradients on the tiny model."""
import pytest
import torch
from torch._dynamo.utils import counters

from umm.model.attention import FLEX_BLOCK_SIZE, allowed, flex_block_mask, pad_splits, token_layout
from umm.model.io import build_bagel
from umm.train import parallel
from umm.train.distributed import DistEnv
from tests.model.builders import mixed_batch, pack_plans, random_latent, t2i_plan, tiny_dims
from tests.model.test_attention import LAYOUTS

from .bench import bench_train

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _listed_blocks(num, idx, n_kv):
    dense = torch.zeros(num.shape[-1], n_kv, dtype=torch.bool)
    for qb in range(num.shape[-1]):
        dense[qb, idx[0, 0, qb, : num[0, 0, qb]]] = True
    return dense


def _check_block_mask(split_lens, modes, sample_lens, pad_to=None):
    bm = flex_block_mask(split_lens, modes, sample_lens, torch.device("cpu"), pad_to, compile=False)
    padded = token_layout(*pad_splits(split_lens, modes, sample_lens, pad_to))
    n = padded.document.numel()
    idx = torch.arange(n)
    dense = allowed(idx[:, None], idx[None, :], padded)  # what the SDPA path applies, per pair
    nb = n // FLEX_BLOCK_SIZE
    per_block = dense.reshape(nb, FLEX_BLOCK_SIZE, nb, FLEX_BLOCK_SIZE)
    any_true, all_true = per_block.any(3).any(1), per_block.all(3).all(1)
    partial = _listed_blocks(bm.kv_num_blocks, bm.kv_indices, nb)
    full = _listed_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, nb)
    # Every block holding an allowed pair is visited; fully allowed blocks skip the mask; no block twice.
    assert torch.equal(partial | full, any_true)
    assert torch.equal(full, all_true)
    assert not (partial & full).any()
    # The flex mask_mod is the same rule, pair by pair.
    q, kv = torch.meshgrid(idx, idx, indexing="ij")
    assert torch.equal(bm.mask_mod(0, 0, q, kv), dense)


@pytest.mark.parametrize("layout", LAYOUTS[:8])
def test_flex_block_mask_agrees_with_sdpa_mask(layout):
    _check_block_mask(*layout)


@pytest.mark.parametrize("layout", LAYOUTS[:8])
def test_flex_block_mask_is_the_one_torchs_create_block_mask_builds(layout):
    # umm counts each block's allowed pairs itself and orders the blocks eagerly (torch 2.11 compiled
    # that ordering into Triton sort kernels that took minutes); flex must get torch's very BlockMask.
    from torch.nn.attention.flex_attention import create_block_mask

    ours = flex_block_mask(*layout, torch.device("cpu"), compile=False)
    padded = token_layout(*pad_splits(*layout))
    n = padded.document.numel()
    theirs = create_block_mask(lambda b, h, q, kv: allowed(q, kv, padded), None, None, n, n, device="cpu")
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        mine, torchs = getattr(ours, name), getattr(theirs, name)
        assert mine.dtype == torchs.dtype and torch.equal(mine, torchs), name
    assert (ours.BLOCK_SIZE, ours.seq_lengths) == (theirs.BLOCK_SIZE, theirs.seq_lengths)


def test_compiled_block_counts_match_the_eager_ones_over_several_query_chunks(monkeypatch):
    # The compiled count (what CUDA runs) against the eager one, which takes the query blocks a few at
    # a time: a 2,560-token pack padded to 4,096 (32 blocks) in chunks of 5 query blocks.
    from umm.model import attention

    monkeypatch.setattr(attention, "EAGER_MASK_PAIRS", 5 * FLEX_BLOCK_SIZE * 4096)
    attention._compiled_block_counts.cache_clear()  # a compile of its own, counted below
    graphs = counters["stats"]["unique_graphs"]
    split_lens, modes, sample_lens = [700, 300, 900, 660], ["causal", "full", "noise", "causal"], [1000, 1560]
    compiled = flex_block_mask(split_lens, modes, sample_lens, torch.device("cpu"), 4096, compile=True)
    eager = flex_block_mask(split_lens, modes, sample_lens, torch.device("cpu"), 4096, compile=False)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(compiled, name), getattr(eager, name)), name
    assert counters["stats"]["unique_graphs"] == graphs + 1 and int(eager.kv_num_blocks.sum()) > 0  # one compile


def test_flex_block_mask_on_an_anchor_like_batch():
    args = bench_train.parse_args(["--tiny", "--device", "cpu", "--layers", "1", "--vit-layers", "1"])
    dims = bench_train.bench_dims(args)
    batch, _, _ = bench_train.build_batch(dims, "anchor", seed=0, tiny=True)
    # The first three samples (t2i, und, edit) keep the dense reference small.
    n = sum(batch.sample_lens[:3])
    splits, taken = 0, 0
    while taken < n:
        taken += batch.split_lens[splits]
        splits += 1
    _check_block_mask(batch.split_lens[:splits], batch.attn_modes[:splits], batch.sample_lens[:3], pad_to=5120)


def _loss_and_grads(model, batch, latent, noise):
    model.zero_grad(set_to_none=True)
    out = model(batch, latent, noise)
    loss = out.ce_per_token.mean() + out.mse_per_token.mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _tiny_bagel():
    torch.manual_seed(0)
    dims = tiny_dims(layers=2)
    model = build_bagel(dims, seed=0)
    with torch.no_grad():
        model.llm2vae.weight.normal_(0, 0.02)  # zero-initialised upstream: give the MSE path gradients
    return model, dims


def _compiled_matches_eager(model, dims, ac: str, graphs: int) -> dict:
    """The mixed batch's loss and gradients eagerly, then with every block compiled under ``ac``: the
    same numbers, from ``graphs`` graphs without a break. Returns the eager gradients."""
    batch = mixed_batch(dims)
    latent = random_latent(batch, dims)
    noise = torch.randn(batch.num_gen, dims.bagel.latent_token_dim)
    eager_loss, eager_grads = _loss_and_grads(model, batch, latent, noise)
    parallel.prepare(model, CPU, ac=ac, compile=True)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in parallel.blocks_in_execution_order(model))
    torch._dynamo.reset()
    counters.clear()
    loss, grads = _loss_and_grads(model, batch, latent, noise)
    assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], eager_grads[n], rtol=1e-4, atol=1e-5, msg=n)
    return eager_grads


def test_compiled_blocks_match_eager_on_cpu():
    # Blocks [vit0, vit1, llm0, llm1]: every2 checkpoints both ViT blocks and llm0, so each kind of
    # block really compiles, as one graph: checkpointed ViT, checkpointed LLM layer, plain LLM layer
    # (a checkpointed block once ran eagerly behind a compile wrapper).
    _compiled_matches_eager(*_tiny_bagel(), ac="every2", graphs=3)


def test_bad_activation_checkpointing_mode_is_one_clear_error():
    model = build_bagel(tiny_dims(layers=1), seed=0)
    with pytest.raises(parallel.SpeedConfigError, match="every2"):
        parallel.prepare(model, CPU, ac="selective-ish", compile=False)


def test_blocks_run_vit_first_then_llm():
    model = build_bagel(tiny_dims(layers=2), seed=0)
    blocks = parallel.blocks_in_execution_order(model)
    vit = list(model.vit_model.vision_model.encoder.layers)
    assert blocks == vit + list(model.layers)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the asynchronous path needs CUDA")
def test_async_host_ema_equals_the_gpu_ema():
    from umm.train.cpu_ema import AsyncCpuEma
    from umm.train.ema import Ema

    params = [(f"p{i}", torch.nn.Parameter(torch.randn(1000, device="cuda"))) for i in range(3)]
    opt = torch.optim.SGD([p for _, p in params], lr=0.1)
    host, ref = AsyncCpuEma(params, 0.9, opt), Ema(params, 0.9)
    for _ in range(5):
        sum((p**2).sum() for _, p in params).backward()
        opt.step()
        opt.zero_grad()
        host.update()
        ref.update()
    got, want = host.full_state(), ref.full_state()
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def test_lora_behind_frozen_embeddings_compiles_one_graph_per_kind_of_block():
    """UniCoT's adapters (real peft) leave the embeddings before the first ViT and LLM layer frozen, so
    the first layer's input would need no gradient and compile a graph of its own; it is made to need
    one, so ViT and LLM compile one graph each, with the adapters' gradients of the eager model."""
    from umm.methods.unicot import UniCoTRecipe

    bagel, dims = _tiny_bagel()
    method = bench_train.lora_method()
    method.lora.r, method.lora.alpha = 4, 8
    model = UniCoTRecipe(method).prepare_model(bagel)
    eager_grads = _compiled_matches_eager(model, dims, ac="full", graphs=2)
    assert any("vision_model.encoder.layers.0" in n and "lora_A" in n for n in eager_grads)
    # A pack without ViT images: the LLM's input comes from frozen embeddings alone, and its layers
    # still run the graph they compiled.
    t2i = pack_plans([t2i_plan(torch.Generator().manual_seed(1))], dims)
    _loss_and_grads(model, t2i, random_latent(t2i, dims), torch.randn(t2i.num_gen, dims.bagel.latent_token_dim))
    assert counters["stats"]["unique_graphs"] == 2
