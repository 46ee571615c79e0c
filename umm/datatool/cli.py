"""``umm data check|show [--config-dir DIR] [OVERRIDE ...]``: look at the data a training run would read.

The data selection is the training run's own: the same overrides (``pipeline=recA data=my_mix
data.root=/data``) are composed with Hydra's compose API from ``conf/`` (plus ``--config-dir``, as a
training run takes it), validated, and the recipe builds its plans through the loader's own code
(umm/data/loader.py). No model weights are loaded: only the tokenizer of ``model.path``.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from umm.errors import UmmError, one_line

USAGE = """umm data check [--config-dir DIR] [OVERRIDE ...]
       umm data show  [--config-dir DIR] [-n N] [--out PNG] [OVERRIDE ...]"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="umm data", usage=USAGE, description=(
        "check: read every row of every dataset as training would, list each bad row as file:line, print "
        "per-dataset statistics, exit 1 on bad rows. show: render the first packed samples to a PNG. "
        "OVERRIDEs are those of a training run (pipeline=..., data=..., data.root=...)."))
    parser.add_argument("command", choices=("check", "show"))
    parser.add_argument("--config-dir", help="a folder of extra config groups (e.g. data/my_mix.yaml), as "
                                             "`python -m umm --config-dir DIR` takes it")
    parser.add_argument("-n", type=int, default=8, help="show: how many samples (default 8)")
    parser.add_argument("--out", default="data_show.png", help="show: the PNG to write (default data_show.png)")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE")
    return parser


def compose(overrides: List[str], config_dir: Optional[str] = None):
    """The validated ``RootConfig`` a training run with these overrides would resolve to."""
    import os

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import umm.config.store  # noqa: F401  (registers the schema Hydra composes onto)
    from umm.app import CONF_DIR
    from umm.config.validate import ConfigError, check_overrides, validate

    check_overrides(overrides)
    if config_dir is not None:
        if not os.path.isdir(config_dir):
            raise ConfigError(f"--config-dir {config_dir} is not a folder")
        # What --config-dir does for the app: one more place to look for config groups.
        overrides = [f"hydra.searchpath=[file://{os.path.abspath(config_dir)}]", *overrides]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    except Exception as exc:  # Hydra's own errors (unknown group option, bad override syntax)
        raise ConfigError(" ".join(str(exc).split())) from None
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} in the config resolves
    task_overrides = list(cfg.hydra.overrides.task)  # as the app validates: data.* keys beat a data.file
    with open_dict(cfg):
        del cfg["hydra"]
    return validate(cfg, task_overrides)


def main(argv: List[str]) -> int:
    args = _parser().parse_intermixed_args(argv)
    if args.n < 1:
        print("umm data: -n must be at least 1", file=sys.stderr)
        return 2
    from umm.config.validate import ConfigError

    try:
        cfg = compose(args.overrides, args.config_dir)
    except ConfigError as err:
        print(f"umm data: config error: {err}", file=sys.stderr)
        return 2
    try:
        if args.command == "check":
            from umm.datatool.check import run_check

            return run_check(cfg)
        from umm.datatool.show import run_show

        return run_show(cfg, args.n, args.out)
    except UmmError as err:
        print(f"umm data: error: {one_line(err)}", file=sys.stderr)
        return 1
