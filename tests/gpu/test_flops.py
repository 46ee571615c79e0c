"""The benchmark's batch and FLOP count reproduce reference/perf-anchors.md exactly."""
import pytest

from umm.train import flops as F

from .bench import bench_train


@pytest.fixture(scope="module")
def anchor():
    args = bench_train.parse_args(["--layers", "4", "--vit-layers", "4", "--device", "cpu"])
    dims = bench_train.bench_dims(args)
    batch, latent, _ = bench_train.build_batch(dims, "anchor", seed=0, tiny=False)
    return dims, batch, latent


def test_anchor_batch_has_the_upstream_token_mix(anchor):
    dims, batch, latent = anchor
    c = F.token_counts(batch)
    # perf-anchors.md "Token mix": counts from upstream's own packer.
    assert (c.tokens, c.ce, c.vae, c.mse, c.vit) == (15873, 1005, 9216, 7168, 5103)
    assert batch.num_und == 6657 and batch.num_gen == 9216
    assert c.pairs == 19_778_910  # allowed (q, k) pairs under upstream's mask
    assert len(batch.vit_token_seqlens) == 7 and tuple(latent.shape) == (9, 16, 64, 64)


def test_step_flops_match_perf_anchors(anchor):
    dims, batch, _ = anchor
    assert dims.llm.num_hidden_layers == 4 and dims.vit_num_layers == 4
    t = F.bagel_step_flops(dims, F.token_counts(batch))
    expected = {"llm_layers": 88.779, "lm_head": 3.286, "vit": 1.885, "connector": 0.520,
                "time_embedder": 0.761, "vae_heads": 0.023, "llm_attention": 3.403, "vit_attention": 0.206,
                "total": 98.862}
    for k, v in expected.items():
        assert t[k] / 1e12 == pytest.approx(v, abs=1e-3), k


def test_32k_batch_is_the_mix_twice():
    args = bench_train.parse_args(["--device", "cpu"])
    dims = bench_train.bench_dims(args)
    batch, _, _ = bench_train.build_batch(dims, "32k", seed=0, tiny=False)
    c = F.token_counts(batch)
    assert (c.tokens, c.ce, c.vae, c.pairs) == (2 * 15873, 2 * 1005, 2 * 9216, 2 * 19_778_910)


def test_mfu_and_stock_anchor_formula():
    # perf-anchors.md: upstream recipe A, 98.862 TFLOP in 425.9 ms is 23.5 % of 989 TFLOP/s.
    assert F.mfu(98.862e12, 0.4259) == pytest.approx(0.235, abs=5e-4)
    # Anchor 1 at 16k tokens: 6 P s + 6 L s^2 H.
    assert F.qwen2_anchor_flops(10, 4, 16384, 3584) == 6 * 10 * 16384 + 6 * 4 * 16384**2 * 3584
