"""The ViT attention of one pack on CUDA: nine 378 px images (729 tokens each, 16 heads of 72), forward
and backward of one layer, as one SDPA call per image (the code before 390caf3: the same class with
every run split into single samples) against one batched call (``PerSampleSdpa.runs``).

    python scripts/bench_vit_attention.py
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from umm.model.attention import PerSampleSdpa  # noqa: E402

n, L, H, D = 9, 729, 16, 72
lens = [L] * n
dev = torch.device("cuda")
q, k, v = (torch.randn(H, n * L, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
batched = PerSampleSdpa(lens, ["full"] * n, lens, dev)
single = PerSampleSdpa(lens, ["full"] * n, lens, dev)
single.runs = [(L, 1, None, False)] * n  # the old way: one call per image
for name, attn in (("per_image", single), ("batched", batched)):
    for _ in range(5):
        attn(q, k, v).sum().backward()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(50):
        attn(q, k, v).sum().backward()
    end.record()
    host_ms = (time.perf_counter() - t0) / 50 * 1e3  # before the sync: the host's own pace
    end.synchronize()
    print(f"{name}: fwd+bwd {start.elapsed_time(end) / 50:.3f} ms GPU, {host_ms:.3f} ms host per layer")
print("max abs diff", (single(q, k, v) - batched(q, k, v)).abs().max().item())
