"""Hydra callbacks for multiruns: a preflight check, dry runs that never submit, a sweep manifest.

``conf/config.yaml`` registers ``LocalDryRun``, ``Preflight`` and ``StopEndsSweep`` for every
multirun; ``conf/pipeline/irg.yaml`` adds its chain check and ``Manifest``.

- ``Preflight.on_multirun_start`` checks that the launcher plugin is installed, composes every job
  of the sweep the way the sweeper will, and validates each one (with the run dir it will get)
  before the first job starts; no two jobs may share a run dir. Hydra composes a later job only
  when it launches (reference/ecosystem.md E8), so without this a mistake in job 5 (or IRG's
  stage 2) would surface after the jobs before it have trained for hours.
- ``LocalDryRun``: a dry run of a sweep runs its jobs in this process, whatever the launcher.
- ``StopEndsSweep``: a job stopped by SIGTERM or Ctrl-C ends the sweep (exit 0); the jobs after it
  do not start.
- ``Manifest`` keeps ``<sweep dir>/manifest.json``: per stage its status, run dir, checkpoint
  and what it was initialised from.

Hydra turns an exception raised in a callback into a warning and carries on, so a failed
preflight leaves through ``SystemExit`` (not an ``Exception``) with a one-line message.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from umm.config.jobdir import NOT_IN_NAME, job_run_dir

MANIFEST_NAME = "manifest.json"


def sweep_jobs(config: DictConfig) -> List[List[str]]:
    """The override list of every job the basic sweeper will launch, in launch order."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    # Same order as BasicSweeper.sweep: sweeper params first, command line after (the CLI wins).
    args = [f"{k}={v}" for k, v in params.items()]
    args += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    batches = BasicSweeper.split_arguments(parser.parse_overrides(args), max_batch_size=None)
    return [job for batch in batches for job in batch]


def compose_job(config: DictConfig, overrides: List[str]) -> DictConfig:
    """One job's config exactly as the launcher will compose it (hydra node included)."""
    return GlobalHydra.instance().config_loader().load_sweep_config(config, list(overrides))


def _stage_name(cfg: DictConfig, fallback: str) -> str:
    return OmegaConf.select(cfg, "method.stage") or OmegaConf.select(cfg, "method.name") or fallback


class Preflight(Callback):
    """Compose and validate every job of the sweep before any of them runs.

    ``chain_check``: dotted path of ``f(configs: list[RootConfig]) -> None`` for checks that need
    all jobs at once (IRG: stage 2 has a stage 1 to start from); it raises on a problem.
    """

    def __init__(self, chain_check: str | None = None) -> None:
        self.chain_check = chain_check

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            _check_launcher(config)
            jobs = sweep_jobs(config)
            checked = [self._check_job(config, overrides, _label(overrides, jobs, i)) for i, overrides in enumerate(jobs)]
            _check_own_run_dirs(checked, [_label(o, jobs, i) for i, o in enumerate(jobs)])
            if self.chain_check:
                _import(self.chain_check)(checked)
        except SystemExit:
            raise
        except Exception as err:  # any error here must stop the sweep, see module docstring
            raise SystemExit(f"{PREFLIGHT_FAILED}: {_one_line(err)}") from err
        finally:
            HydraConfig.instance().set_config(config)

    @staticmethod
    def _check_job(config: DictConfig, overrides: List[str], where: str):
        from umm.config.validate import validate

        try:
            job_cfg = compose_job(config, overrides)
            # ${hydra:...} in the job's config must resolve against the job's own hydra node.
            HydraConfig.instance().set_config(job_cfg)
            sweep = job_cfg.hydra.sweep
            job_cfg.run_dir = job_run_dir(job_cfg.run_dir, sweep.dir, str(Path(sweep.dir) / sweep.subdir))
            with open_dict(job_cfg):
                del job_cfg["hydra"]
            return validate(job_cfg, overrides)
        except (Exception, SystemExit) as err:
            raise SystemExit(f"{PREFLIGHT_FAILED}: {where}: {_one_line(err)}") from err


PREFLIGHT_FAILED = "umm preflight failed, nothing was run"


def _label(overrides: List[str], jobs: List[List[str]], index: int) -> str:
    """``job #1 (train.device=gpu)``: the overrides that tell this job from the others."""
    own = [o for o in overrides if not all(o in job for job in jobs)] or overrides
    return f"job #{index} ({' '.join(own)})"


def _one_line(err: BaseException) -> str:
    from umm.config.validate import ConfigError
    from umm.errors import one_line

    if isinstance(err, SystemExit):
        return " ".join(str(err.code).split())
    return " ".join(str(err).split()) if isinstance(err, ConfigError) else one_line(err)


def _check_launcher(config: DictConfig) -> None:
    """The launcher's plugin is installed (Hydra would fail with a traceback after composing)."""
    import importlib

    target = str(OmegaConf.select(config, "hydra.launcher._target_") or "")
    try:
        importlib.import_module(target.rpartition(".")[0])
    except ImportError as err:
        hint = " launcher=slurm needs it: pip install -e .[slurm]" if "submitit" in target else ""
        raise SystemExit(f"{PREFLIGHT_FAILED}: the Hydra launcher {target} is not installed ({err}).{hint}") from None


def _check_own_run_dirs(cfgs: List[Any], labels: List[str]) -> None:
    seen: Dict[Path, str] = {}
    for cfg, label in zip(cfgs, labels):
        run_dir = Path(cfg.run_dir).resolve()
        if run_dir in seen:
            raise SystemExit(
                f"{PREFLIGHT_FAILED}: {seen[run_dir]} and {label} would share the run dir {run_dir}, so one "
                f"would resume the other's checkpoints; run them with separate run_names (a job's dir is named "
                f"from its overrides except {', '.join(NOT_IN_NAME)}; pipeline=irg names its dirs by stage only)")
        seen[run_dir] = label


def _import(dotted: str):
    import importlib

    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


class LocalDryRun(Callback):
    """A dry run of a sweep never submits: the jobs run in this process (Hydra's basic launcher),
    each printing its plan; a job's own config keeps the launcher it asked for, so a SLURM job
    still prints its sbatch settings and per-node commands. The cluster plugin need not be installed."""

    BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("dry_run") or config.hydra.launcher.get("_target_") == self.BASIC:
            return
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.launcher = OmegaConf.create({"_target_": self.BASIC})


class StopEndsSweep(Callback):
    """A job whose result is ``stopped`` (SIGTERM, Ctrl-C) ends the sweep: the jobs after it would be
    killed by the same preemption, or are what the Ctrl-C meant to stop. Registered before
    ``Manifest``, so (``on_job_end`` runs in reverse order) the manifest has recorded the stop."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:  # Hydra calls it for a single run too: no sweep to end
            return
        result = job_return._return_value if job_return.status == JobStatus.COMPLETED else None
        if isinstance(result, dict) and result.get("status") == "stopped":
            print("umm: the sweep's later jobs did not start; the same command resumes it", file=sys.stderr, flush=True)
            raise SystemExit(0)  # not an Exception: Hydra would only warn (module docstring)


class Manifest(Callback):
    """``<sweep dir>/manifest.json``: one entry per stage, rewritten atomically at each change.

    A dry run (``dry_run=true``) writes nothing.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("dry_run"):
            return
        path = Path(config.hydra.sweep.dir) / MANIFEST_NAME
        data = read_manifest(path)
        data["run_name"] = OmegaConf.select(config, "run_name")
        data["sweep_dir"] = str(Path(config.hydra.sweep.dir).resolve())
        data.setdefault("stages", {})
        data["git_sha"] = _git_sha()
        _write(path, data)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("dry_run"):
            return
        stage = _stage_name(config, str(config.hydra.job.num))
        self._update(config, stage, {
            "status": "running",
            "run_dir": config.hydra.runtime.output_dir,
            "overrides": list(config.hydra.overrides.task),
            "started_at": _now(),
        })

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.get("dry_run"):
            return
        stage = _stage_name(config, str(config.hydra.job.num))
        entry: Dict[str, Any] = {"finished_at": _now()}
        if job_return.status == JobStatus.COMPLETED:
            result = job_return.return_value if isinstance(job_return.return_value, dict) else {}
            entry.update({k: _plain(v) for k, v in result.items()})
            entry.setdefault("status", "completed")
        else:
            err = job_return._return_value
            entry.update({"status": "failed", "error": f"{type(err).__name__}: {err}"})
        self._update(config, stage, entry)

    @staticmethod
    def _update(config: DictConfig, stage: str, entry: Dict[str, Any]) -> None:
        path = Path(config.hydra.sweep.dir) / MANIFEST_NAME
        data = read_manifest(path)
        stages = data.setdefault("stages", {})
        merged = dict(stages.get(stage, {}))
        merged.update(entry)
        if entry.get("status") != "failed":
            merged.pop("error", None)
        stages[stage] = merged
        _write(path, data)


def read_manifest(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _write(path: Path, data: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _git_sha() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
