"""IRG test fixtures: a tiny model dir (untrained autoencoder: these tests check wiring, not pictures),
a small trajectory set, and a runner for the real ``python -m umm`` command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    import torch

    from umm.model.autoencoder import AutoEncoder
    from umm.model.config import dims_from_build_config
    from umm.model.io import build_bagel, save_model_dir
    from umm.model.tiny import tiny_model_config, vocabulary
    from umm.model.tokenizer import build_word_level

    cfg = tiny_model_config()
    out = tmp_path_factory.mktemp("models") / "tiny"
    torch.manual_seed(0)
    save_model_dir(build_bagel(dims_from_build_config(cfg), seed=0), out, ae=AutoEncoder(cfg.ae).eval())
    build_word_level(vocabulary()).save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="session")
def irg_data(tmp_path_factory) -> Path:
    from umm.data.synthetic_irg import write_irg_dataset

    return write_irg_dataset(tmp_path_factory.mktemp("data") / "irg", num=8, size=64, seed=0)


def sweep_args(model: Path, data: Path, out: Path, run_name: str = "t", steps: int = 3) -> list:
    """A short CPU sweep: `steps` steps per stage, a checkpoint every step, every row logged."""
    return [
        "pipeline=irg", "data=${method}", f"model.path={model}", f"data.root={data}", "data.synthesize=false",
        f"output_root={out}", f"run_name={run_name}", "train=tiny", "optim=tiny",
        f"train.max_steps={steps}", "train.save_every=1", "train.keep_last=10", "train.log_every=1",
        "train.sample_steps=2", "train.num_sample_prompts=1",
        "data.expected_num_tokens=256", "data.max_num_tokens=320", "data.max_num_tokens_per_sample=256",
        "data.prefer_buffer_before=192",
        "logger.progress_bar=false", "logger.tensorboard=false",
    ]


def umm_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UMM_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    return env


def run_umm(args, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "umm", *args], cwd=REPO, env=umm_env(), capture_output=True,
                          text=True, timeout=timeout, **popen)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def metric_steps(run_dir: Path) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
