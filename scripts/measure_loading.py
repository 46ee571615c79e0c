"""Measure two ways of filling an FSDP2-sharded meta model from a model dir on one node (issue 17 item 1).

  rows:      today's path: every rank reads only its own rows of each tensor (umm/train/materialize.py,
             RowReader);
  broadcast: rank 0 reads each tensor whole and scatters the row blocks to the others, one tensor at
             a time (so no rank holds more than one whole tensor beyond its share).

Both go through ``materialize()`` into the same model (built on the meta device, all parameters
trainable in fp32, FSDP2 over ``--nproc`` gloo CPU ranks); only the reader differs. Each way runs in
its own torchrun launch (peak RSS is per process), first with the weights evicted from the page cache
(fsync + POSIX_FADV_DONTNEED, so the disk reads count), then with them cached. One JSON line per way
and setting: load wall time, and per rank the peak RSS increase, the bytes it holds, the bytes it read
(``read_mib``: through read calls; ``disk_mib``: from storage), and whether its loaded shards are
bitwise equal to the other way's.

    python scripts/measure_loading.py [--nproc 2] [--model-path DIR] [--out /tmp/umm_loading]

Without ``--model-path`` it builds a random model dir (``--hidden``, ``--intermediate``, ``--layers``;
default 970 MiB of fp32 weights) with the tests' builder, once.

On the 2-core CPU box with 2 and 4 gloo ranks the per-rank reads were faster in every setting and
held no more memory (issue 17), so the trainer keeps them and the scattering reader lives only here.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from umm.train.materialize import RowReader  # noqa: E402

WAYS = ("rows", "broadcast")


class ScatteringReader:
    """Rank 0 reads each tensor's rows whole and sends every rank its own block (dist.scatter); the
    other ranks read only the header (a few KB) for keys and shapes. ``rows`` is a collective: every
    rank calls it for the same key in the same order, as ``materialize`` does."""

    def __init__(self, path):
        self._reader = RowReader(path)
        self.metadata = self._reader.metadata

    def __enter__(self) -> "ScatteringReader":
        return self

    def __exit__(self, *exc) -> None:
        self._reader.__exit__(*exc)

    def keys(self):
        return self._reader.keys()

    def shape(self, key):
        return self._reader.shape(key)

    def dtype(self, key):
        return self._reader.dtype(key)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        # Each rank's range (FSDP2's chunks, or all rows for a replicated tensor) is known only to it.
        ranges = [torch.empty(2, dtype=torch.int64) for _ in range(dist.get_world_size())]
        dist.all_gather(ranges, torch.tensor([start, stop]))
        ranges = [tuple(r.tolist()) for r in ranges]
        shape, dtype = self.shape(key), self.dtype(key)
        row_bytes = (torch.Size(shape[1:]).numel() if shape else 1) * torch.empty((), dtype=dtype).element_size()
        size = lambda r: (r[1] - r[0] if shape else 1) * row_bytes  # noqa: E731  (a 0-dim tensor is one row)
        block = max(size(r) for r in ranges)
        out = torch.empty(block, dtype=torch.uint8)  # sent as bytes: gloo has no bool, all share one path
        if len(set(ranges)) == 1:
            if dist.get_rank() == 0:
                out = self._reader.rows(key, start, stop).reshape(-1).view(torch.uint8)
            dist.broadcast(out, src=0)
        else:
            pieces = None
            if dist.get_rank() == 0:
                lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
                whole = self._reader.rows(key, lo, hi)
                pieces = [whole[a - lo:b - lo].reshape(-1).view(torch.uint8) for a, b in ranges]
                # gloo scatters equal sizes: a short last block is padded (a copy of that block only)
                pieces = [p if p.numel() == block else torch.cat([p, p.new_zeros(block - p.numel())]) for p in pieces]
            dist.scatter(out, pieces, src=0)
            del pieces
        mine = out[:size((start, stop))].view(dtype)
        return mine.reshape(shape) if not shape else mine.reshape(stop - start, *shape[1:])

    def read_into(self, key: str, start: int, stop: int, into: torch.Tensor) -> int:
        rows = self.rows(key, start, stop)
        into.copy_(rows.reshape(into.shape))
        return rows.numel() * rows.element_size()


# ---- worker (one torchrun rank) ----------------------------------------------------------------

def _io() -> Dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def worker(way: str, model_path: str, out: str) -> None:
    from umm.model.io import build_on_meta, read_model_dims, weights_path
    from umm.train import distributed as D
    from umm.train import parallel
    from umm.train.materialize import WeightFile, materialize, persistent_tensors
    from umm.train.save_metrics import host_peak_gib, reset_host_peak
    from umm.train.state_dict import is_adapter_key, upstream_key

    env = D.setup("cpu")
    model = parallel.prepare(build_on_meta(read_model_dims(model_path)), env, compile=False, param_dtype=None)
    files = [WeightFile(weights_path(model_path), lambda n: None if is_adapter_key(n) else upstream_key(n),
                        open=RowReader if way == "rows" else ScatteringReader)]
    gc.collect()
    dist.barrier()
    if not reset_host_peak():
        raise RuntimeError("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    rss0 = host_peak_gib()  # right after the reset the peak is the current RSS
    io0, t0 = _io(), time.perf_counter()
    materialize(model, files, env.device)
    dist.barrier()
    seconds = time.perf_counter() - t0
    peak, io1 = host_peak_gib(), _io()
    shards = {n: D.local(t) for n, t in persistent_tensors(model)}
    row = {
        "rank": env.rank, "load_s": seconds, "peak_rss_increase_mib": (peak - rss0) * 1024,
        "held_mib": sum(t.numel() * t.element_size() for t in shards.values()) / 2**20,
        "read_mib": (io1["rchar"] - io0["rchar"]) / 2**20, "disk_mib": (io1["read_bytes"] - io0["read_bytes"]) / 2**20,
        "digests": {n: hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
                    for n, t in shards.items()},
    }
    rows = D.all_gather_objects(row, env)
    if env.is_main:
        Path(out).write_text(json.dumps(rows))
    D.teardown(env)


# ---- launcher ------------------------------------------------------------------------------------

def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages (a freshly written file) cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 * 2**20):
            pass


def launch(way: str, model_path: Path, nproc: int, out: Path) -> List[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(Path(__file__).resolve()), "--worker", way, str(model_path), str(out)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"{way} failed:\n{proc.stdout[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
        from umm.train.worker import exit_now
        exit_now(0)  # a finished gloo rank can abort in interpreter teardown (see exit_now)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2, help="gloo CPU ranks")
    ap.add_argument("--model-path", help="a model dir (default: build one under --out)")
    ap.add_argument("--out", default="/tmp/umm_loading")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()

    from umm.model.io import weights_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    built = out / f"model_h{args.hidden}_i{args.intermediate}_l{args.layers}"
    model_path = Path(args.model_path) if args.model_path else built
    if not args.model_path and not (model_path / "ema.safetensors").is_file():
        from tests.train.conftest import build_model_dir

        t = time.time()
        build_model_dir(model_path, hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_hidden_layers=args.layers)
        print(f"built {model_path} in {time.time() - t:.0f} s", file=sys.stderr)
    weights = weights_path(model_path)
    weights_mib = weights.stat().st_size / 2**20
    for cache in ("cold", "warm"):
        results = {}
        for way in WAYS:
            (evict if cache == "cold" else warm)(weights)
            results[way] = launch(way, model_path, args.nproc, out / f"{way}_{cache}.json")
        for way in WAYS:
            other = results[WAYS[1 - WAYS.index(way)]]
            ranks = [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items() if k != "digests"}
                     for r in results[way]]
            print(json.dumps({
                "way": way, "cache": cache, "nproc": args.nproc, "weights_mib": round(weights_mib, 1),
                "load_s": round(max(r["load_s"] for r in results[way]), 3),
                "bitwise_equal_to_other_way": all(a["digests"] == b["digests"] for a, b in zip(results[way], other)),
                "ranks": [{k: v for k, v in r.items() if k != "load_s"} for r in ranks],
            }), flush=True)


if __name__ == "__main__":
    main()
