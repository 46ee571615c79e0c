"""Attention masks and backends against a brute-force per-pair reading of upstream's rules."""
import random

import pytest
import torch

from umm.model.attention import (
    AttentionLayoutError, PackedAttention, allowed, dense_mask, flex_attend, flex_block_mask, pad_splits, token_layout,
)


def brute_force_mask(split_lens, modes, sample_lens):
    """Rules of reference/bagel.md §3.4, pair by pair."""
    sample_of, split_of = [], []
    split = 0
    for s, n in enumerate(sample_lens):
        taken = 0
        while taken < n:
            sample_of += [s] * split_lens[split]
            split_of += [split] * split_lens[split]
            taken += split_lens[split]
            split += 1
    L = len(sample_of)
    mask = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            if sample_of[q] != sample_of[k]:
                continue
            sq, sk = split_of[q], split_of[k]
            if modes[sk] == "noise" and sq != sk:
                continue  # a noised split is seen only by itself
            if sq == sk and modes[sk] in ("full", "noise"):
                mask[q, k] = True  # an image split sees itself fully
            else:
                mask[q, k] = q >= k  # causal otherwise
    return mask


def random_layout(seed, max_samples=4):
    rng = random.Random(seed)
    split_lens, modes, sample_lens = [], [], []
    for _ in range(rng.randint(1, max_samples)):
        n_splits = rng.choice([1, 1, 2, 3, 4])
        lens = [rng.randint(1, 7) for _ in range(n_splits)]
        split_lens += lens
        modes += [rng.choice(["causal", "full", "noise"]) for _ in lens]
        sample_lens.append(sum(lens))
    return split_lens, modes, sample_lens


LAYOUTS = [
    ([8, 8, 8, 7, 12, 6, 6, 7, 6], ["causal", "noise", "full", "causal", "causal", "full", "full", "causal", "noise"], [16, 27, 25]),
    ([5], ["full"], [5]),
    ([6], ["causal"], [6]),
    ([3, 4, 2], ["noise", "noise", "causal"], [9]),
] + [random_layout(s) for s in range(20)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mask_matches_brute_force(layout):
    split_lens, modes, sample_lens = layout
    expected = brute_force_mask(split_lens, modes, sample_lens)
    lay = token_layout(split_lens, modes, sample_lens)
    L = sum(sample_lens)
    idx = torch.arange(L)
    assert torch.equal(allowed(idx[:, None], idx[None, :], lay), expected)
    start = 0
    for n in sample_lens:
        assert torch.equal(dense_mask(lay, start, start + n), expected[start : start + n, start : start + n])
        start += n


def naive_attention(q, k, v, mask):
    """[L, H, D] float64 softmax attention with GQA by repeating kv heads."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sdpa_equals_naive_masked_attention(layout):
    split_lens, modes, sample_lens = layout
    L = sum(sample_lens)
    g = torch.Generator().manual_seed(L)
    q = torch.randn(L, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(L, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    attn = PackedAttention(split_lens, modes, sample_lens, device=torch.device("cpu"), backend="sdpa")
    got = attn(q, k, v)
    torch.testing.assert_close(got, naive_attention(q, k, v, brute_force_mask(split_lens, modes, sample_lens)))


@pytest.mark.parametrize("layout", [
    ([5, 5, 5, 3, 4, 4, 6], ["full"] * 4 + ["causal"] * 2 + ["full"], [5, 5, 5, 3, 4, 4, 6]),  # ViT-like runs
    ([4, 4, 2, 3, 4, 4], ["full", "full", "causal", "noise", "full", "full"], [4, 4, 5, 4, 4]),  # a masked one between
])
def test_samples_of_one_length_run_as_one_batched_call_with_the_same_outputs_and_grads(layout):
    split_lens, modes, sample_lens = layout
    L = sum(sample_lens)
    g = torch.Generator().manual_seed(L)
    q = torch.randn(L, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(L, 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(L, 4, 8, generator=g, dtype=torch.float64)
    attn = PackedAttention(split_lens, modes, sample_lens, device=torch.device("cpu"), backend="sdpa")
    assert len(attn.per_sample.runs) < len(sample_lens)
    ref = naive_attention(q, k, v, brute_force_mask(split_lens, modes, sample_lens))
    got = attn(q, k, v)
    torch.testing.assert_close(got, ref)
    grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


def test_mask_free_samples_never_run_cudnn_attention(monkeypatch):
    """cuDNN's SDPA builds a graph per new shape: each new count of same-size ViT images cost an H100
    run 200-350 ms of host time. Every mask-free SDPA call of a pack runs with cuDNN's backend off;
    masked samples keep torch's choice (without cuDNN, grouped-query heads with a mask fall to the
    math path); the setting is back on after."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    split_lens, modes, sample_lens = [4, 4, 2, 3, 4, 4], ["full", "full", "causal", "noise", "full", "full"], [4, 4, 5, 4, 4]
    q = torch.randn(sum(sample_lens), 4, 8, requires_grad=True)
    attn = PackedAttention(split_lens, modes, sample_lens, device=torch.device("cpu"), backend="sdpa")
    attn(q, q, q).sum().backward()
    assert seen == [False, True, False]  # two images side by side, a masked sample, two images
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_bad_layouts_raise_one_clear_error():
    with pytest.raises(AttentionLayoutError, match="unknown attn modes"):
        token_layout([2], ["bidirectional"], [2])
    with pytest.raises(AttentionLayoutError, match="split_lens sum"):
        token_layout([2, 3], ["causal", "full"], [4])
    with pytest.raises(ValueError, match="needs CUDA"):
        PackedAttention([2], ["causal"], [2], device=torch.device("cpu"), backend="flex")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention needs CUDA")
@pytest.mark.parametrize("layout", LAYOUTS[:6] + [([300, 200, 100, 60], ["causal", "full", "noise", "causal"], [500, 160])])
def test_flex_equals_sdpa_outputs_and_grads(layout):
    split_lens, modes, sample_lens = layout
    L, dev = sum(sample_lens), torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    base = [torch.randn(L, h, 64, generator=g, device=dev) for h in (8, 2, 2)]
    results = []
    for backend in ("sdpa", "flex"):
        q, k, v = (t.clone().requires_grad_(True) for t in base)
        out = PackedAttention(split_lens, modes, sample_lens, device=dev, backend=backend)(q, k, v)
        out.pow(2).sum().backward()
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("pad_to", [None, 1000])
def test_flex_padding_is_invisible_to_real_tokens(pad_to):
    split_lens, modes, sample_lens = LAYOUTS[0]
    L = sum(sample_lens)
    padded = token_layout(*pad_splits(split_lens, modes, sample_lens, pad_to))
    n = padded.document.numel()
    assert n % 128 == 0 and n >= (pad_to or L)
    idx = torch.arange(n)
    mask = allowed(idx[:, None], idx[None, :], padded)
    assert torch.equal(mask[:L, :L], brute_force_mask(split_lens, modes, sample_lens))
    assert not mask[:L, L:].any() and not mask[L:, :L].any()
    assert mask[L:, L:].diagonal().all()


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[3], random_layout(99)])
def test_flex_block_mask_path_equals_sdpa_forward_on_cpu(layout):
    """The flex path's block mask and padding, run by eager flex attention (forward only on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    split_lens, modes, sample_lens = layout
    L = sum(sample_lens)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, L, 8, generator=g)
    k, v = (torch.randn(2, L, 8, generator=g) for _ in range(2))
    block_mask = flex_block_mask(split_lens, modes, sample_lens, "cpu", compile=False)
    got = flex_attend(q, k, v, block_mask, flex_attention)
    sdpa = PackedAttention(split_lens, modes, sample_lens, device=torch.device("cpu"), backend="sdpa")
    expected = sdpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
