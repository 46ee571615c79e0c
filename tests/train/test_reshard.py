"""Resume on another world size, at the level of the shard files: what N FSDP2 ranks write
(umm/train/sharded_state.py, keyed as the trainer keys it) is read back bitwise by each of M ranks.

Without processes: each simulated rank is this process under a fake process group (torch's, no
peers, no collectives), so FSDP2 itself shards the tensors, and the writer and reader see the real
DTensors. tests/train/test_processes.py resumes 2 → 1 → 2 with real processes and training.
"""
import contextlib

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.testing._internal.distributed.fake_pg import FakeStore

from umm.train.checkpoint import CheckpointError
from umm.train.distributed import local
from umm.train.sharded_state import HostCopies, ShardReader, ShardWriter, shard_file

# torch.chunk (FSDP2's dim-0 split) of these over 8, 4, 3 and 2 ranks gives uneven pieces and ranks
# with no rows: (10, 3) over 4 is 3+3+3+1, (5, 4) over 4 is 2+2+1+0, (3,) over 8 leaves five ranks empty.
SHAPES = {"a": (10, 3), "b": (3,), "c": (7, 2), "d": (5, 4)}
_gen = torch.Generator().manual_seed(0)
# The fp32 masters, their EMA and AdamW moments, distinct values per kind; the step counts are 0-dim.
ORIGINALS = {kind: {n: torch.randn(shape, generator=_gen) for n, shape in SHAPES.items()}
             for kind in ("model", "ema", "exp_avg", "exp_avg_sq")}
STEPS = {n: torch.tensor(3.0 + i) for i, n in enumerate(SHAPES)}


def keys(name: str):
    """(kind, checkpoint key) of each sharded tensor of parameter ``name``, as the trainer names them."""
    return [("model", f"model/{name}"), ("ema", f"ema/{name}"),
            ("exp_avg", f"optim/{name}.exp_avg"), ("exp_avg_sq", f"optim/{name}.exp_avg_sq")]


@contextlib.contextmanager
def fsdp2_rank(rank: int, world_size: int):
    """This process as ``rank`` of ``world_size``, yielding FSDP2's shards (DTensors) of ORIGINALS."""
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        # Meshes compare equal whatever the rank, and torch 2.13 gave FSDP2's DTensors an equal mesh
        # cached from an earlier simulated rank (so that rank's rows): a dim name per rank keeps them
        # apart, and the assert below checks it.
        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=(f"as_rank{rank}",))
        sharded = {}
        for kind, tensors in ORIGINALS.items():
            module = nn.ParameterDict({n: nn.Parameter(t.clone()) for n, t in tensors.items()})
            fully_shard(module, mesh=mesh)
            sharded[kind] = dict(module.items())
            assert all(tuple(p.device_mesh.get_coordinate()) == (rank,) for p in sharded[kind].values())
        yield sharded
    finally:
        dist.destroy_process_group()


def write(state_dir, world_size: int, copies=None) -> None:
    """Every rank's shard file, added as umm/train/loop.py adds them (the EMA as a plain local shadow)."""
    for rank in range(world_size):
        with fsdp2_rank(rank, world_size) as sharded:
            writer = ShardWriter(rank, copies)
            for name, w in sharded["model"].items():
                writer.add(f"model/{name}", w.detach())
                writer.add(f"ema/{name}", local(sharded["ema"][name]).detach().clone(), like=w)
                for moment in ("exp_avg", "exp_avg_sq"):
                    writer.add(f"optim/{name}.{moment}", sharded[moment][name].detach())
                writer.add(f"optim/{name}.step", STEPS[name])
            writer.to_host()  # into ``copies`` when given, as the trainer stages an async save
            writer.write(state_dir)


@pytest.mark.parametrize("saved_by,resumed_by", [(8, 4), (4, 8), (3, 2)], ids=["8to4", "4to8", "3to2"])
def test_every_new_rank_reads_its_fsdp2_rows_bitwise_from_another_world_sizes_shards(tmp_path, saved_by, resumed_by):
    write(tmp_path, saved_by)
    if saved_by == 8:  # fewer rows than ranks: a rank FSDP2 left without rows of a tensor writes none of it
        from safetensors import safe_open
        with safe_open(str(tmp_path / shard_file(3)), "pt") as f3, safe_open(str(tmp_path / shard_file(7)), "pt") as f7:
            assert sorted(k for k in f3.keys() if k.startswith("model/")) == ["model/a", "model/c", "model/d"]
            assert list(f7.keys()) == []
    with ShardReader(tmp_path, saved_by) as shards:
        for rank in range(resumed_by):
            with fsdp2_rank(rank, resumed_by) as sharded:
                for name, w in sharded["model"].items():
                    for kind, key in keys(name):
                        got, want = shards.like(key, w), local(sharded[kind][name])
                        assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want), (key, rank)
                    step = shards.full(f"optim/{name}.step")  # rank 0 wrote it; every rank reads it
                    assert step.shape == () and torch.equal(step, STEPS[name])


def test_a_missing_rank_file_or_rows_in_no_file_stop_with_one_line(tmp_path):
    write(tmp_path, 4)
    # As if meta.json named 3 ranks: rank 3's rows of a (9 of 10) are in no file read.
    with pytest.raises(CheckpointError, match=r"no file in .* holds rows 9\.\. of model/a \(a rank's shard") as e:
        ShardReader(tmp_path, 3)
    assert "\n" not in str(e.value)
    (tmp_path / shard_file(2)).unlink()
    with pytest.raises(CheckpointError, match=r"shards\.rank00002\.safetensors is damaged: it is missing") as e:
        ShardReader(tmp_path, 4)
    assert "\n" not in str(e.value)


def test_shards_staged_in_one_reused_host_buffer_are_the_same_files(tmp_path):
    """train.async_save's path: each rank's pieces are copied into one host buffer (the simulated ranks
    share it, so it is laid out anew for each) and written from it in one go: the same bytes as the
    files streamed tensor by tensor."""
    copies = HostCopies(pin=False)
    (tmp_path / "staged").mkdir(), (tmp_path / "plain").mkdir()
    write(tmp_path / "staged", 4, copies)
    write(tmp_path / "plain", 4)
    for rank in range(4):
        staged, plain = ((tmp_path / d / shard_file(rank)).read_bytes() for d in ("staged", "plain"))
        assert staged == plain, rank
    # The next save of the same pieces reuses the buffer, which holds them once, back to back (not
    # each rounded up to a power of two, as a caching host allocator does).
    pieces = {**{f"model/{n}": t for n, t in ORIGINALS["model"].items()}, "step": STEPS["a"],
              "bf16": torch.ones(5, 3, dtype=torch.bfloat16).t()}
    first = copies.stage(pieces)
    buffer = copies.flat.data_ptr()
    again = copies.stage({k: t + 1 if t.is_floating_point() else t for k, t in pieces.items()})
    assert copies.flat.data_ptr() == buffer and again["model/a"].data_ptr() == first["model/a"].data_ptr()
    assert torch.equal(again["model/a"], ORIGINALS["model"]["a"] + 1) and again["bf16"].shape == (3, 5)
    nbytes = sum(t.numel() * t.element_size() for t in pieces.values())
    assert copies.flat.numel() == nbytes


def test_bench_save_staging_runs_on_cpu():
    # scripts/bench_save_staging.py (GPU numbers in BENCHMARKS.md) on CPU: one buffer, reused.
    from tests.scripts import load_script

    r = load_script("bench_save_staging").main(["--layers", "1", "--rank", "4", "--device", "cpu"])
    assert r["tensors"] == 4 * 2 * 7 * 2 and r["one_buffer_second"]["host_gib_added"] == 0.0


def test_a_staged_writer_writes_its_copies_while_the_live_tensors_move_on(tmp_path):
    # What train.async_save relies on: after to_host(), training may change the tensors; the file holds
    # the values at staging. A writer that staged nothing writes its own tensors, not the buffer's.
    from safetensors.torch import load_file

    copies = HostCopies(pin=False)
    live = {"w": torch.zeros(4), "half": torch.zeros(3, dtype=torch.bfloat16), "n": torch.tensor(1)}
    staged = ShardWriter(0, copies)
    for key, t in live.items():
        staged.add(key, t)
    staged.to_host()
    for t in live.values():
        t.add_(7)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    staged.write(tmp_path / "a")
    unstaged = ShardWriter(0, copies)
    for key, t in live.items():
        unstaged.add(key, t)
    unstaged.write(tmp_path / "b")
    before, after = (load_file(str(tmp_path / d / shard_file(0))) for d in ("a", "b"))
    assert all(torch.equal(before[k], live[k] - 7) and torch.equal(after[k], live[k]) for k in live)


def test_a_buffer_prepared_beside_training_is_the_one_the_first_save_copies_into():
    # train.async_save lays its buffer out in a thread after the first step: the save with the same
    # pieces copies into it as laid out (one allocation); other pieces get a buffer of their own.
    copies = HostCopies(pin=False)
    allocations = []
    allocate = copies._allocate
    copies._allocate = lambda *a: (allocations.append(a[1]), allocate(*a))
    pieces = {"model/a": torch.randn(6, 2), "optim/a.exp_avg": torch.randn(6, 2), "bf16": torch.ones(3, dtype=torch.bfloat16)}
    nbytes = sum(t.numel() * t.element_size() for t in pieces.values())
    copies.prepare({k: (t.shape, t.dtype) for k, t in pieces.items()})
    staged = copies.stage(pieces)
    assert allocations == [nbytes] and all(torch.equal(staged[k], t) for k, t in pieces.items())
    copies.prepare({"model/a": (torch.Size([7, 2]), torch.float32)})
    copies.stage(pieces)
    assert allocations == [nbytes, 7 * 2 * 4, nbytes] and copies.flat.numel() == nbytes
    copies.release()
    assert copies.flat is None
