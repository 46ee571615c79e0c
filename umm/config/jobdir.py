"""The directory of one multirun job, named from the job's own overrides.

``-m optim.lr=1e-3,2e-3 run_name=sw`` runs its jobs in ``<output_root>/sw/optim.lr=0.001`` and
``.../optim.lr=0.002``: the same job gets the same directory whatever the order of the sweep's
values and however many are added, so running a sweep again resumes each job from its own
checkpoints. Hydra hands each job its overrides as ``key=value`` with the value normalised
(``1e-3`` and ``0.001`` are both ``0.001``); the name is those overrides sorted by key, each
percent-escaped to be one safe file name (``/`` -> ``%2F``, ``,`` -> ``%2C``), joined with ``,``.

Keys that say where a run lives or how it is started and shown, not what it trains, stay out of
the name (``NOT_IN_NAME``), so a sweep moved to SLURM or to a quieter logger resumes where it was.
A job with no other override is ``defaults``; a name longer than ``MAX_LEN`` keeps its start and
gets a short hash of the whole name.

``conf/config.yaml`` uses it as ``hydra.sweep.subdir`` through the ``umm.job_dir`` resolver
(registered by umm/config/store.py). ``pipeline=irg`` keeps its own ``<run_name>/stage{1,2}``.
"""
from __future__ import annotations

import hashlib
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Iterable
from urllib.parse import quote

# fnmatch patterns of keys (``launcher`` is the group choice; ``launcher.args.*`` and the other keys of
# an external script do name a job).
NOT_IN_NAME = (
    "run_name", "output_root", "run_dir", "dry_run",
    "launcher", "launcher.slurm.*", "logger", "logger.*",
    "torchrun.node_rank", "torchrun.standalone", "torchrun.rdzv_*", "torchrun.max_restarts",
)
EMPTY = "defaults"
MAX_LEN = 120
_HASH_LEN = 8


def override_key(override: str) -> str:
    """``+launcher.args.lr=1`` -> ``launcher.args.lr``; ``~data.datasets.edit`` -> ``data.datasets.edit``."""
    return override.partition("=")[0].lstrip("+~")


def names_job(key: str) -> bool:
    return not any(fnmatchcase(key, pattern) for pattern in NOT_IN_NAME)


def job_dirname(overrides: Iterable[str]) -> str:
    kept = sorted((override_key(o), o) for o in overrides if names_job(override_key(o)))
    # Escape everything but letters, digits, "_.-~", "=" and "+": the separator "," cannot occur inside.
    name = ",".join(quote(o, safe="=+") for _, o in kept) or EMPTY
    if len(name) > MAX_LEN:
        digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_LEN]
        name = f"{name[:MAX_LEN - _HASH_LEN - 1]}-{digest}"
    return name


def job_run_dir(run_dir: str, sweep_dir: str, job_dir: str) -> str:
    """A job whose ``run_dir`` is the sweep dir (the default ``${output_root}/${run_name}``) runs in
    its own job dir instead; a ``run_dir`` set otherwise is kept."""
    return job_dir if Path(run_dir).absolute() == Path(sweep_dir).absolute() else run_dir
