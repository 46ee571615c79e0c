"""The one Hydra entry point: compose -> validate -> write resolved.yaml -> launch the pipeline.

``python -m umm [group=option ...] [key=value ...]`` (console script: ``umm``). Hydra runs only
here, once; ranks read the resolved file (umm/train/worker.py).
"""
from __future__ import annotations

import logging
import sys
from contextlib import nullcontext
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import umm.config.store  # noqa: F401  (registers the schema Hydra composes onto)
from umm.config.jobdir import job_run_dir
from umm.config.validate import ConfigError, check_overrides, validate
from umm.errors import UmmError, one_line
from umm.launch.command import LaunchError


def _own_run_dir(cfg: DictConfig) -> None:
    """In a multirun, a job whose ``run_dir`` is the sweep dir runs in its own job dir, named from its
    overrides (umm/config/jobdir.py), so a sweep over optim.lr never resumes one job from another's
    checkpoints, and a sweep run again resumes each job from its own."""
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        cfg.run_dir = job_run_dir(cfg.run_dir, hc.sweep.dir, hc.runtime.output_dir)


def _start_run_files(cfg: DictConfig, run_dir: Path) -> None:
    """Once the config is valid: what Hydra would have written before validating it (conf/config.yaml
    turns that off), i.e. ``.hydra/config.yaml`` and ``overrides.yaml``, and ``umm.log`` for the log."""
    from umm.launch.rundir import write_atomic
    from umm.launch.runlock import RunDirWriteError

    try:
        write_atomic(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
        overrides = list(HydraConfig.get().overrides.task)
        write_atomic(run_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)))
        log_file = logging.FileHandler(run_dir / "umm.log")
    except OSError as err:
        raise RunDirWriteError(run_dir, err) from None
    # The console handler's format (conf/hydra/job_logging/umm.yaml); Hydra replaces both per job.
    console = next(iter(logging.getLogger().handlers), None)
    log_file.setFormatter(console.formatter if console else None)
    logging.getLogger().addHandler(log_file)


def run(cfg: DictConfig):
    """The task: everything the app does after Hydra composed ``cfg``; returns the pipeline's result."""
    from umm.launch.rundir import claim_run_dir
    from umm.pipelines import get_pipeline

    _own_run_dir(cfg)
    root = validate(cfg, HydraConfig.get().overrides.task)
    text = OmegaConf.to_yaml(OmegaConf.structured(root))
    resolved = Path(root.run_dir) / "resolved.yaml"
    if root.launcher.name != "external":
        from umm.train.memory_plan import check

        check(root)
    if root.train.inductor_options:  # keys this torch lacks: named here, before a job queues (dry runs too)
        from umm.train.compiling import inductor_options

        inductor_options(root.train.inductor_options)
    if root.dry_run:
        print(f"# umm dry run, nothing runs: pipeline={root.pipeline.name} run_dir={Path(root.run_dir).absolute()}")
        print(f"# resolved config (a real run writes it to {resolved.absolute()}):")
        print(text, end="")
    # A real launch holds the run dir's lock, checks a resume's config and records it (umm/launch/rundir.py),
    # and only then writes Hydra's files and the log there.
    with nullcontext() if root.dry_run else claim_run_dir(root, text):
        if not root.dry_run:
            _start_run_files(cfg, Path(root.run_dir))
        result = get_pipeline(root.pipeline.name)(root)
    if not root.dry_run and isinstance(result, dict):
        print(f"umm: {result.get('status')}: {Path(root.run_dir).absolute()} {result}", flush=True)
    return result


# ../conf as an absolute path: Hydra would read a relative one as a Python package under `python -m`.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig):
    try:
        return run(cfg)
    except UmmError as err:
        # In a multirun the job must fail as a job (Hydra records it, the sweeper stops the chain).
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        if isinstance(err, ConfigError):
            print(f"umm: config error: {err}", file=sys.stderr)
            sys.exit(getattr(err, "exit_code", 2))
        # A launched process failed: its own error is already on the console and in train.log.
        print(f"umm: {err}" if isinstance(err, LaunchError) else f"umm: error: {one_line(err)}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 1))


# `umm <name> ...`: commands that are not a training run, each a module with `main(argv) -> int`.
# Kept apart from Hydra's parser: their arguments are paths and flags, not overrides.
SUBCOMMANDS: dict[str, str] = {"data": "umm.datatool.cli", "export": "umm.export.cli", "sample": "umm.sample.cli"}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        import importlib

        sys.exit(importlib.import_module(SUBCOMMANDS[sys.argv[1]]).main(sys.argv[2:]))
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as err:
        print(f"umm: config error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        _hydra_main()
    except KeyboardInterrupt as err:  # Ctrl-C outside training (or a second one under torchrun)
        print(f"umm: {err or 'interrupted (Ctrl-C)'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
