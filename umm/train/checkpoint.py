"""Checkpoint directories: atomic writes, the COMPLETE marker, keep-last-N, and reading them back.

Layout of ``<run_dir>/checkpoints/<step:07d>/`` (``step`` = optimizer steps completed):

    model.safetensors   full fp32 state dict, upstream BAGEL key names (rank 0 writes; for users; only
                        at the end of a run and every train.export_every steps: meta's "consolidated";
                        never for LoRA, whose adapters are all it trained)
    ema.safetensors     same keys, trainable tensors replaced by their EMA (absent with train.ema_decay=null)
    adapter/            LoRA only: peft's format (adapter_model.safetensors + adapter_config.json)
    adapter_ema/        LoRA only: the adapter's EMA, same format (absent without EMA)
    resolved.yaml       the config it was written under (a resume compares it: umm/config/drift.py)
    state/meta.json     step, world size, trainable names, skipped-step count, whether an EMA is kept
    state/data.json     the data position of every stream, re-split on another world size
    state/shards.rankNNNNN.safetensors  what a resume reads: this rank's rows of the trained weights
                        (fp32 masters where the model computes in bf16; frozen ones are read from where
                        the run started), their EMA and AdamW moments, and its RNG states
                        (umm/train/sharded_state.py)
    COMPLETE            written last

Everything is written under ``.tmp-<step>`` beside the final name, fsynced, then renamed; a
directory without COMPLETE never counts. With train.async_save each rank's files are written by a
thread of its own (:class:`PendingCheckpoint`); COMPLETE and the rename wait for ``join``, where every
rank agrees that every writer finished. Nothing here trusts a file's content to run code:
tensors come from safetensors, the rest from JSON; no pickle is read.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from umm import faults
from umm.errors import UmmError
from umm.train.distributed import DistEnv, local, raise_if_any
from umm.train.stream_safetensors import write_tensors

COMPLETE = "COMPLETE"
CONFIG = "resolved.yaml"
TMP_PREFIX = ".tmp-"


class CheckpointError(UmmError, RuntimeError):
    """A checkpoint could not be written or does not fit this run."""


def step_dir_name(step: int) -> str:
    return f"{step:07d}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / COMPLETE).is_file()


def complete_checkpoints(checkpoints_dir: Path) -> List[Path]:
    """Complete checkpoint dirs, oldest first (numeric names only; temp dirs are ignored)."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.name.isdigit() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name))


def latest_complete(checkpoints_dir) -> Optional[Path]:
    found = complete_checkpoints(Path(checkpoints_dir))
    return found[-1] if found else None


def resolve_init_from(path) -> Path:
    """``method.init_from``: a checkpoint dir, or a checkpoints dir (its newest complete one)."""
    path = Path(path)
    if is_complete(path):
        return path
    if path.is_dir():
        latest = latest_complete(path)
        if latest is None and (path / "checkpoints").is_dir():
            latest = latest_complete(path / "checkpoints")
        if latest is not None:
            return latest
        raise CheckpointError(
            f"method.init_from={path}: no complete checkpoint there (a dir with a {COMPLETE} file, "
            f"or a checkpoints dir holding <step> dirs with one)"
        )
    raise CheckpointError(f"method.init_from={path} does not exist")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fsync_file(path)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
        pass


def write_safetensors(tensors: Dict[str, torch.Tensor], path: Path, metadata: Optional[dict] = None,
                      data: Optional[torch.Tensor] = None) -> None:
    """``tensors`` from wherever they live (GPU tensors stream through a small page-locked buffer: no
    host copy of the whole set), fsynced. ``data``: a host buffer holding their bytes back to back in
    their order (HostCopies), written in one go."""
    write_tensors(path, tensors, metadata={"format": "pt", **(metadata or {})}, data=data)
    fsync_file(path)


def write_json(obj, path: Path) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def write_text(text: str, path: Path) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _agree(env: DistEnv, error: Optional[BaseException], what: str) -> None:
    """The barrier between write phases: every rank learns whether any rank failed."""
    raise_if_any(env, error, what, CheckpointError)


# ---------------------------------------------------------------- optimizer shards


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: Dict[int, str]) -> Dict[str, torch.Tensor]:
    """The AdamW state keyed ``<param name>.<field>`` (sharded like the parameters under FSDP2)."""
    out = {}
    for p, state in optimizer.state.items():
        name = names[id(p)]
        for field, value in state.items():
            out[f"{name}.{field}"] = value.detach() if torch.is_tensor(value) else torch.tensor(float(value))
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, named: List, tensors: Dict[str, torch.Tensor]) -> None:
    """Inverse of ``optimizer_tensors``; ``named`` = [(name, param)] in the optimizer's order."""
    by_param: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, field = key.rsplit(".", 1)
        by_param.setdefault(name, {})[field] = value
    unknown = sorted(set(by_param) - {n for n, _ in named})
    if unknown:
        raise CheckpointError(
            f"optimizer state has {len(unknown)} tensors this run does not train, e.g. {unknown[:3]}: "
            "the checkpoint comes from a run with other trainable parts"
        )
    state = {}
    index = {id(p): i for i, p in enumerate(optimizer.param_groups[0]["params"])}
    for name, p in named:
        fields = by_param.get(name)
        if not fields:
            continue  # no state yet for this parameter (e.g. never stepped)
        entry = {}
        for field, value in fields.items():
            if field != "step" and hasattr(p, "device_mesh"):
                from torch.distributed.tensor import DTensor

                value = DTensor.from_local(
                    value.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False
                )
            elif field != "step" and tuple(value.shape) != tuple(local(p).shape):
                raise CheckpointError(
                    f"optimizer state {name}.{field}: saved shape {tuple(value.shape)} != parameter {tuple(p.shape)}"
                )
            entry[field] = value
        state[index[id(p)]] = entry
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


# ---------------------------------------------------------------- saving


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    env: DistEnv,
    *,
    main_files: Callable[[Path], None],
    rank_files: Callable[[Path], None],
    meta: dict,
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically; every rank calls this.

    ``rank_files(state_dir)`` runs on every rank at once and writes its own shards;
    ``main_files(tmp_dir)`` runs on rank 0 and writes the files of the whole run (their tensors
    were gathered by the caller before, since gathering is collective).
    """
    final = start_checkpoint(checkpoints_dir, step, env, main_files=main_files, rank_files=rank_files, meta=meta,
                             keep_last=keep_last, background=False).join()
    finish_pruning()
    return final


def start_checkpoint(checkpoints_dir: Path, step: int, env: DistEnv, *, main_files: Callable[[Path], None],
                     rank_files: Callable[[Path], None], meta: dict, keep_last: int,
                     background: bool, gathered_files: Optional[Callable[[Path], None]] = None) -> "PendingCheckpoint":
    """``save_checkpoint`` up to its files; ``background``: they are written by a thread of this rank
    (whatever they hold must not change until ``join``). ``gathered_files(tmp_dir)`` runs on every rank
    after ``rank_files``, inline only (its collectives need the main thread). Every rank must call
    ``join`` on the result."""
    if background and gathered_files is not None:
        raise ValueError("files written through collectives cannot be written in the background")
    checkpoints_dir = Path(checkpoints_dir)
    tmp = checkpoints_dir / f"{TMP_PREFIX}{step_dir_name(step)}"
    err = None
    if env.is_main:
        try:
            checkpoints_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "state").mkdir(parents=True)
        except OSError as e:
            err = e
    _agree(env, err, f"creating checkpoint dir {tmp}")

    def write() -> None:
        if gathered_files is None:
            rank_files(tmp / "state")
        else:  # no rank may wait in a gather for one whose shard failed to write
            error = None
            try:
                rank_files(tmp / "state")
            except Exception as e:
                error = e
            _agree(env, error, f"writing checkpoint {tmp}")
            gathered_files(tmp)
        faults.fire("checkpoint", step=step)
        if env.is_main:
            main_files(tmp)
            write_json({**meta, "step": step, "world_size": env.world_size}, tmp / "state" / "meta.json")

    return PendingCheckpoint(checkpoints_dir, step, env, keep_last, write, background)


class PendingCheckpoint:
    """A checkpoint whose files are being written (by a thread of this rank, or already, inline).
    ``join`` is collective: the ranks agree every writer finished, then rank 0 writes COMPLETE,
    renames and prunes. Collectives stay on the main thread; the writer thread runs none."""

    def __init__(self, checkpoints_dir: Path, step: int, env: DistEnv, keep_last: int,
                 write: Callable[[], None], background: bool):
        self.checkpoints_dir, self.step, self.env, self.keep_last = checkpoints_dir, step, env, keep_last
        self.final = checkpoints_dir / step_dir_name(step)
        self.error: Optional[BaseException] = None
        self._thread = None
        if background:  # a daemon: a hung write never keeps a finished or failed process alive
            self._thread = threading.Thread(target=self._write, args=(write,), name=f"umm-save-{step}", daemon=True)
            self._thread.start()
        else:
            self._write(write)

    def _write(self, write: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        try:
            write()
        except Exception as e:  # disk full, permissions: reported on every rank at the join
            self.error = e
        self.write_s = time.perf_counter() - t0

    @property
    def background(self) -> bool:
        return self._thread is not None

    def written(self) -> bool:
        """This rank's files are written (or failed to be): ``join`` will not wait."""
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> None:
        """Until this rank's writer is done (``join`` waits too; this only times it apart)."""
        if self._thread is not None:
            self._thread.join()

    def join(self) -> Path:
        self.wait()
        env, final, step = self.env, self.final, self.step
        tmp = self.checkpoints_dir / f"{TMP_PREFIX}{step_dir_name(step)}"
        try:
            _agree(env, self.error, f"writing checkpoint {final}")
        except CheckpointError:
            if env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

        err = None
        if env.is_main:
            try:
                with open(tmp / COMPLETE, "w") as f:
                    f.write(f"{step}\n")
                    f.flush()
                    os.fsync(f.fileno())
                _fsync_dir(tmp / "state")
                _fsync_dir(tmp)
                faults.fire("commit", step=step)
                if final.exists():  # an older incomplete copy of the same step
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(self.checkpoints_dir)
                _prune(self.checkpoints_dir, step, self.keep_last)
            except OSError as e:
                err = e
                shutil.rmtree(tmp, ignore_errors=True)
        _agree(env, err, f"finishing checkpoint {final}")
        return final


_deleting: List[threading.Thread] = []  # pruned checkpoints whose files are still being removed


def _prune(checkpoints_dir: Path, step: int, keep_last: int) -> None:
    """The checkpoints before ``step`` (just committed) past the newest ``keep_last`` in all: each loses
    its marker and is renamed to a temp name now, so none is ever taken for complete again and no later
    save of its step meets it; its files go in a thread, since removing 18.6 GB held the step 3.5-4.8 s
    at the real size (BENCHMARKS.md). One killed meanwhile is a temp dir the next start removes.
    Newer checkpoints (of an earlier run in this dir) are left as they are."""
    if keep_last <= 0:
        return
    older = [p for p in complete_checkpoints(checkpoints_dir) if int(p.name) < step]
    doomed = []
    for path in older[:max(0, len(older) - (keep_last - 1))]:
        (path / COMPLETE).unlink()
        doomed.append(path.rename(path.with_name(f"{TMP_PREFIX}pruned-{path.name}-{uuid.uuid4().hex[:8]}")))
    if doomed:
        thread = threading.Thread(target=_remove_dirs, args=(doomed,), name="umm-prune", daemon=True)
        thread.start()
        _deleting.append(thread)


def _remove_dirs(paths: List[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def finish_pruning() -> None:
    """Until every pruned checkpoint's files are gone (the end of a run leaves none behind)."""
    while _deleting:
        _deleting.pop().join()


def remove_unfinished_dirs(checkpoints_dir: Path) -> None:
    """Left-overs of a run killed mid-write or mid-prune (temp dirs), or step dirs without COMPLETE (a
    step dir is only ever renamed into place with it; older umm dropped it first when pruning): rank 0,
    at start."""
    if Path(checkpoints_dir).is_dir():
        for p in Path(checkpoints_dir).iterdir():
            if p.name.startswith(TMP_PREFIX) or (p.name.isdigit() and not is_complete(p)):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- loading


def read_meta(ckpt: Path) -> dict:
    return read_json(Path(ckpt) / "state" / "meta.json")


def read_json(path: Path):
    """A checkpoint's JSON file; anything else is one CheckpointError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; the checkpoint is damaged") from None
