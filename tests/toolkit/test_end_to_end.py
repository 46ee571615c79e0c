"""The CLI trains the real model in-process (2 steps), and the same command again resumes."""
import json

import pytest

from tests.train.conftest import SMALL, build_model_dir
from umm.data.synthetic import generate

from .helpers import umm


@pytest.mark.slow
def test_cli_trains_then_the_same_command_resumes(tmp_path):
    model, data = build_model_dir(tmp_path / "model"), tmp_path / "data"
    generate(str(data), SMALL)
    args = [f"model.path={model}", "data=synthetic", "model.vit_max_num_patch_per_side=4", f"data.root={data}", "data.synthesize=false",
            "train=tiny", "optim=tiny", "train.max_steps=2", "train.save_every=2", "train.num_sample_prompts=0",
            "logger.progress_bar=false", "logger.tensorboard=false", "run_name=e2e", f"output_root={tmp_path / 'out'}"]
    first = umm(args, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    run = tmp_path / "out" / "e2e"
    assert (run / "checkpoints" / "0000002" / "COMPLETE").exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 2
    # Written by the app once the config was valid (Hydra itself writes nothing, conf/config.yaml).
    assert (run / ".hydra" / "overrides.yaml").read_text().splitlines() == [f"- {a}" for a in args]
    assert "run_name: e2e" in (run / ".hydra" / "config.yaml").read_text() and (run / "umm.log").is_file()
    again = umm(args, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    # Resumed at step 2 of 2: nothing more was trained, nothing was logged again.
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == steps
