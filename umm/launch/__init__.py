"""Launch a validated run: in this process, as torchrun, on SLURM nodes, or a third-party script.

``launch_training(cfg)`` is what the bagel / recA / unicot pipelines run (and IRG per stage).
With ``cfg.dry_run`` it prints the exact command(s) instead of running them.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
from pathlib import Path
from typing import Dict, List

from umm.config.schema import RootConfig
from umm.config.validate import ConfigError
from umm.launch.command import Command, LaunchError
from umm.train.worker import ERROR_PREFIX as WORKER_ERROR_PREFIX


def launch_mode(cfg: RootConfig) -> str:
    """external | slurm | torchrun | inprocess."""
    if cfg.launcher.name == "external":
        return "external"
    if cfg.launcher.name == "slurm":
        return "slurm"
    if cfg.torchrun.nnodes * cfg.torchrun.nproc_per_node > 1:
        return "torchrun"
    return "inprocess"


def plan_commands(cfg: RootConfig, env=os.environ) -> List[Command]:
    """The command(s) a run executes; for SLURM outside an allocation, one per node."""
    from umm.launch import external, slurm, torchrun

    mode = launch_mode(cfg)
    if mode == "external":
        return [external.external_command(cfg)]
    if mode == "torchrun":
        return [Command(torchrun.worker_argv(cfg))]
    if mode == "inprocess":
        return [Command(torchrun.inprocess_equivalent(cfg))]
    if slurm.in_allocation(env):
        return [_node_command(cfg, slurm.node_torchrun(cfg, env))]
    return [_node_command(cfg, slurm.node_torchrun(cfg, env, node_rank=r)) for r in range(cfg.torchrun.nnodes)]


def _node_command(cfg: RootConfig, t) -> Command:
    from umm.launch import torchrun

    if t.nnodes * t.nproc_per_node == 1:
        return Command(torchrun.inprocess_equivalent(cfg))
    return Command(torchrun.worker_argv(cfg, t))


def launch_training(cfg: RootConfig) -> Dict:
    mode = launch_mode(cfg)
    commands = plan_commands(cfg)
    if cfg.dry_run:
        _print_plan(cfg, mode, commands)
        return {"status": "dry_run", "commands": [c.shell() for c in commands]}
    if mode == "slurm":
        from umm.launch.slurm import in_allocation

        if not in_allocation(os.environ):
            raise ConfigError(
                "launcher=slurm runs inside a SLURM allocation: submit with `python -m umm -m launcher=slurm ...` "
                "(needs `pip install -e .[slurm]` for Hydra's submitit launcher) or scripts/umm_slurm.sbatch."
            )
    (command,) = commands
    if mode != "external":
        _check_data(cfg)
        from umm.train.distributed import DeviceError, check_gpus

        try:  # before anything starts: one message instead of a failure on every rank
            check_gpus(cfg.train.device, cfg.torchrun.nproc_per_node)
        except DeviceError as err:
            raise ConfigError(str(err)) from None
    if mode == "inprocess" or (mode == "slurm" and cfg.torchrun.nnodes * cfg.torchrun.nproc_per_node == 1):
        from umm.launch.inprocess import run_inprocess

        return run_inprocess(cfg)
    log = Path(cfg.run_dir) / "train.log"
    if mode == "external":
        from umm.launch.process import run_streamed

        code = run_streamed(command, log)
        if code != 0:
            raise LaunchError(f"{cfg.launcher.entrypoint} {cfg.launcher.script} exited with code {code}; "
                              f"its output is in {log.absolute()}", code)
        return {"status": "completed", "exit_code": 0, "log": str(log.absolute())}
    return _run_torchrun(cfg, command, log)


def _check_data(cfg: RootConfig) -> None:
    """Once, before any process loads the model: write the synthetic set if asked, then check that every
    dataset can feed the run (umm/data/loader.py, check_data)."""
    from umm.data.loader import check_data, ensure_synthetic
    from umm.methods import get_recipe

    ensure_synthetic(cfg.data)
    check_data(cfg, get_recipe(cfg.method))


def _run_torchrun(cfg: RootConfig, command: Command, log: Path) -> Dict:
    from umm.launch.process import run_streamed
    from umm.train.checkpoint import latest_complete

    # torchrun SIGKILLs its ranks 30 s after a signal it gets itself (SLURM signals every process) by
    # default: let them use their grace period.
    env = {**command.env, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(math.ceil(cfg.train.grace_period_s) + 30)}
    checkpoints = Path(cfg.run_dir) / "checkpoints"
    signals = []  # (signal, newest complete checkpoint when it came)
    code = run_streamed(dataclasses.replace(command, env=env), log, signal_children=True,
                        on_signal=lambda signum: signals.append((signum, latest_complete(checkpoints))))
    if signals:
        # The ranks got the signal (torchrun did not, unless it came before they started): a clean
        # stop ends torchrun with 0, a signal that reached torchrun itself with non-zero.
        name, before = signal.Signals(signals[0][0]).name, signals[0][1]
        newest = latest_complete(checkpoints)
        if newest is not None and newest != before:
            return {"status": "stopped", "signal": name, "last_checkpoint": str(newest), "log": str(log.absolute())}
    if code != 0 and signals:
        raise LaunchError(f"torchrun stopped on {name} without a new checkpoint (newest complete: {newest}; "
                          f"train.grace_period_s={cfg.train.grace_period_s}); its output is in {log.absolute()}", code)
    if code != 0:
        cause = _first_rank_error(log)
        raise LaunchError(f"torchrun exited with code {code}{': ' + cause if cause else ''}; "
                          f"its output is in {log.absolute()}", code)
    return {"status": "completed", "exit_code": 0, "log": str(log.absolute())}


def _first_rank_error(log: Path) -> str:
    """The first rank's one-line error (umm.train.worker prints it), repeated after torchrun's report."""
    try:
        with open(log, errors="replace") as f:
            for line in f:
                if line.startswith(WORKER_ERROR_PREFIX):
                    return line[len(WORKER_ERROR_PREFIX):].strip()
    except OSError:
        pass
    return ""


def _print_plan(cfg: RootConfig, mode: str, commands: List[Command]) -> None:
    if mode == "slurm":
        settings = _slurm_settings()
        if settings:
            print("# sbatch settings (Hydra's submitit launcher; submit with -m):")
            print(settings, end="")
        for rank, command in enumerate(commands):
            print(f"# node {rank} of {len(commands)} (SLURM_NODEID={rank}, one task per node):")
            print(command.shell())
        return
    print(f"# command ({mode}):")
    for command in commands:
        print(command.shell())


def _slurm_settings() -> str:
    """The resolved ``hydra.launcher`` node, when running under Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return ""
    node = HydraConfig.get().launcher
    settings = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "_target_"}
    return OmegaConf.to_yaml(settings)


__all__ = ["Command", "LaunchError", "launch_mode", "launch_training", "plan_commands"]
