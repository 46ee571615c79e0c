"""Time the part of a checkpoint that stalls training under train.async_save: copying a rank's shard
tensors from the GPU to host memory (umm/train/sharded_state.py's HostCopies), against a per-tensor
pinned allocation (torch's caching host allocator, as umm did before) and a plain ``.to("cpu")`` (a
synchronous save). The tensors are shaped like UniCoT's LoRA shards of BAGEL-7B-MoT (r 256 on 7
projections of both experts in 28 layers: fp32 weights, two AdamW moments, fp32 masters), scaled by
``--layers``. Prints one JSON line: seconds and host-memory growth (GiB) of each way, first and second
save. ``--overlap`` also times bf16 matmuls on the GPU while another thread page-locks a buffer of the
shard's size (cudaHostRegister): whether that cost could hide behind training. ``--register`` times
page-locking alone, three ways: a fresh buffer, one whose pages were touched first (as HostCopies
does: a parallel fill faults them on every core), and one touched first in transparent huge pages.

    python scripts/bench_save_staging.py --layers 28 --overlap --register
"""
from __future__ import annotations

import argparse
import gc
import json
import mmap
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from umm.train.save_metrics import resident_gib  # noqa: E402
from umm.train.sharded_state import HostCopies  # noqa: E402

# BAGEL-7B-MoT's projections (in, out): q, k, v, o, gate, up, down.
PROJECTIONS = [(3584, 3584), (3584, 512), (3584, 512), (3584, 3584), (3584, 18944), (3584, 18944), (18944, 3584)]


def shard_tensors(layers: int, rank: int, device: str) -> dict:
    out = {}
    for group in ("model", "master", "exp_avg", "exp_avg_sq"):
        for layer in range(layers):
            for expert in ("und", "gen"):
                for i, (n_in, n_out) in enumerate(PROJECTIONS):
                    for ab, shape in (("A", (rank, n_in)), ("B", (n_out, rank))):
                        out[f"{group}/{layer}.{expert}.{i}.{ab}"] = torch.ones(shape, device=device)
    return out


def timed(fn) -> tuple:
    gc.collect()
    before = resident_gib()
    t0 = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, round(time.perf_counter() - t0, 3), round(resident_gib() - before, 2)


def matmul_ms(a: torch.Tensor, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        a @ a
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / n


def register_beside_matmuls(nbytes: int) -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    matmul_ms(a, 20)
    alone = [round(matmul_ms(a, 100), 3) for _ in range(3)]
    flat = torch.empty(nbytes, dtype=torch.uint8)
    took = {}

    def register():
        t0 = time.perf_counter()
        took["rc"] = int(torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), nbytes, 0))
        took["register_s"] = round(time.perf_counter() - t0, 3)

    thread = threading.Thread(target=register)
    thread.start()
    during = []
    while thread.is_alive():
        during.append(round(matmul_ms(a, 50), 3))
    thread.join()
    torch.cuda.cudart().cudaHostUnregister(flat.data_ptr())
    return {"matmul_ms_alone": alone, "matmul_ms_while_registering": during, **took}


def register_variants(nbytes: int) -> dict:
    """Seconds to page-lock ``nbytes`` of host memory: fresh, pages touched first, and touched first
    in huge pages (madvise; the kernel may decline), each with the touching timed apart."""
    cudart, out = torch.cuda.cudart(), {}
    for way in ("fresh", "touched", "touched_huge_pages"):
        if way == "touched_huge_pages":
            region = mmap.mmap(-1, nbytes)
            region.madvise(mmap.MADV_HUGEPAGE)
            flat = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive
        else:
            flat = torch.empty(nbytes, dtype=torch.uint8)
        row = {}
        if way != "fresh":
            t0 = time.perf_counter()
            flat.fill_(0)
            row["touch_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        row["rc"] = int(cudart.cudaHostRegister(flat.data_ptr(), nbytes, 0))
        row["register_s"] = round(time.perf_counter() - t0, 3)
        cudart.cudaHostUnregister(flat.data_ptr())
        out[way] = row
        del flat
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overlap", action="store_true", help="page-locking beside GPU work (CUDA only)")
    p.add_argument("--register", action="store_true", help="page-locking alone, three ways (CUDA only)")
    a = p.parse_args(argv)
    tensors = shard_tensors(a.layers, a.rank, a.device)
    result = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "tensors": len(tensors),
              "shard_gib": round(sum(t.numel() * t.element_size() for t in tensors.values()) / 2**30, 2)}

    copies = HostCopies(pin=a.device == "cuda")
    for save in ("first", "second"):
        _, s, grew = timed(lambda: copies.stage(tensors))
        result[f"one_buffer_{save}"] = {"s": s, "host_gib_added": grew}
    copies.release()
    del copies

    plain, s, grew = timed(lambda: {k: t.to("cpu") for k, t in tensors.items()})
    result["to_cpu"] = {"s": s, "host_gib_added": grew}
    del plain

    if a.device == "cuda":  # umm before: one pinned tensor each from torch's caching host allocator
        buffers = {}

        def per_tensor():
            for k, t in tensors.items():
                if k not in buffers:
                    buffers[k] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                buffers[k].copy_(t, non_blocking=True)

        for save in ("first", "second"):
            _, s, grew = timed(per_tensor)
            result[f"pinned_per_tensor_{save}"] = {"s": s, "host_gib_added": grew}
        del buffers
        del tensors
        if a.overlap:
            result["overlap"] = register_beside_matmuls(int(result["shard_gib"] * 2**30))
        if a.register:
            result["register"] = register_variants(int(result["shard_gib"] * 2**30))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
