"""The trainer's data stream: datasets -> recipe plans -> token-budget batches -> ``PackedBatch``.

``build_loader(cfg, recipe, tokenizer, special, rank=, world_size=)`` returns a ``BatchStream``: an
endless iterator of packed batches with ``state_dict()`` / ``load_state_dict()`` (loading the state
saved after batch k makes the stream yield exactly batches k+1, k+2, ... again) and
``skip_stats()`` (counters for metrics.jsonl).

Streams: rank r with W = max(1, data.num_workers) workers owns the W streams r*W .. r*W+W-1 of
world_size*W; each stream reads its own rows (umm/data/mix.py), so ranks and workers never share
one. With workers, torch's DataLoader hands out batches round-robin; every batch carries its
stream's state, so the saved position is exact however far the workers have read ahead.

Bad data (``data.on_error``): ``raise`` stops at the first bad row with its file and line; ``skip``
logs and counts each one and raises ``DataSkipLimitError`` once more than ``data.max_skip_fraction``
of the rows read were skipped (judged over at least 100 rows, so one early bad row is tolerated).
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import random
import signal
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from umm import faults
from umm.config.schema import DataConfig, RootConfig
from umm.data.budget import Sample, SampleKey, TokenBudget, plan_num_tokens
from umm.data.datasets import DataError, Manifest
from umm.data.mix import MixEntry, RowOrder, WeightedMix, derive_seed
from umm.data.packing import PackedBatch, PackGeometry, SpecialTokens, pack
from umm.data.plan import ImageItem, SamplePlan, TextItem
from umm.data.transforms import ImageTransform
from umm.errors import DataConfigError, UmmError

log = logging.getLogger("umm.data")

STATE_VERSION = 1
# Rows read before max_skip_fraction is judged.
SKIP_GRACE_ROWS = 100


class DataSkipLimitError(UmmError, RuntimeError):
    """Too many bad rows were skipped."""


class GeometryError(UmmError, ValueError):
    """A transform's images would not fit the model's token grid."""


class DataStateError(UmmError, ValueError):
    """A saved data position that does not fit this loader."""


@dataclass
class StreamSpec:
    stream: int  # global stream id
    num_streams: int


def geometry_from_config(cfg: RootConfig) -> PackGeometry:
    """Token geometry from the model config (trainers pass the loaded model's own when they have it)."""
    m = cfg.model
    return PackGeometry(
        vit_patch_size=m.vit.patch_size,
        vit_max_num_patch_per_side=m.vit_max_num_patch_per_side,
        latent_downsample=2 ** (len(m.ae.ch_mult) - 1) * m.latent_patch_size,
        max_latent_size=m.max_latent_size,
    )


def check_geometry(data: DataConfig, geometry: PackGeometry) -> None:
    """The transforms (the data config's and each dataset's own) must produce images on the model's token grid."""
    vae = (geometry.latent_downsample, geometry.max_latent_size, "AE downsample x latent_patch_size")
    vit = (geometry.vit_patch_size, geometry.vit_max_num_patch_per_side, "ViT patch size")
    checks = [("data.vae_transform", data.vae_transform, *vae), ("data.vit_transform", data.vit_transform, *vit)]
    for name, ds in data.datasets.items():
        checks += [(f"data.datasets.{name}.{key}", tcfg, *grid)
                   for key, tcfg, grid in (("vae_transform", ds.vae_transform, vae), ("vit_transform", ds.vit_transform, vit))
                   if tcfg is not None]
    for name, tcfg, stride, max_side, what in checks:
        if tcfg.stride != stride:
            raise GeometryError(f"{name}.stride is {tcfg.stride} but the model's {what} is {stride}; set it to {stride}")
        if tcfg.max_size // stride > max_side:
            raise GeometryError(
                f"{name}.max_size {tcfg.max_size} exceeds the model's position grid ({max_side} x {stride} px); "
                f"use at most {max_side * stride}"
            )


class SampleSource:
    """Rows -> planned samples for one stream, with the bad-data policy and its counters."""

    def __init__(self, data: DataConfig, recipe, tokenizer, spec: StreamSpec,
                 held_out: Optional[Dict[str, FrozenSet[int]]] = None):
        if not data.datasets:
            raise DataConfigError(f"data config {data.name!r} lists no datasets (data.datasets is empty): give them "
                                  "on the command line, data.datasets={name: {kind: t2i, path: file.jsonl}}, or in "
                                  "a file, data.file=<yaml>")
        self.data, self.recipe, self.tokenizer = data, recipe, tokenizer
        self.manifests: Dict[str, Manifest] = {}
        self.orders: Dict[str, RowOrder] = {}
        # Rows of each dataset that never train (the sampler shows them: umm/train/sample_prompts.py).
        self.held_out: Dict[str, FrozenSet[int]] = {}
        # (VAE, ViT) transform of each dataset: its own, else the data config's.
        self.transforms: Dict[str, Tuple[ImageTransform, ImageTransform]] = {}
        for name, ds in data.datasets.items():
            if ds.kind not in recipe.kinds:
                raise DataConfigError(
                    f"data.datasets.{name}.kind is {ds.kind!r}, which recipe {recipe.name!r} does not train on; "
                    f"it accepts {list(recipe.kinds)}"
                )
            manifest = Manifest(name, ds.kind, ds.path, root=data.root, allow_outside_root=data.allow_outside_root,
                                image_dir=ds.image_dir, max_image_pixels=data.max_image_pixels)
            self.manifests[name] = manifest
            self.held_out[name] = (held_out or {}).get(manifest.path, frozenset())
            self.transforms[name] = (ImageTransform(ds.vae_transform or data.vae_transform),
                                     ImageTransform(ds.vit_transform or data.vit_transform))
            num_rows = ds.num_used if ds.num_used is not None else len(manifest)
            self.orders[name] = RowOrder(name, num_rows, seed=data.seed, stream=spec.stream,
                                         num_streams=spec.num_streams, blocks=manifest.blocks)
        entries = [MixEntry(n, float(ds.weight), bool(ds.is_mandatory)) for n, ds in data.datasets.items()]
        self.mix = WeightedMix(entries, seed=data.seed, stream=spec.stream)
        self.seen = 0
        self.skipped: Counter = Counter()

    def build(self, key: SampleKey) -> Sample:
        """The sample of ``key``; a pure function of the key and the config."""
        sample = self.planned(key)
        if sample.num_tokens > self.data.max_num_tokens_per_sample:
            name, _, row = key
            manifest = self.manifests[name]
            raise DataError(manifest.source(row % len(manifest)), f"sample has {sample.num_tokens} tokens, over "
                            f"data.max_num_tokens_per_sample={self.data.max_num_tokens_per_sample}", "too_long")
        return sample

    def planned(self, key: SampleKey) -> Sample:
        """``build`` without the length limit (``umm data check`` measures samples over it)."""
        name, epoch, row = key
        manifest = self.manifests[name]
        example = manifest.read(row % len(manifest))  # num_used may repeat rows
        rng = random.Random(derive_seed(self.data.seed, "sample", name, epoch, row))
        vae, vit = self.transforms[name]
        ctx = self.recipe.context(example, rng=rng, tokenizer=self.tokenizer, vae_transform=vae,
                                  vit_transform=vit, max_resize_factor=self.data.max_resize_factor)
        plan = self.recipe.plan(example, ctx)
        self._roll(plan, random.Random(derive_seed(self.data.seed, "roll", name, epoch, row)))
        n = plan_num_tokens(plan, vae_stride=vae.stride, vit_stride=vit.stride)
        return Sample(key=key, plan=plan, num_tokens=n)

    def _roll(self, plan: SamplePlan, rng: random.Random) -> None:
        """Decide cfg dropout and timestep logits per sample, so the token budget counts the tokens
        that are really packed and a sample is the same whichever batch it lands in."""
        drop = self.recipe.cfg_dropout
        for item in plan.items:
            if item.enable_cfg and item.cfg_dropped is None:
                prob = drop.text if isinstance(item, TextItem) else drop.vit if item.role == "vit" else drop.vae
                item.cfg_dropped = rng.random() < prob
            if isinstance(item, ImageItem) and item.role == "vae_noised" and item.timestep_logit is None:
                item.timestep_logit = rng.gauss(0.0, 1.0)

    def next_from(self, name: str) -> Sample:
        while True:
            key = (name, *self.orders[name].next())
            if key[2] % len(self.manifests[name]) in self.held_out[name]:
                continue  # a function of the key, so a resumed run skips the same rows
            self.seen += 1
            faults.fire("data", row=self.seen)
            try:
                return self.build(key)
            except DataError as exc:
                if self.data.on_error == "raise":
                    raise DataError(exc.source, f"{exc.message} (data.datasets.{name}; set data.on_error=skip "
                                    "to skip bad rows)", exc.reason) from None
                self._skip(exc)

    def _skip(self, exc: DataError) -> None:
        self.skipped[exc.reason] += 1
        total = sum(self.skipped.values())
        log.warning("skipping bad sample (%s, %d skipped so far): %s", exc.reason, total, exc)
        allowed = self.data.max_skip_fraction * max(self.seen, SKIP_GRACE_ROWS)
        if total > allowed:
            raise DataSkipLimitError(
                f"skipped {total} of {self.seen} rows ({dict(self.skipped)}), more than "
                f"data.max_skip_fraction={self.data.max_skip_fraction}; last: {exc}"
            )

    def draw(self) -> Sample:
        return self.next_from(self.mix.choose())

    def mandatory(self) -> List[Sample]:
        return [self.next_from(name) for name in self.mix.mandatory]

    def state_dict(self) -> Dict[str, Any]:
        return {
            "orders": {n: o.state_dict() for n, o in self.orders.items()},
            "mix": self.mix.state_dict(),
            "seen": self.seen,
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if set(state["orders"]) != set(self.orders):
            raise DataStateError(
                f"saved data position is for datasets {sorted(state['orders'])}, this config has "
                f"{sorted(self.orders)}"
            )
        for name, order_state in state["orders"].items():
            self.orders[name].load_state_dict(order_state)
        self.mix.load_state_dict(state["mix"])
        self.seen = int(state["seen"])
        self.skipped = Counter(state["skipped"])


class PlanStream:
    """Batches of planned samples for one stream (no packing): the deterministic core of the loader."""

    def __init__(self, data: DataConfig, recipe, tokenizer, spec: StreamSpec,
                 held_out: Optional[Dict[str, FrozenSet[int]]] = None):
        self.spec = spec
        self.source = SampleSource(data, recipe, tokenizer, spec, held_out)
        self.budget = TokenBudget(
            expected_num_tokens=data.expected_num_tokens, max_num_tokens=data.max_num_tokens,
            max_num_tokens_per_sample=data.max_num_tokens_per_sample,
            prefer_buffer_before=data.prefer_buffer_before, max_buffer_size=data.max_buffer_size,
        )
        self.batches = 0

    def next_batch(self) -> List[Sample]:
        batch = self.budget.fill(self.source.draw, self.source.mandatory)
        self.batches += 1
        return batch

    def state_dict(self) -> Dict[str, Any]:
        return {
            "stream": self.spec.stream,
            "batches": self.batches,
            "source": self.source.state_dict(),
            "buffer": [list(s.key) for s in self.budget.buffer],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["stream"] != self.spec.stream:
            raise DataStateError(f"saved state of stream {state['stream']} loaded into stream {self.spec.stream}")
        self.batches = int(state["batches"])
        self.source.load_state_dict(state["source"])
        self.budget.buffer = [self.source.build((k[0], int(k[1]), int(k[2]))) for k in state["buffer"]]


class _PackedStreams(IterableDataset):
    """What each DataLoader worker (or the main process) runs: one stream, packing its batches."""

    def __init__(self, data, recipe, tokenizer, special, geometry, *, rank, num_workers, world_size,
                 states: List[Optional[Dict]], offset: int, held_out=None):
        super().__init__()
        self.args = (data, recipe, tokenizer)
        self.held_out = held_out
        self.special, self.geometry = special, geometry
        self.rank, self.num_workers, self.world_size = rank, num_workers, world_size
        self.states, self.offset = states, offset

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # Round-robin restarts at worker 0 after a resume; worker w plays the stream that is next in line.
        local = (worker + self.offset) % self.num_workers
        spec = StreamSpec(self.rank * self.num_workers + local, self.world_size * self.num_workers)
        stream = PlanStream(*self.args, spec, self.held_out)
        if self.states[local] is not None:
            stream.load_state_dict(self.states[local])
        data, recipe = self.args[0], self.args[1]
        while True:
            samples = stream.next_batch()
            # Every random choice was made per sample (SampleSource._roll); the generator is a fallback.
            generator = torch.Generator().manual_seed(derive_seed(data.seed, "pack", spec.stream, stream.batches))
            batch = pack([s.plan for s in samples], special=self.special, geometry=self.geometry,
                         generator=generator, cfg_dropout=recipe.cfg_dropout)
            yield local, batch, stream.state_dict()


def _identity(item):
    return item


def _ignore_stop_signals(_worker_id: int) -> None:
    # SLURM, the launcher and a terminal's Ctrl-C signal the whole process group: a worker ended by
    # SIGTERM, or by SIGINT's KeyboardInterrupt, would crash the trainer before its stop checkpoint.
    # The trainer decides when to stop and ends its workers (BatchStream.close; at exit
    # _kill_workers_at_exit; on a second Ctrl-C umm/train/stop.py).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@atexit.register  # after multiprocessing's own exit hook, so it runs first (last in, first out)
def _kill_workers_at_exit() -> None:
    # multiprocessing would SIGTERM its daemonic children (DataLoader workers) and wait for them,
    # forever for workers that ignore SIGTERM: end them the way it means to, with SIGKILL.
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


class BatchStream:
    """Endless iterator of ``PackedBatch`` for one rank, resumable from ``state_dict()``."""

    def __init__(self, data: DataConfig, recipe, tokenizer, special: SpecialTokens, geometry: PackGeometry,
                 *, rank: int, world_size: int, held_out: Optional[Dict[str, FrozenSet[int]]] = None,
                 pin_memory: bool = False):
        self.data, self.recipe, self.tokenizer = data, recipe, tokenizer
        self.pin_memory = pin_memory  # batches bound for CUDA: pinned beside the step, by the DataLoader's thread
        self.held_out = held_out
        self.special, self.geometry = special, geometry
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, data.num_workers)
        self.states: List[Optional[Dict]] = [None] * self.num_workers
        self.consumed = 0
        self._iter = None
        # Fail now, in the main process, on a bad config or manifest (workers would fail later).
        self._probe = PlanStream(data, recipe, tokenizer,
                                 StreamSpec(rank * self.num_workers, world_size * self.num_workers), held_out)

    def _start(self) -> Iterator:
        dataset = _PackedStreams(self.data, self.recipe, self.tokenizer, self.special, self.geometry,
                                 rank=self.rank, num_workers=self.num_workers, world_size=self.world_size,
                                 states=list(self.states), offset=self.consumed % self.num_workers,
                                 held_out=self.held_out)
        if self.data.num_workers == 0:
            return iter(dataset)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.data.num_workers, collate_fn=_identity,
                            persistent_workers=False, worker_init_fn=_ignore_stop_signals,
                            pin_memory=self.pin_memory)
        return iter(loader)

    def close(self) -> None:
        """End the DataLoader workers (each finishes its batch and exits); the position is kept."""
        it, self._iter = self._iter, None
        shutdown = getattr(it, "_shutdown_workers", None)  # what the DataLoader iterator's __del__ calls
        if shutdown is not None:
            shutdown()

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> PackedBatch:
        if self._iter is None:
            self._iter = self._start()
        local, batch, state = next(self._iter)
        self.states[local] = state
        self.consumed += 1
        return batch

    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable position after the last batch returned."""
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.num_workers, "consumed": self.consumed, "streams": list(self.states)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key, mine in (("version", STATE_VERSION), ("world_size", self.world_size),
                          ("num_workers", self.num_workers), ("rank", self.rank)):
            if state.get(key) != mine:
                raise DataStateError(
                    f"saved data position has {key}={state.get(key)} but this run has {mine}; resume with the same "
                    "number of processes and data.num_workers (or start the data from scratch)"
                )
        self.states = list(state["streams"])
        self.consumed = int(state["consumed"])
        self._iter = None

    def load_position(self, position: Dict[str, Any]) -> None:
        """Continue from ``global_position`` of every rank: exactly where this rank stopped when the
        ranks and workers are as saved, else from the streams re-split over this run's ones."""
        if position.get("version") != STATE_VERSION:
            raise DataStateError(f"saved data position has version {position.get('version')}, this umm reads "
                                 f"{STATE_VERSION}; start the data from scratch")
        if (position["world_size"], position["num_workers"]) == (self.world_size, self.num_workers):
            self.load_state_dict({**position, "rank": self.rank, "consumed": position["consumed"][self.rank],
                                  "streams": position["streams"][self.rank * self.num_workers:
                                                                 (self.rank + 1) * self.num_workers]})
            return
        streams = resplit_streams(position["streams"], self.world_size * self.num_workers, self._probe.source)
        self.states = streams[self.rank * self.num_workers:(self.rank + 1) * self.num_workers]
        self.consumed = 0
        self._iter = None

    def skip_stats(self) -> Dict[str, int]:
        """Rows read and skipped so far on this rank (by reason), as of the last batch returned."""
        seen, skipped = 0, Counter()
        for state in self.states:
            if state is not None:
                seen += state["source"]["seen"]
                skipped.update(state["source"]["skipped"])
        stats = {"data/rows_read": seen, "data/rows_skipped": sum(skipped.values())}
        stats.update({f"data/skipped_{reason}": n for reason, n in sorted(skipped.items())})
        return stats


def global_position(rank_states: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Every rank's ``state_dict()`` (in rank order) as one position: all streams in stream order."""
    first = rank_states[0]
    return {"version": STATE_VERSION, "world_size": first["world_size"], "num_workers": first["num_workers"],
            "consumed": [s["consumed"] for s in rank_states], "streams": [x for s in rank_states for x in s["streams"]]}


def _share(total: int, i: int, n: int) -> int:
    return total * (i + 1) // n - total * i // n


def resplit_streams(states: List[Optional[Dict[str, Any]]], num_streams: int, source: SampleSource) -> List[Dict]:
    """``num_streams`` stream states that go on from the saved ``states`` of another stream count: each
    dataset's rows re-split (``RowOrder.resplit``), samples waiting in the old buffers dealt out, counters
    shared out."""
    sources = [s["source"] if s else None for s in states]
    orders = {name: order.resplit([src["orders"][name] if src else None for src in sources], num_streams)
              for name, order in source.orders.items()}
    waiting = [key for s in states if s for key in s["buffer"]]
    seen = sum(src["seen"] for src in sources if src)
    skipped: Counter = Counter()
    for src in sources:
        if src:
            skipped.update(src["skipped"])
    draws = max((src["mix"]["draws"] for src in sources if src), default=0)
    batches = max((s["batches"] for s in states if s), default=0)
    return [{"stream": i, "batches": batches, "buffer": waiting[i::num_streams],
             "source": {"orders": {name: o[i] for name, o in orders.items()}, "mix": {"draws": draws},
                        "seen": _share(seen, i, num_streams),
                        "skipped": {r: _share(n, i, num_streams) for r, n in skipped.items()}}}
            for i in range(num_streams)]


def ensure_synthetic(data: DataConfig) -> None:
    """``data.synthesize``: write the built-in synthetic set under data.root unless a set umm made is there."""
    from umm.data.outdir import DATA_ROOT_FIX, read_marker

    if data.synthesize and read_marker(data.root) is None:
        from umm.data.synthetic import generate

        if generate(data.root, what="data.synthesize=true, but data.root", fix=DATA_ROOT_FIX):
            log.info("wrote the synthetic datasets to %s", data.root)


def check_data(cfg: RootConfig, recipe) -> None:
    """Before the model loads: every dataset opens and has a row (or row group) for each of the run's
    data streams, its kind is one ``recipe`` trains on, and the weights can draw one."""
    streams = cfg.torchrun.nnodes * cfg.torchrun.nproc_per_node * max(1, cfg.data.num_workers)
    SampleSource(cfg.data, recipe, None, StreamSpec(0, streams))


def build_loader(cfg: RootConfig, recipe, tokenizer, special: SpecialTokens, *, rank: int = 0,
                 world_size: int = 1, geometry: Optional[PackGeometry] = None,
                 held_out: Optional[Dict[str, FrozenSet[int]]] = None, pin_memory: bool = False) -> BatchStream:
    """The rank's batch stream. Pass the loaded model's ``geometry`` when it may differ from cfg.model;
    ``held_out``: manifest path -> row indices never trained on (the rows the samples show);
    ``pin_memory``: batches arrive page-locked (for CUDA; with data.num_workers > 0)."""
    geometry = geometry or geometry_from_config(cfg)
    check_geometry(cfg.data, geometry)
    ensure_synthetic(cfg.data)
    return BatchStream(cfg.data, recipe, tokenizer, special, geometry, rank=rank, world_size=world_size,
                       held_out=held_out, pin_memory=pin_memory)
