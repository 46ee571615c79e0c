"""What every rank runs: ``python -m umm.train.worker <run_dir>/resolved.yaml``.

No Hydra here (reference/ecosystem.md E4): the app composed and validated the config once and
wrote ``resolved.yaml``; each rank reads it back with plain OmegaConf, records what it read in
``<run_dir>/ranks/rank<RANK>.json`` (rank, world size, sha256 of the file: proof that all ranks
trained on the same config), and calls the trainer.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import List, Optional

from umm.config import load_resolved
from umm.config.schema import RootConfig
from umm.errors import UmmError, one_line

# The function a rank trains with. Overridable (module:function) so launch tests can run the real
# worker and torchrun without building a model.
TRAIN_ENTRY_ENV = "UMM_TRAIN_ENTRY"
DEFAULT_TRAIN_ENTRY = "umm.train.loop:train"
# How a rank reports an error the user can fix (the launcher repeats the first after torchrun's report).
ERROR_PREFIX = "umm.train.worker: error: "


def _train_fn():
    module, _, name = os.environ.get(TRAIN_ENTRY_ENV, DEFAULT_TRAIN_ENTRY).partition(":")
    return getattr(importlib.import_module(module), name)


def run(cfg: RootConfig) -> dict:
    """Train with ``cfg`` in this process (the in-process launcher calls this directly)."""
    return _train_fn()(cfg)


def record_rank(cfg: RootConfig, config_sha256: str) -> Path:
    rank = int(os.environ.get("RANK", 0))
    info = {
        "rank": rank,
        "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "config_sha256": config_sha256,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    path = Path(cfg.run_dir) / "ranks" / f"rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m umm.train.worker <run_dir>/resolved.yaml", file=sys.stderr)
        return 2
    path = Path(argv[0])
    if not path.is_file():
        print(f"umm.train.worker: {path} does not exist (run through `python -m umm`, which writes it)", file=sys.stderr)
        return 2
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    cfg = load_resolved(path)
    record_rank(cfg, sha)
    try:
        result = run(cfg)
    except UmmError as err:  # one line per rank; bugs keep their traceback
        # One write with its newline: the ranks share the pipe, and print's separate "\n" write let
        # two ranks' lines run together.
        sys.stderr.write(f"{ERROR_PREFIX}rank {os.environ.get('RANK', 0)}: {one_line(err)}\n")
        sys.stderr.flush()
        return 1
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"umm.train.worker: {json.dumps(result, default=str)}", flush=True)
    return 0


def exit_now(code: int) -> None:
    """Run the exit hooks, flush, and leave without interpreter teardown.

    After a finished run every file is closed and the process group destroyed, yet a communication
    library's background thread at times aborted a finished rank while C++ statics were destroyed
    (``terminate called without an active exception``, exit -6), failing a run that had succeeded.
    """
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:  # a Ctrl-C before the trainer took SIGINT over: one line, no traceback
        sys.stderr.write(f"umm.train.worker: rank {os.environ.get('RANK', 0)}: interrupted before training started\n")
        code = 130
    exit_now(code)
