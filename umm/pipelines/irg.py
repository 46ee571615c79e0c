"""IRG stage launcher: one stage of the ``pipeline=irg`` sweep, wrapped around the normal launcher.

``conf/pipeline/irg.yaml`` runs stage 1 then stage 2 as a Hydra multirun with batch size 1 and a
sweep dir keyed by ``run_name``; each stage's ``run_dir`` is ``<sweep dir>/<stage>``. Around the
normal training launch this module adds:

- a ``DONE`` marker (JSON of the stage's result) written when the stage finishes; a stage that has
  one is skipped on rerun, a stage without one runs and the trainer resumes its own checkpoints;
- stage 2's start: ``method.init_from`` names stage 1's checkpoints *directory*; the newest complete
  checkpoint there is chosen at launch (never a step number in YAML), written into the stage's
  ``resolved.yaml``, and reported in the result (the sweep manifest records it). No complete
  checkpoint there fails at once, naming the directory;
- ``preflight(configs)``: the chain checks the sweep's preflight callback runs before anything
  trains (umm/callbacks.py).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from umm.config.schema import RootConfig
from umm.errors import UmmError

log = logging.getLogger(__name__)

DONE = "DONE"


class StageError(UmmError, RuntimeError):
    """A stage cannot start (no checkpoint to start from, a data group that is no IRG mode)."""


def stage_name(cfg: RootConfig) -> str:
    return cfg.method.stage or cfg.method.name


def start_checkpoint(cfg: RootConfig) -> Optional[Path]:
    """The checkpoint a stage starts from: the newest complete one under ``method.init_from``."""
    from umm.train.checkpoint import CheckpointError, resolve_init_from

    if not cfg.method.init_from:
        return None
    where = Path(cfg.method.init_from)
    try:
        return resolve_init_from(where)
    except CheckpointError as err:
        raise StageError(
            f"{stage_name(cfg)}: no complete checkpoint to start from in {where.resolve()} ({err}). "
            f"Run the earlier stage first with the same run_name and output_root "
            f"(python -m umm pipeline=irg run_name={cfg.run_name}), or set method.init_from to a "
            f"directory that holds one."
        ) from None


def check_modes(cfg: RootConfig) -> None:
    """Every irg-kind data group must be named after a learning mode (it picks the loss mask)."""
    from umm.methods.irg import MODES

    for name, ds in cfg.data.datasets.items():
        if ds.kind == "irg" and name not in MODES:
            raise StageError(
                f"{stage_name(cfg)}: data.datasets.{name} has kind irg but {name!r} is not a learning "
                f"mode; name irg groups after the modes: {list(MODES)}"
            )


def _root_named(cfg: RootConfig) -> str:
    """How a data.synthesize error names data.root."""
    return f"{stage_name(cfg)}: data.synthesize=true, but data.root"


def check_manifests(cfg: RootConfig) -> None:
    """Every data group's manifest (a file, or a folder of parquet files) exists (upstream shipped
    a stage-2 data file that did not); with ``data.synthesize``, data.root is a dir the synthetic set
    may be written into (never a user's). A dry run reads no data, so it is not checked."""
    if cfg.dry_run:
        return
    if cfg.data.synthesize:
        from umm.data.outdir import DATA_ROOT_FIX, check_writable

        check_writable(cfg.data.root, _root_named(cfg), DATA_ROOT_FIX)
        return
    for name, ds in cfg.data.datasets.items():
        path = Path(cfg.data.root) / ds.path
        if not path.exists():
            raise StageError(
                f"{stage_name(cfg)}: data.datasets.{name}: manifest {path.resolve()} does not exist "
                f"(check data.root and the path; data.synthesize=true writes the synthetic IRG set there)"
            )


def preflight(cfgs: List[RootConfig]) -> None:
    """Checks across the sweep's stages, run before the first one starts (after the preflight's own:
    each job composes, validates and has a run dir of its own, umm/callbacks.py).

    A stage's ``init_from`` may point at the checkpoints an earlier stage of this sweep will write;
    anything else must already hold a complete checkpoint.
    """
    produced = set()
    for cfg in cfgs:
        check_modes(cfg)
        check_manifests(cfg)
        init = cfg.method.init_from
        if init and Path(init).resolve() not in produced and not cfg.dry_run:
            start_checkpoint(cfg)
        produced.add((Path(cfg.run_dir) / "checkpoints").resolve())


def read_done(run_dir) -> Optional[Dict[str, Any]]:
    path = Path(run_dir) / DONE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_done(run_dir: Path, result: Dict[str, Any]) -> None:
    tmp = run_dir / (DONE + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, run_dir / DONE)


def launch(cfg: RootConfig) -> Dict[str, Any]:
    """Run one IRG stage (or skip it when it is done); returns the stage's result."""
    from umm.pipelines import launch_training

    stage = stage_name(cfg)
    run_dir = Path(cfg.run_dir)
    done = read_done(run_dir)
    if done is not None:
        log.info("IRG %s: %s exists, stage skipped", stage, run_dir / DONE)
        return {**done, "status": "skipped"}
    check_modes(cfg)
    if cfg.dry_run:
        if cfg.method.init_from:
            print(f"# {stage} starts from the newest complete checkpoint in {Path(cfg.method.init_from).resolve()}")
        return launch_training(cfg)
    _synthesize(cfg)
    start = start_checkpoint(cfg)
    if start is not None:
        cfg.method.init_from = str(start)
        _rewrite_resolved(cfg)
        log.info("IRG %s starts from %s", stage, start)
    result = dict(launch_training(cfg) or {})
    result.update({"stage": stage, "run_dir": str(run_dir.resolve()),
                   "init_from": None if start is None else str(start.resolve())})
    if result.get("status") == "completed":
        _write_done(run_dir, result)
    # Stopped (SIGTERM, Ctrl-C): no DONE, and the sweep ends here (umm.callbacks.StopEndsSweep), so
    # the next stage never starts from an unfinished one; the same command resumes this stage.
    return result


def _synthesize(cfg: RootConfig) -> None:
    """``data.synthesize``: write the synthetic IRG trajectories under data.root when absent
    (here, once, before any worker starts) unless a set umm made is there."""
    from umm.data.outdir import DATA_ROOT_FIX, read_marker
    from umm.data.synthetic_irg import write_irg_dataset

    root = Path(cfg.data.root)
    if cfg.data.synthesize and read_marker(root) is None:
        write_irg_dataset(root, what=_root_named(cfg), fix=DATA_ROOT_FIX)
        log.info("wrote the synthetic IRG trajectories to %s", root)


def _rewrite_resolved(cfg: RootConfig) -> None:
    """Record the concrete start checkpoint in ``<run_dir>/resolved.yaml`` (what workers read)."""
    from omegaconf import OmegaConf

    path = Path(cfg.run_dir) / "resolved.yaml"
    OmegaConf.save(OmegaConf.structured(cfg), path)
