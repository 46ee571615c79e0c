"""Fixtures for the reliability suite: a tiny model dir, a small synthetic set, and the real CLI.

Runs here go through ``python -m umm`` (the command a user types) so "restart with the same
command" means exactly that; faults land at exact points through ``UMM_FAULT`` (umm/faults.py).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

import umm as umm_package
from tests.train.conftest import SMALL, build_model_dir, run_config  # noqa: F401  (re-exported)
from umm.data.synthetic import generate
from umm import faults

REPO = Path(__file__).resolve().parents[2]
PACKAGE = Path(umm_package.__file__).resolve().parent


def frames_in_umm(text: str) -> List[str]:
    """The traceback frames (``File "<path>", line N``) in ``text`` whose file is part of the umm package.
    By resolved path, not by name: the checkout (and the venv inside it) may live in a folder called umm."""
    files = re.findall(r'^\s*File "([^"]+)", line \d+', text, re.M)
    return [f for f in files if Path(f).resolve().is_relative_to(PACKAGE)]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate(str(root), SMALL)
    return root


@pytest.fixture(autouse=True)
def _one_thread_no_faults(one_thread):
    """In-process runs use one thread and start with no fault armed (whatever UMM_FAULT says)."""
    faults.install(None)
    yield
    faults.install(None)


def small_run(model_dir: Path, data_root: Path, run_dir: Path, *extra: str) -> List[str]:
    """CLI overrides for an 8-step SFT run of the tiny model on CPU (t2i + vlm, short epochs)."""
    return [
        "train=tiny", "optim=adamw", "data=synthetic", f"model.path={model_dir}", f"data.root={data_root}", f"run_dir={run_dir}",
        "train.max_steps=8", "train.save_every=2", "train.keep_last=3", "train.log_every=1",
        "train.num_sample_prompts=0", "logger.tensorboard=false", "logger.progress_bar=false",
        "data.expected_num_tokens=256", "data.max_num_tokens=320", "data.max_num_tokens_per_sample=256",
        "data.prefer_buffer_before=128", "~data.datasets.edit", "~data.datasets.interleaved",
        # Short epochs (8 and 4 rows): every checkpoint lies in the middle of a later epoch.
        "data.datasets.t2i.num_used=8", "data.datasets.vlm.num_used=4",
        *extra,
    ]


def cli_env(fault: Optional[str] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UMM_", "SLURM_"))}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    if fault:
        env["UMM_FAULT"] = fault
    return env


def start(args: List[str], fault: Optional[str] = None) -> subprocess.Popen:
    """``python -m umm <args>`` in its own session (so a test can signal its whole process group)."""
    return subprocess.Popen([sys.executable, "-m", "umm", *args], cwd=REPO, env=cli_env(fault),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the app, torchrun, ranks and workers
        out, _ = proc.communicate()
        raise AssertionError(f"{proc.args} did not finish within {timeout} s:\n{out[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def umm(args: List[str], fault: Optional[str] = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return finish(start(args, fault), timeout)


def losses(run_dir: Path) -> List[tuple]:
    return [(r["step"], r["loss"]) for r in map(json.loads, open(Path(run_dir) / "metrics.jsonl"))]


def metrics(run_dir: Path) -> List[dict]:
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def checkpoints(run_dir: Path) -> List[str]:
    """Names under <run_dir>/checkpoints (complete ones and any left-over temp dirs)."""
    d = Path(run_dir) / "checkpoints"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
