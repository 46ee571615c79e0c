"""Inference path: segments run one by one over a KV cache equal one packed pass with the training mask."""
import torch

from umm.model.attention import CachedAttention, KVCache, PackedAttention
from umm.model.io import build_bagel
from tests.model.builders import tiny_dims


def test_cached_segments_equal_one_packed_pass():
    dims = tiny_dims()
    model = build_bagel(dims, seed=2)
    g = torch.Generator().manual_seed(0)
    # Segments: text (causal, und), clean latent image (full; markers und, latents gen), text (causal).
    lens, modes = [6, 6, 5], ["causal", "full", "causal"]
    L, H = sum(lens), dims.llm.hidden_size
    seq = torch.randn(L, H, generator=g)
    pos = torch.tensor([0, 1, 2, 3, 4, 5] + [6] * 6 + [7, 8, 9, 10, 11])
    is_gen = torch.zeros(L, dtype=torch.bool)
    is_gen[7:11] = True
    all_idx = torch.arange(L)
    with torch.no_grad():
        packed = model.llm_forward(
            seq, pos, all_idx[~is_gen], all_idx[is_gen], PackedAttention(lens, modes, [L], device=torch.device("cpu"))
        )
        cache, start, pieces = KVCache(dims.llm.num_hidden_layers), 0, []
        for n, mode in zip(lens, modes):
            sl = slice(start, start + n)
            idx = torch.arange(n)
            gen = is_gen[sl]
            attend = CachedAttention(cache, causal=mode == "causal", update=True)
            pieces.append(model.llm_forward(seq[sl], pos[sl], idx[~gen], idx[gen], attend))
            start += n
        assert cache.length == L
    torch.testing.assert_close(torch.cat(pieces), packed, rtol=1e-5, atol=1e-5)


def test_cache_clone_branches_independently():
    cache = KVCache(1)
    k = torch.randn(3, 2, 4)
    CachedAttention(cache, causal=True, update=True)(torch.randn(3, 4, 4), k, k, 0)
    branch = cache.clone()
    CachedAttention(branch, causal=False, update=True)(torch.randn(2, 4, 4), k[:2], k[:2], 0)
    assert cache.length == 3 and branch.length == 5
