"""Run the real CLI in a subprocess, and read what a dry run printed."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def umm(args: List[str], *, env: Optional[Dict[str, str]] = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("UMM_", "SLURM_"))}
    full_env.update({"OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run([PY, "-m", "umm", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def commands(stdout: str) -> List[List[str]]:
    """argv of every command line a dry run printed (the line after each `# command` / `# node` header)."""
    lines = stdout.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith(("# command", "# node ")):
            out.append(shlex.split(lines[i + 1]))
    return out


def files_under(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())
