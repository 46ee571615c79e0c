"""The seed's way of running a third-party training script (``launcher=external``)."""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List

from umm.config.schema import RootConfig
from umm.launch.command import Command
from umm.launch.torchrun import torchrun_prefix


def _text(value: Any) -> str:
    # The seed's rule: booleans as Python spells them (HfArgumentParser reads "True"/"False").
    return ("True" if value else "False") if isinstance(value, bool) else str(value)


def build_args(args: Dict[str, Any]) -> List[str]:
    """``{k: v}`` -> ``--k v``; lists repeat the flag; None drops the key."""
    out: List[str] = []
    for key, value in args.items():
        if value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            out += [f"--{key}", _text(item)]
    return out


def external_command(cfg: RootConfig) -> Command:
    launcher = cfg.launcher
    entry = {
        "python": [sys.executable],
        "bash": ["bash"],
        "torchrun": torchrun_prefix(cfg),
    }[launcher.entrypoint]
    cwd = os.path.abspath(launcher.cwd) if launcher.cwd else None
    return Command(
        argv=[*entry, launcher.script, *build_args(launcher.args)],
        cwd=cwd,
        env={str(k): _text(v) for k, v in launcher.env.items()},
    )
