"""Flex attention's ``kernel_options`` on the bench slice's pack: one layer's forward and backward (28 query
heads, 4 key/value heads, 128 dims, ``bench_train.py``'s perf-anchors batch and its block mask), the
median of 10 timed runs for each set of options, and how far its outputs and gradients are from torch's
default (BENCHMARKS.md, twelfth run).

    python scripts/bench_flex_options.py                                  # the built-in variants
    python scripts/bench_flex_options.py '{"bwd_num_stages": 2}' '{"USE_TMA": true}'  # your own
"""
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from torch.nn.attention.flex_attention import flex_attention  # noqa: E402

import bench_train  # noqa: E402
from umm.model.attention import flex_block_mask  # noqa: E402


def bwd_tiles(m1, n1, stages, warps):
    return {"bwd_BLOCK_M1": m1, "bwd_BLOCK_N1": n1, "bwd_BLOCK_M2": n1, "bwd_BLOCK_N2": m1,
            "bwd_num_stages": stages, "bwd_num_warps": warps}


VARIANTS = {
    "default": {},
    "tma": {"USE_TMA": True},
    "rows_safe": {"ROWS_GUARANTEED_SAFE": True},
    "contiguous": {"BLOCKS_ARE_CONTIGUOUS": True},
    "fwd128x128w8s2": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2},
    "fwd128x64w4s3": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3},
    "bwd64x64s3w4": bwd_tiles(64, 64, 3, 4),
    "bwd64x128s2w8": bwd_tiles(64, 128, 2, 8),
    "bwd64x128s4w8": bwd_tiles(64, 128, 4, 8),
    "bwd32x128s3w4": bwd_tiles(32, 128, 3, 4),
    "bwd128x128s2w8": bwd_tiles(128, 128, 2, 8),
}


def main(argv):
    variants = {f"arg{i}": json.loads(text) for i, text in enumerate(argv)} if argv else VARIANTS
    variants = {"default": {}, **variants}  # the reference every other is compared with
    dev = torch.device("cuda")
    packed, _, _ = bench_train.build_batch(bench_train.bench_dims(bench_train.parse_args([])), "anchor", 0, False)
    mask = flex_block_mask(packed.split_lens, packed.attn_modes, packed.sample_lens, dev)
    length = mask.shape[-2]
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, 128, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
               for heads in (28, 4, 4))
    grad_out = torch.randn(1, 28, length, 128, device=dev, dtype=torch.bfloat16, generator=g)
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "tokens": length}), flush=True)
    reference = None
    for name, options in variants.items():
        torch._dynamo.reset()
        attend = torch.compile(flex_attention, dynamic=False)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        fwd, bwd = [], []
        try:
            t0 = time.perf_counter()
            for i in range(14):  # the first compiles, 3 warm up, 10 are timed
                q.grad = k.grad = v.grad = None
                events[0].record()
                out = attend(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=options or None)
                events[1].record()
                out.backward(grad_out)
                events[2].record()
                torch.cuda.synchronize()
                if i == 0:
                    compile_s = time.perf_counter() - t0
                if i >= 4:
                    fwd.append(events[0].elapsed_time(events[1]))
                    bwd.append(events[1].elapsed_time(events[2]))
        except Exception as exc:  # an option this torch or card refuses: say so, try the next
            if not options:
                raise  # the default is the reference of every other
            print(json.dumps({"name": name, "options": options, "error": repr(exc)[:300]}), flush=True)
            continue
        result = (out.float(), torch.cat([t.grad.flatten().float() for t in (q, k, v)]))
        reference = reference or result
        apart = max((a - b).abs().max().item() for a, b in zip(result, reference))
        print(json.dumps({"name": name, "options": options, "compile_s": round(compile_s, 1),
                          "fwd_ms": round(statistics.median(fwd), 3), "bwd_ms": round(statistics.median(bwd), 3),
                          "max_abs_diff_vs_default": apart}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
