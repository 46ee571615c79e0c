"""Your own data in one command: the datasets you give replace the data option's, never merge into them.

- On the command line, ``data.datasets={mine: {kind: t2i, path: captions.jsonl}}``: the run reads
  exactly the names given there (Hydra would merge them into the option's mix).
- In a YAML file anywhere on disk, ``data.file=<path>`` (no Hydra ``--config-dir``): the file holds
  keys of ``data`` (umm/config/schema.py, DataConfig), e.g. ``datasets: {mine: {kind: t2i, path:
  captions.jsonl}}``. Its ``datasets`` replace the option's and every other key it sets replaces the
  option's value; ``name`` defaults to the file's name, ``root`` to the file's folder (a relative one
  is read from there) and ``synthesize`` to false (the file names the data). A ``data.*`` key on the
  command line wins (datasets the file names are changed in the file: Hydra composes before it is read).

``data=files`` (conf/data/files.yaml) is the data option with no datasets of its own.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, List, Optional, Set

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from umm.errors import UmmError

_KEY = re.compile(r"^(?:\+\+|\+)?(data(?:\.[\w\-]+)+)=")


class DataFileError(UmmError, ValueError):
    """A data.file that cannot be read as a data config."""


def _cli_data_keys(overrides: List[str]) -> List[str]:
    keys = [m.group(1) for m in map(_KEY.match, overrides) if m]
    return [k for k in keys if k != "data.file"]


def _given_names(overrides: List[str]) -> Optional[Set[str]]:
    """The dataset names of the last ``data.datasets={...}`` on the command line (None: there is none)."""
    given = [o for o in overrides if (m := _KEY.match(o)) and m.group(1) == "data.datasets"]
    if not given:
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    value = OverridesParser.create().parse_overrides(given[-1:])[0].value()
    return set(value) if isinstance(value, dict) else None


def _apply_file(cfg: DictConfig, overrides: List[str]) -> None:
    path = os.path.abspath(os.path.expanduser(cfg.data.file))
    try:
        loaded = OmegaConf.load(path)
    except FileNotFoundError:
        raise DataFileError(f"data.file={path} does not exist") from None
    except (OSError, OmegaConfBaseException, ValueError) as exc:  # yaml's errors are ValueErrors
        raise DataFileError(f"data.file={path} is not readable YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(loaded, DictConfig) or "data" in loaded:
        raise DataFileError(f"data.file={path} must be a mapping of data keys (datasets, root, ...), "
                            "without a top-level 'data:'")
    keep = {key: OmegaConf.select(cfg, key) for key in _cli_data_keys(overrides)}
    folder = os.path.dirname(path)
    with open_dict(cfg):
        if "datasets" in loaded:
            cfg.data.datasets = {}
        cfg.data.name = os.path.splitext(os.path.basename(path))[0]
        cfg.data.synthesize = False
        cfg.data.root = folder
        cfg.data = OmegaConf.merge(cfg.data, loaded)
        cfg.data.root = os.path.join(folder, cfg.data.root)  # an absolute root stays as it is
        cfg.data.file = path
        for key, value in keep.items():
            OmegaConf.update(cfg, key, value, merge=False)


def apply_user_data(cfg: DictConfig, overrides: Iterable[str] = ()) -> None:
    """Apply ``data.file`` and a command-line ``data.datasets={...}`` to ``cfg`` in place;
    ``overrides`` are the command line's."""
    overrides = [str(o) for o in overrides]
    if OmegaConf.select(cfg, "data.file"):
        _apply_file(cfg, overrides)
    names = _given_names(overrides)
    if names is not None:
        for name in [n for n in cfg.data.datasets if n not in names]:
            del cfg.data.datasets[name]
