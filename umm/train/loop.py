"""The training loop: ``train(cfg) -> dict`` (status, step, last checkpoint).

A plain loop in torchtitan's style: build everything, maybe resume, then per optimizer step run
``grad_accum`` micro-batches (autoencoder encode under no_grad → Bagel forward → global-token
loss → backward), clip, AdamW, EMA, log, checkpoint. One process runs the unwrapped model; under
torchrun the model is sharded with FSDP2 (umm/train/distributed.py). No step waits for its own
kernels: the host reads a step's numbers once it has queued the next step (umm/train/step_readback.py),
and logs, counts bad steps and acts on stop votes then; where the loop acts on a step itself (a save, a
sample, the first and the last step) it reads that step at once.

Weights come from, in order: the run's newest complete checkpoint whose files are whole
(``train.resume``; newer damaged ones are skipped loudly), else ``method.init_from`` (model only,
EMA or raw weights), else the model dir itself; each rank reads only its own shards of them
(umm/train/build.py). A resume reads the ranks' shards of the trained tensors (umm/train/sharded_state.py;
the frozen ones from where the run started), also when the
checkpoint was written by another number of processes: weights, masters, moments and EMA are
re-sharded and the data position is re-split (umm/data/loader.py); the RNG states are restored only
on the same world size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import resource
import time
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

from umm import PROCESS_START, faults
from umm.config.schema import RootConfig
from umm.data.transfer import to_device
from umm.errors import UmmError
from umm.train import checkpoint as ckpt
from umm.train import distributed as D
from umm.train import flops as F
from umm.train import rng
from umm.data.loader import global_position
from umm.train.build import build_model
from umm.train.checkpoint_integrity import newest_intact, skipped_warning
from umm.train.save_metrics import SaveClock, process_peak_gib
from umm.train.sharded_state import FORMAT as SHARDED_FORMAT, HostCopies, ShardWriter, copy_specs, open_checkpoint
from umm.train.compiling import compile_counts, compiles, slowest_kernel_compiles
from umm.train.step_profiler import StepProfiler
from umm.train.consolidate import write_consolidated
from umm.train.cpu_ema import AsyncCpuEma
from umm.train.ema import Ema
from umm.train.logging import RunLogger, plot_loss_curve
from umm.train.memory_plan import describe_share
from umm.train.loss import compute_loss
from umm.train.optim import clip_for_step, lr_at, optimizer_for, set_lr
from umm.train.precision import autocast
from umm.train.sample_prompts import held_out_rows, sample_specs
from umm.train.step_readback import StepReadback
from umm.train.step_timeline import StepTimeline
from umm.train.stop import StopSignals
from umm.train.state_dict import is_adapter_key, write_adapters


class NonFiniteError(UmmError, RuntimeError):
    """Loss or gradient became NaN/inf more often than train.max_bad_steps allows."""


class RunDirError(UmmError, RuntimeError):
    """The run directory cannot be used."""


@dataclasses.dataclass
class QueuedStep:
    """A step whose kernels are queued; its numbers come with ``readback``."""
    step: int
    lr: float
    after: Optional[StepTimeline]  # the step queued just before it, with no pause between
    data_wait_s: float
    sources: List[str]
    readback: StepReadback
    counters: dict  # host-side counts as of its queueing (Trainer._counters)


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"run dir {run_dir} is not writable ({e}); set output_root or run_name elsewhere") from e


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # Not getrusage alone: measuring a save resets the kernel's peak (save_metrics.py).
    return process_peak_gib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def train(cfg: RootConfig) -> dict:
    started_pg = not torch.distributed.is_initialized()
    env = D.setup(cfg.train.device)
    try:
        return Trainer(cfg, env).run()
    finally:
        if started_pg:
            D.teardown(env)


class Trainer:
    def __init__(self, cfg: RootConfig, env: D.DistEnv):
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.pending = None  # the checkpoint being written and its SaveClock, until _join_save
        # train.async_save's host buffers: this rank's shard; LoRA's adapters gathered on rank 0.
        pin = env.device.type == "cuda"
        self.host_copies = HostCopies(pin) if cfg.train.async_save else None
        self.adapter_copies = HostCopies(pin) if cfg.train.async_save else None
        self.startup: Dict[str, float] = {}  # seconds of each part of the start (run() adds "launch" first)
        self.timeline: Optional[StepTimeline] = None  # the step being queued (its phases)
        self.steps_read = 0  # by this process
        self.mfu: Optional[float] = None  # the last logged row's, for the progress bar

    # ------------------------------------------------------------------ build

    def _build(self) -> None:
        from umm.methods import get_recipe
        from umm.model.io import CheckpointMismatchError

        cfg, env = self.cfg, self.env
        phase = self._startup_phase
        error = None
        if env.is_main:
            try:
                _check_writable(self.run_dir)
                ckpt.remove_unfinished_dirs(self.ckpt_dir)
            except RunDirError as e:
                error = e
        D.raise_if_any(env, error, "preparing the run dir", RunDirError)
        rng.seed_everything(rng.process_seed(cfg.train.seed, env.rank, env.world_size))

        self.resume_from, self.skipped = None, []
        if cfg.train.resume:  # past damaged checkpoints, loudly (logged once the logger exists)
            self.resume_from, self.skipped = newest_intact(self.ckpt_dir)
        self.sample_specs = sample_specs(cfg)  # before the model loads: a bad prompts file fails fast
        self.recipe = get_recipe(cfg.method)
        try:
            built = build_model(cfg, env, self.recipe, self.resume_from, phase=phase)
        except CheckpointMismatchError as e:
            if self.resume_from is None:
                raise
            raise ckpt.CheckpointError(
                f"cannot resume from {self.resume_from}: its weights do not fit model.path={cfg.model.path} "
                f"(another model's run dir?): {e}. Use another run_name, or the model that wrote it"
            ) from None
        self.model, self.bagel, self.ae, self.tokenizer = built.model, built.bagel, built.ae, built.tokenizer
        self.recompute_share = built.recompute_share
        self.lora_params = F.lora_params(self.model) if self.cfg.method.lora.enabled else None  # for the MFU
        bagel, model = self.bagel, self.model

        # trainable: the parameters backward fills; weights: the fp32 tensors the optimizer updates, the
        # EMA follows and checkpoints save (the same tensors, or their masters: umm/train/optim.py).
        self.trainable: List[Tuple[str, torch.nn.Parameter]] = [
            (n, p) for n, p in model.named_parameters() if p.requires_grad
        ]
        with phase("optimizer"):
            self.weights, self.optimizer = optimizer_for(model, self.trainable, cfg.train, cfg.optim, env.device)
            self.param_names = {id(w): n for n, w in self.weights}
            self.ema = (None if cfg.train.ema_decay is None
                        else AsyncCpuEma(self.weights, cfg.train.ema_decay, self.optimizer) if cfg.train.ema_on_cpu
                        else Ema(self.weights, cfg.train.ema_decay, optimizer=self.optimizer))

        from umm.data.loader import build_loader
        from umm.data.packing import PackGeometry

        with phase("data"):
            self.loader = build_loader(cfg, self.recipe, self.tokenizer, self.tokenizer.special,
                                       rank=env.rank, world_size=env.world_size,
                                       geometry=PackGeometry.from_dims(bagel.dims),
                                       held_out=held_out_rows(self.sample_specs),
                                       pin_memory=env.device.type == "cuda")
        self.step = 0
        self.bad_steps = 0
        if self.resume_from is not None:
            with phase("resume"):
                self._resume_state(self.resume_from)

    @contextlib.contextmanager
    def _startup_phase(self, name: str):
        """Seconds of one part of the start, for the first step's breakdown (where a cold start goes)."""
        t0 = time.perf_counter()
        yield
        self.startup[name] = time.perf_counter() - t0

    def _resume_state(self, path: Path) -> None:
        meta = ckpt.read_meta(path)
        names = [n for n, _ in self.trainable]
        if sorted(meta.get("trainable", [])) != sorted(names):
            raise ckpt.CheckpointError(
                f"cannot resume {path}: it trained other parameters than this run's method "
                f"({len(meta.get('trainable', []))} vs {len(names)} trainable tensors); check method.*"
            )
        with open_checkpoint(path) as shards:
            fields: dict = {}
            for key in shards.keys():
                if key.startswith("optim/"):
                    name, field = key[len("optim/"):].rsplit(".", 1)
                    fields.setdefault(name, []).append(field)
            optim = {}
            for name, w in self.weights:  # this rank's rows of each moment; the step count is one number
                for field in fields.get(name, []):
                    key = f"optim/{name}.{field}"
                    optim[f"{name}.{field}"] = shards.like(key, w) if shards.shape(key) else shards.full(key)
            ckpt.load_optimizer_tensors(self.optimizer, self.weights, optim)
            # A checkpoint of a run without EMA (an accepted config change) leaves the EMA at the resumed weights.
            if self.ema is not None and meta.get("ema", True):
                self.ema.load_shards(lambda name, p, out: shards.fill(f"ema/{name}", p, out))
            if meta["world_size"] == self.env.world_size:
                rng.restore(rng.from_saved(
                    {k[len("rng/"):]: v for k, v in shards.rank_tensors(self.env.rank).items() if k.startswith("rng/")},
                    shards.rank_meta[self.env.rank]["rng"]))
        self.loader.load_position(ckpt.read_json(path / "state" / "data.json"))
        self.step = int(meta["step"])
        self.bad_steps = int(meta.get("bad_steps", 0))

    # ------------------------------------------------------------------ step

    def _micro_step(self, batch, micro: int):
        cfg, env = self.cfg, self.env
        mark = self.timeline.mark
        batch = batch.to(env.device)
        mark("to_device")
        gen = rng.step_generator(cfg.train.seed, env.rank, self.step, micro, env.device)
        with autocast(env.device, cfg.train.precision):
            latent = None
            if batch.padded_images is not None and batch.num_gen:
                with torch.no_grad():
                    latent = self.ae.encode(batch.padded_images, sample=True, generator=gen)
            mark("vae")
            out = self.model(batch, latent, generator=gen)
        parts = compute_loss(out, cfg.method, env, cfg.train.grad_accum)
        poison = faults.fire("loss", step=self.step + 1)
        if poison is not None:  # injected bad numbers (tests): this loss becomes NaN/inf
            parts.loss, parts.ce = parts.loss * poison, parts.ce * poison
        mark("forward")
        parts.loss.backward()
        mark("backward")
        return parts

    def _train_step(self, data_iter, after: Optional["QueuedStep"] = None) -> "QueuedStep":
        """Queue one optimizer step; its numbers are read later (:meth:`_read_step`): no host-device sync.
        ``after``: the step queued just before, not yet read (so no pause between the two)."""
        cfg, env = self.cfg, self.env
        self.timeline = StepTimeline(env.device)  # this step's own: it is read after the next one began
        self.timeline.begin()
        mark = self.timeline.mark
        lr = lr_at(self.step, cfg.optim, cfg.train.max_steps)
        set_lr(self.optimizer, lr)
        ce = mse = 0.0
        counts: List[F.TokenCounts] = []  # host-side sizes of each micro-batch, for the speed numbers
        sources: List[str] = []
        data_s = 0.0  # waiting for batches
        for micro in range(cfg.train.grad_accum):
            if env.distributed and hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(micro == cfg.train.grad_accum - 1)
            t_data = time.perf_counter()
            batch = next(data_iter)
            data_s += time.perf_counter() - t_data
            mark("data")
            sources.extend(getattr(batch, "sources", []))
            counts.append(F.token_counts(batch))
            parts = self._micro_step(batch, micro)
            ce += parts.ce / cfg.train.grad_accum
            mse += parts.mse / cfg.train.grad_accum
        poison = faults.fire("step", step=self.step + 1)
        if poison is not None:  # injected bad numbers (tests): one gradient becomes NaN/inf
            next(p for _, p in self.trainable if p.grad is not None).grad.fill_(poison)
        grad_norm = clip_for_step(self.optimizer, [p for _, p in self.trainable], cfg.optim.max_grad_norm)
        mark("clip")
        # One reduce per step: the losses, the stop votes, the ranks still writing a background
        # checkpoint and all ranks' token counts (the host numbers through pinned memory).
        writing = self.pending is not None and not self.pending[0].written()
        host = torch.tensor([float(self.stop.requested), float(writing), *dataclasses.astuple(F.sum_counts(counts))],
                            dtype=torch.float64)
        stats = torch.cat([torch.stack([torch.as_tensor(ce, dtype=torch.float64, device=env.device),
                                        torch.as_tensor(mse, dtype=torch.float64, device=env.device)]),
                           to_device(host, env.device)])
        stats = D.all_reduce_sum(stats, env)
        loss = cfg.method.ce_weight * stats[0] + cfg.method.mse_weight * stats[1]
        # A NaN/inf loss or gradient skips the update on the device; the host learns of it a step later.
        found_inf = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
        mark("reduce")
        self.optimizer.found_inf = found_inf
        self.optimizer.step()
        mark("optimizer")
        if self.ema is not None:
            self.ema.update(found_inf)
        mark("ema")
        self.timeline.end_step()
        readback = StepReadback(torch.cat([stats, grad_norm.detach().to(torch.float64).reshape(1),
                                           found_inf.to(torch.float64).reshape(1)]), self.timeline)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return QueuedStep(step=self.step, lr=lr, after=after.readback.timeline if after is not None else None,
                          data_wait_s=data_s, sources=sources, readback=readback, counters=self._counters())

    def _read_step(self, queued: "QueuedStep") -> dict:
        """The numbers of a queued step, as the loop's row. Its time runs from the end of the step before
        (when it followed that one at once) or its own start, to its end: in steady state the GPU's pace,
        with its idle gaps but never a save or a sample."""
        cfg, env = self.cfg, self.env
        ce_g, mse_g, stop_votes, writing_g, *counts_g, grad_norm, found_inf = queued.readback.read()
        dt = queued.readback.timeline.elapsed_s(queued.after)
        counts_g = F.TokenCounts(*map(round, counts_g))
        return dict(step=queued.step, loss=cfg.method.ce_weight * ce_g + cfg.method.mse_weight * mse_g, ce=ce_g,
                    mse=mse_g, lr=queued.lr, grad_norm=grad_norm, tokens=counts_g.tokens,
                    tokens_per_s=counts_g.tokens / dt, tokens_per_s_per_gpu=counts_g.tokens / env.world_size / dt,
                    step_time_s=dt, data_wait_s=queued.data_wait_s, counts=counts_g, finite=found_inf == 0,
                    stop=stop_votes > 0, written=writing_g == 0, sources=queued.sources,
                    parts=queued.readback.parts_ms(), counters=queued.counters)

    def _on_bad_step(self, row: dict) -> None:
        self.bad_steps += 1
        all_sources = [s for part in D.all_gather_objects(row["sources"], self.env) for s in part]
        where = f"step {row['step']}: loss={row['loss']} grad_norm={row['grad_norm']}; batch sources: {all_sources}"
        if self.bad_steps > self.cfg.train.max_bad_steps:
            self._join_save()  # every rank stops here: a checkpoint being written is kept
            last = ckpt.latest_complete(self.ckpt_dir)
            raise NonFiniteError(
                f"non-finite loss or gradient at {where}. Stopped after {self.bad_steps} bad steps "
                f"(train.max_bad_steps={self.cfg.train.max_bad_steps}); the newest complete checkpoint is {last}"
            )
        self.logger.message(f"skipped update (non-finite) at {where}")

    # ------------------------------------------------------------------ checkpoints

    def _save(self, consolidate: bool) -> Path:
        """A checkpoint; ``consolidate``: also the full model/ema.safetensors (each tensor gathered, then
        written by rank 0), otherwise only the shards and, for LoRA, the small adapters. With
        train.async_save a checkpoint that is not consolidated is written by a thread while training goes
        on: the step waits only for the copy of this rank's tensors to host memory; the first step after
        every rank's writer is done commits it (or the next save, a stop or the end, if that comes first)."""
        env = self.env
        self._join_save()
        # A LoRA run's full files would be its frozen base again (29 GB for BAGEL-7B-MoT, which filled a
        # 64 GB disk) beside adapters that hold all it trained: its checkpoints keep the adapters in
        # peft's format and the shards; `umm export` merges them into full files on request.
        full = consolidate and not self.cfg.method.lora.enabled
        clock = SaveClock(env.is_main)
        background = self.host_copies is not None and not consolidate  # the run's last save stays in line
        self._assert_finite_params()
        clock.part("check")
        # LoRA: the adapters alone (all it trains), for peft's format. A full run's consolidated files are
        # gathered tensor by tensor as they are written (umm/train/consolidate.py), never whole on a host.
        gather = [] if full else self._adapters()
        adapters, ema_adapters = {}, None
        # A writer thread's tensors must not change under it: owned copies, in the run's buffers with
        # train.async_save (through them too when this save is synchronous: no second host copy).
        staged = self.adapter_copies if gather and self.adapter_copies is not None and env.is_main else None
        error, views = None, {}
        try:
            shards = self._shards(self.host_copies)
            views = staged.views(copy_specs(gather)) if staged is not None else {}
        except ckpt.CheckpointError as e:  # page-locking failed: every rank stops, none left in a gather
            error = e
        D.raise_if_any(env, error, "copying the checkpoint to host memory", ckpt.CheckpointError)
        clock.part("shards")
        for name, w in gather:
            value = D.full(w.detach())  # a collective under FSDP2
            if env.is_main:
                adapters[name] = staged.copy(views[name], value) if staged is not None else value.to("cpu")
        if staged is not None:
            staged.wait()
        if gather and self.ema is not None:
            ema_adapters = {k: v.clone() if background else v  # a collective under FSDP2
                            for k, v in self.ema.full_state().items()}
        clock.part("gather")
        position = global_position(D.all_gather_objects(self.loader.state_dict(), env))
        clock.part("position")

        def main_files(tmp: Path) -> None:
            ckpt.write_text(OmegaConf.to_yaml(OmegaConf.structured(self.cfg)), tmp / ckpt.CONFIG)
            ckpt.write_json(position, tmp / "state" / "data.json")
            if adapters:
                write_adapters(self.model, adapters, ema_adapters, tmp)

        consolidated = None
        if full:
            # The fp32 masters, not the bf16 compute weights, where the run keeps them apart.
            masters = self.weights if self.weights is not self.trainable else []
            ema_shards = self.ema.shards() if self.ema is not None else None
            consolidated = partial(write_consolidated, model=self.model, masters=masters, ema_shards=ema_shards, env=env)
        meta = {"trainable": [n for n, _ in self.trainable], "run_name": self.cfg.run_name,
                "method": self.cfg.method.name, "ema": self.ema is not None, "format": SHARDED_FORMAT,
                "bad_steps": self.bad_steps, "consolidated": full}
        pending = ckpt.start_checkpoint(self.ckpt_dir, self.step, env, main_files=main_files, rank_files=shards.write,
                                        meta=meta, keep_last=self.cfg.train.keep_last, background=background,
                                        gathered_files=consolidated)
        self.pending = (pending, clock)
        clock.part("write")
        if background:
            clock.stalled_since(clock.start)
            return pending.final
        return self._join_save(stalled=True)

    def _join_save(self, stalled: bool = False) -> Optional[Path]:
        """Commit the checkpoint being written, if any (collective; waits for its writer), and report
        its cost. ``stalled``: training stood still for it until now (a synchronous save); otherwise
        only the wait here counts."""
        if self.pending is None:
            return None
        (pending, clock), self.pending = self.pending, None
        t0 = clock.start if stalled else time.perf_counter()
        if not stalled:
            clock.skip()
        pending.wait()
        clock.part("wait")
        final = pending.join()
        clock.part("commit")
        clock.stalled_since(t0)
        if pending.background:  # beside training: not part of the stall
            clock.parts["background_write"] = pending.write_s
        if self.env.is_main:
            cost = clock.finish(final)
            self.logger.amend(pending.step, cost)
            self.logger.message(f"checkpoint {final}: " + " ".join(
                f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in cost.items()))
        return final

    def _adapters(self) -> List[Tuple[str, torch.Tensor]]:
        """LoRA's trained tensors (the rest of its ``weights`` are none), gathered to rank 0 at saves."""
        return [(n, w) for n, w in self.weights if is_adapter_key(n)]

    def _prepare_save_buffers(self) -> None:
        """train.async_save: lay out and page-lock this rank's host buffers beside the next steps, so the
        first save (of this process) stalls only for its copies. After the first step, when AdamW's
        moments (part of every checkpoint) exist for every weight that had a gradient; where the first
        save's tensors differ (a weight without state until later), that save lays its buffer out again."""
        self.host_copies.prepare(copy_specs(self._shards(None).tensors.items()))
        adapters = self._adapters()
        if self.env.is_main and adapters:
            self.adapter_copies.prepare(copy_specs(adapters))

    def _shards(self, copies: Optional[HostCopies]) -> ShardWriter:
        """This rank's rows of what a resume needs (sharded_state.py), RNG states beside them: copied
        into ``copies`` (train.async_save), else left where they live for the writer to stream."""
        writer = ShardWriter(self.env.rank, copies)
        # The trained tensors only (fp32 masters where kept); a resume reads the frozen ones from where
        # this run read them (umm/train/build.py).
        for name, w in self.weights:
            writer.add(f"model/{name}", w.detach())
        for name, w, shadow in self.ema.shards() if self.ema is not None else []:
            writer.add(f"ema/{name}", shadow, like=w)
        for key, value in ckpt.optimizer_tensors(self.optimizer, self.param_names).items():
            writer.add(f"optim/{key}", value)
        tensors, values = rng.to_saved(rng.capture())
        for key, value in tensors.items():
            writer.add_rank(f"rng/{key}", value)
        writer.rank_meta = {"rng": values}
        writer.to_host()
        return writer

    def _assert_finite_params(self) -> None:
        bad = torch.zeros((), dtype=torch.float64, device=self.env.device)
        for _, w in self.weights:
            bad += (~torch.isfinite(D.local(w.detach()))).sum()
        if D.all_reduce_sum(bad, self.env).item() > 0:
            raise NonFiniteError(f"weights hold NaN/inf at step {self.step}; no checkpoint written")

    # ------------------------------------------------------------------ samples

    def _samples(self, tag: str) -> Optional[dict]:
        from umm.train.samples import write_samples

        return write_samples(self, tag)

    # ------------------------------------------------------------------ run

    def run(self) -> dict:
        cfg, env = self.cfg, self.env
        self.stop = StopSignals(cfg.train.grace_period_s)
        self.stop.install()  # from the start: a SIGTERM or Ctrl-C while loading stops after the first step
        self.logger = None
        try:
            self.startup["launch"] = time.time() - PROCESS_START  # imports, config, launcher
            self._build()
            self.logger = RunLogger(cfg.logger, self.run_dir, enabled=env.is_main, start_step=self.step,
                                    total_steps=cfg.train.max_steps, run_name=cfg.run_name)
            if self.skipped:
                self.logger.message(skipped_warning(self.resume_from, self.skipped))
            if self.resume_from is not None:
                self.logger.message(f"resumed from {self.resume_from} at step {self.step}")
            if cfg.train.activation_checkpointing == "auto":  # the launcher may have seen no GPU to plan for
                layers = len(self.bagel.language_model.model.layers)
                self.logger.message(f"activation checkpointing auto: {describe_share(layers, self.recompute_share)}")
            last = self.resume_from
            status = "completed"
            data_iter = iter(self.loader)
            self.model.train()
            trained_here = 0
            self.first_step_s = None  # process start to the end of this process's first step (cold start)
            self.stop_seen = False  # a rank's stop vote was read
            queued = None  # the last step, its numbers not read yet
            self.profiler = StepProfiler(cfg.train.profile_at, cfg.train.profile_steps, self.run_dir / "profile",
                                         env.rank, env.device)
            missed = self.profiler.missed_by_resume(self.step)
            if missed:
                self.logger.message(missed)
            while self.step < cfg.train.max_steps:
                self.profiler.before_step(self.step + 1)
                current = self._train_step(data_iter, after=queued)
                trained_here += 1
                if queued is not None:  # the step before: read now that this one is queued behind it
                    self._after_step(self._read_step(queued), saving=False)
                queued = current
                export = (self.step == cfg.train.max_steps and cfg.train.save_at_end) or (
                    cfg.train.export_every > 0 and self.step % cfg.train.export_every == 0)
                saving = self.stop_seen or export or self.step % max(1, cfg.train.save_every) == 0
                sampling = cfg.train.sample_every > 0 and cfg.train.num_sample_prompts > 0 and not self.stop_seen \
                    and self.step % cfg.train.sample_every == 0 and self.step < cfg.train.max_steps
                # Read this step's own numbers at once where the loop acts on it (its sync is the save's,
                # the sample's or the profile's anyway), at the first step (the cold start's end) and at the last.
                profiled = self.profiler.ends_at(self.step)
                if saving or sampling or profiled or trained_here == 1 or self.step == cfg.train.max_steps:
                    self._after_step(self._read_step(queued), saving=saving)
                    queued = None  # the next step starts after a pause
                if profiled:
                    traced = self.profiler.finish()
                    self.logger.message(f"profile of steps {cfg.train.profile_at}-{self.step} written to {traced}")
                if sampling:
                    self._samples(f"step{self.step:07d}")
                if self.stop_seen:
                    last = self._save(consolidate=True)
                    status = "stopped"
                    self.logger.message(f"{self.stop.signal_name or 'stop requested on another rank'}: saved {last}, exiting")
                    break
                if saving:
                    last = self._save(consolidate=export)
            self._join_save()  # a background save still being written (train.save_at_end=false)
            result = {"status": status, "step": self.step, "last_checkpoint": str(last) if last else None}
            if status == "completed" and trained_here > 0:
                if cfg.train.num_sample_prompts > 0:
                    evaluation = self._samples("final")
                    if evaluation:
                        result["samples"] = evaluation
                if env.is_main:
                    plot_loss_curve(self.logger.metrics_path, self.run_dir / "loss_curve.png")
            return result
        finally:
            self.stop.uninstall()
            if getattr(self, "profiler", None) is not None:
                dropped = self.profiler.close(self.step)
                if dropped and self.logger is not None:
                    self.logger.message(dropped)
            for copies in (self.host_copies, self.adapter_copies):
                if copies is not None:  # unlock the pages (a later allocation may reuse them)
                    copies.release()
            if getattr(self, "loader", None) is not None:
                self.loader.close()
            if self.logger is not None:
                self.logger.close()
            ckpt.finish_pruning()  # last: it may take seconds, and nothing above should wait for it

    def _after_step(self, row: dict, saving: bool) -> None:
        """What the loop does with a step's numbers once read: the cold start's report after the first,
        bad steps, committing a background checkpoint, the log (``saving``: that step saves, so its row
        is logged to take the checkpoint's cost) and the progress bar."""
        cfg = self.cfg
        if self.steps_read == 0:
            self.first_step_s = time.time() - PROCESS_START
            self.startup.update(first_batch=row["data_wait_s"], first_step=row["step_time_s"] - row["data_wait_s"])
            # The rest (the logger, gaps); two clocks differ by microseconds, so never below 0.
            self.startup["other"] = max(0.0, self.first_step_s - sum(self.startup.values()))
            parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in self.startup.items())
            self.logger.message(f"first step done {self.first_step_s:.1f} s after the process started ({parts})")
            if self.host_copies is not None:
                self._prepare_save_buffers()
        self.steps_read += 1
        if not row["finite"]:
            self._on_bad_step(row)
        if self.pending is not None and row["written"]:
            # Every rank's writer is done: commit now, not at the next save, so a crash before that
            # cannot lose it.
            self._join_save()
        self.stop_seen = self.stop_seen or row["stop"]
        if row["step"] % max(1, cfg.train.log_every) == 0 or saving or row["stop"]:
            metrics = self._metrics_row(row)
            self.mfu = metrics["mfu"]
            self.logger.log(metrics)
        self.logger.advance(loss=row["loss"], lr=row["lr"], tok_s_gpu=row["tokens_per_s_per_gpu"], mfu=self.mfu)

    def _metrics_row(self, row: dict) -> dict:
        out = {k: row[k] for k in ("step", "loss", "ce", "mse", "lr", "grad_norm", "tokens", "tokens_per_s",
                                   "tokens_per_s_per_gpu", "step_time_s", "data_wait_s")}
        out.update(self._flops(row["counts"], row["step_time_s"]))
        if row["parts"]:
            out["step_parts_ms"] = row["parts"]
        if self.first_step_s is not None:  # once per process: the first row after its first step
            out["time_to_first_step_s"], self.first_step_s = self.first_step_s, None
            out["startup_s"] = {k: round(v, 3) for k, v in self.startup.items()}
            slowest = slowest_kernel_compiles()
            if slowest:
                out["compile_slowest_kernels_s"] = slowest
        out["skipped_update"] = not row["finite"]
        out.update(row["counters"])
        return out

    def _counters(self) -> dict:
        """Host-side counts as of a step's queueing (its row is logged a step later): compiles, skipped
        rows, peak memory."""
        out = {}
        # No growth over a run's steps: no recompiles. On CUDA flex attention compiles even when the
        # blocks do not.
        if compiles(self.cfg.train.compile, self.env.device) or self.env.device.type == "cuda":
            out.update(compile_counts())
        stats = self.loader.skip_stats()
        out["skipped_samples"] = int(stats.get("data/rows_skipped", 0))
        out.update({k: v for k, v in stats.items() if k != "data/rows_skipped"})
        out["mem_gb"] = _memory_gb(self.env.device)
        return out

    def _flops(self, counts: F.TokenCounts, step_s: float) -> dict:
        """The bench's numbers (scripts/bench_train.py) for this step: model FLOPs per GPU and MFU
        (against the H100's dense bf16 peak), from every rank's token counts together."""
        lora = self.lora_params
        total = F.bagel_step_flops(self.bagel.dims, counts, frozen_base=lora is not None,
                                   lora_flops=F.lora_step_flops(lora, counts) if lora is not None else 0.0)["total"]
        per_gpu = total / self.env.world_size
        return {"tflop_per_step_per_gpu": per_gpu / 1e12, "mfu": F.mfu(per_gpu, step_s),
                "token_counts": dataclasses.asdict(counts)}
