"""Run the real CLI in a subprocess, and read what a dry run printed."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
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


def compose_root(overrides: List[str]):
    """The job config as the app sees it (hydra node set, so ${hydra:...} resolves), composed in process."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import umm.config.store  # noqa: F401  (registers the schema the config composes onto)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
