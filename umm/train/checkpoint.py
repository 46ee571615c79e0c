"""Checkpoint directories: atomic writes, the COMPLETE marker, keep-last-N, and reading them back.

Layout of ``<run_dir>/checkpoints/<step:07d>/`` (``step`` = optimizer steps completed):

    model.safetensors   full fp32 state dict, upstream BAGEL key names (rank 0 writes)
    ema.safetensors     same keys, trainable tensors replaced by their EMA (absent with train.ema_decay=null)
    adapter/            LoRA only: peft's format (adapter_model.safetensors + adapter_config.json)
    adapter_ema/        LoRA only: the adapter's EMA, same format (absent without EMA)
    resolved.yaml       the config it was written under (a resume compares it: umm/config/drift.py)
    state/meta.json     step, world size, trainable names, per-rank files, whether an EMA is kept
    state/optim.rankNNNNN.safetensors   this rank's AdamW shards (exp_avg, exp_avg_sq, step)
    state/rank.rankNNNNN.pt             data position and RNG states (torch.load weights_only)
    COMPLETE            written last

Everything is written under ``.tmp-<step>`` beside the final name, fsynced, then renamed; a
directory without COMPLETE never counts. Nothing here trusts a file's content to run code:
tensors come from safetensors, the rest from JSON or ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from safetensors.torch import load_file, save_file

from umm.errors import UmmError
from umm.train import faults
from umm.train.distributed import DistEnv, like_param, local, raise_if_any

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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
        pass


def write_safetensors(tensors: Dict[str, torch.Tensor], path: Path, metadata: Optional[dict] = None) -> None:
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(clean, str(path), metadata={"format": "pt", **(metadata or {})})
    _fsync_file(path)


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


def write_torch(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def read_torch(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses anything but plain containers and tensors
        raise CheckpointError(f"{path} holds more than plain data and tensors; refusing to load it "
                              f"({str(e).splitlines()[0]})") from None


def _agree(env: DistEnv, error: Optional[BaseException], what: str) -> None:
    """The barrier between write phases: every rank learns whether any rank failed."""
    raise_if_any(env, error, what, CheckpointError)


# ---------------------------------------------------------------- optimizer shards


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: Dict[int, str]) -> Dict[str, torch.Tensor]:
    """This rank's AdamW state as flat tensors keyed ``<param name>.<field>``."""
    out = {}
    for p, state in optimizer.state.items():
        name = names[id(p)]
        for field, value in state.items():
            if torch.is_tensor(value):
                out[f"{name}.{field}"] = local(value).detach()
            else:
                out[f"{name}.{field}"] = torch.tensor(float(value))
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
    optim_tensors: Dict[str, torch.Tensor],
    rank_state: dict,
    meta: dict,
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically; every rank calls this.

    ``main_files(tmp_dir)`` runs on rank 0 and writes the model/EMA/adapter files (their tensors
    were gathered by the caller before, since gathering is collective).
    """
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / step_dir_name(step)
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

    err = None
    try:
        tag = f"rank{env.rank:05d}"
        write_safetensors(optim_tensors, tmp / "state" / f"optim.{tag}.safetensors")
        write_torch(rank_state, tmp / "state" / f"rank.{tag}.pt")
        faults.fire("checkpoint", step=step)
        if env.is_main:
            main_files(tmp)
            write_json({**meta, "step": step, "world_size": env.world_size}, tmp / "state" / "meta.json")
    except Exception as e:  # disk full, permissions: reported on every rank below
        err = e
    try:
        _agree(env, err, f"writing checkpoint {final}")
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
            _fsync_dir(checkpoints_dir)
            _prune(checkpoints_dir, keep_last)
        except OSError as e:
            err = e
            shutil.rmtree(tmp, ignore_errors=True)
    _agree(env, err, f"finishing checkpoint {final}")
    return final


def _prune(checkpoints_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in complete_checkpoints(checkpoints_dir)[:-keep_last]:
        # Drop the marker first so a half-deleted dir can never look complete.
        (old / COMPLETE).unlink()
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temp_dirs(checkpoints_dir: Path) -> None:
    """Left-overs of a run killed mid-write (rank 0, at start)."""
    if Path(checkpoints_dir).is_dir():
        for p in Path(checkpoints_dir).iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- loading


def read_meta(ckpt: Path) -> dict:
    with open(Path(ckpt) / "state" / "meta.json") as f:
        return json.load(f)


def read_rank_files(ckpt: Path, rank: int):
    tag = f"rank{rank:05d}"
    state_dir = Path(ckpt) / "state"
    optim = load_file(str(state_dir / f"optim.{tag}.safetensors"))
    return optim, read_torch(state_dir / f"rank.{tag}.pt")


def shard_full_state(full_state: Dict[str, torch.Tensor], named_params: List) -> Dict[str, torch.Tensor]:
    """Full tensors → this rank's local pieces, for the given [(name, param)]."""
    return {n: local(like_param(full_state[n], p)) for n, p in named_params if n in full_state}
