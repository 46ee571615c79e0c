"""Claim a run dir for one launch: lock it, check a resume's config, record the config.

``claim_run_dir(cfg, text)`` is what the app wraps a real (not dry) launch in:

1. the run dir's lock (umm/launch/runlock.py): a second launch of the run stops at once;
2. on resume, the config the checkpoint to resume from was written under (its ``resolved.yaml``)
   against this one (umm/config/drift.py): harmless changes are noted, changes to what is trained
   stop the launch before anything loads unless ``train.allow_config_change=true``;
3. ``<run_dir>/resolved.yaml`` (what the ranks read) and ``configs/resolved.NNN.yaml``: every
   config a launch accepted, numbered, a new file whenever it differs from the last one.

SLURM: the app runs once per node; node 0 claims the run dir, the other nodes wait until the lock
names their job as running (node 0 wrote resolved.yaml) and stop if node 0 refused or never came.
"""
from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from umm.config import load_resolved
from umm.config.drift import ACCEPT_OVERRIDE, compare
from umm.config.schema import RootConfig
from umm.config.validate import ConfigError
from umm.launch.runlock import LOCK_FILE, RunDirBusyError, RunLock, read_holder
from umm.train.checkpoint import CONFIG
from umm.train.checkpoint_integrity import newest_intact

HISTORY_DIR = "configs"
NODE_WAIT_S = 300.0


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _slurm_node(cfg: RootConfig) -> int:
    if cfg.launcher.name == "slurm" and "SLURM_JOB_ID" in os.environ:
        return int(os.environ.get("SLURM_NODEID", 0))
    return 0


@contextmanager
def claim_run_dir(cfg: RootConfig, text: str) -> Iterator[None]:
    run_dir = Path(cfg.run_dir)
    node = _slurm_node(cfg)
    if node > 0:
        _wait_for_node0(run_dir, os.environ["SLURM_JOB_ID"], node)
        yield
        return
    job = os.environ.get("SLURM_JOB_ID") if cfg.launcher.name == "slurm" else None
    lock = RunLock(run_dir).acquire(state="starting", **({"slurm_job_id": job} if job else {}))
    try:
        try:
            check_resume_config(cfg)
            record_config(run_dir, text)
        except BaseException:
            lock.update(state="refused")
            raise
        lock.update(state="running")
        yield
    finally:
        lock.release()


def check_resume_config(cfg: RootConfig) -> None:
    """Compare with the config the checkpoint this launch resumes from was written under."""
    if not cfg.train.resume:
        return
    ckpt, _ = newest_intact(Path(cfg.run_dir) / "checkpoints")  # the trainer logs the skipped ones
    if ckpt is None:
        return
    # Checkpoints written before umm kept a config beside them: the run's last launched config.
    saved = next((p for p in (ckpt / CONFIG, Path(cfg.run_dir) / "resolved.yaml") if p.is_file()), None)
    if saved is None:
        return
    try:
        old = OmegaConf.to_container(OmegaConf.structured(load_resolved(saved)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{saved} does not read as a config of this umm ({' '.join(str(e).split())}); "
                          f"use another run_name") from None
    harmless, material = compare(old, OmegaConf.to_container(OmegaConf.structured(cfg)))
    if harmless:
        print(f"umm: resuming from {ckpt} with changes that do not alter what is trained: "
              f"{'; '.join(map(str, harmless))}", flush=True)
    if not material:
        return
    lines = "\n".join(f"  {c}" for c in material)
    if cfg.train.allow_config_change:
        print(f"umm: resuming from {ckpt} with changes to what is trained, accepted by {ACCEPT_OVERRIDE}:\n{lines}",
              flush=True)
        return
    raise ConfigError(
        f"resuming from {ckpt} with a config that changes what is trained (nothing was loaded):\n{lines}\n"
        f"Keep the values it was written with, use another run_name for a new run, or accept the change on "
        f"purpose with {ACCEPT_OVERRIDE}"
    )


def _history(run_dir: Path) -> list:
    found = []
    for p in (run_dir / HISTORY_DIR).glob("resolved.*.yaml"):
        m = re.fullmatch(r"resolved\.(\d+)\.yaml", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def _append(run_dir: Path, history: list, text: str) -> None:
    n = history[-1][0] + 1 if history else 1
    path = run_dir / HISTORY_DIR / f"resolved.{n:03d}.yaml"
    write_atomic(path, text)
    history.append((n, path))


def record_config(run_dir: Path, text: str) -> None:
    """Write ``resolved.yaml``; keep it in the numbered history when it is new."""
    history = _history(run_dir)
    current = run_dir / "resolved.yaml"
    if not history and current.is_file() and current.read_text() != text:
        _append(run_dir, history, current.read_text())  # a run dir from before the history was kept
    if not history or history[-1][1].read_text() != text:
        _append(run_dir, history, text)
    write_atomic(current, text)


def _wait_for_node0(run_dir: Path, job: str, node: int) -> None:
    path = run_dir / LOCK_FILE
    deadline = time.monotonic() + NODE_WAIT_S
    while True:
        holder = read_holder(path)
        if str(holder.get("slurm_job_id")) == job and holder.get("state") == "running":
            return
        if str(holder.get("slurm_job_id")) == job and holder.get("state") == "refused":
            raise RunDirBusyError(f"node {node}: node 0 of SLURM job {job} did not start the run in {run_dir} "
                                  f"(its output says why)")
        if time.monotonic() > deadline:
            raise RunDirBusyError(
                f"node {node}: node 0 of SLURM job {job} did not claim {run_dir} within {NODE_WAIT_S:.0f} s; "
                f"{path} names host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, SLURM job "
                f"{holder.get('slurm_job_id', '?')}, started {holder.get('started', '?')}"
            )
        time.sleep(1.0)
