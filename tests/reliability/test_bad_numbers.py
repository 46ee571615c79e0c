"""Bad numbers: a NaN/inf loss or gradient stops the run with the step and the batch's sources, the
last good checkpoint stays the newest complete one, and train.max_bad_steps bad steps are skipped."""
from __future__ import annotations

import json
import math
import re

import pytest
from safetensors.torch import load_file

from umm import faults
from umm.train.checkpoint import latest_complete
from umm.train.loop import NonFiniteError, train

from .conftest import checkpoints, metrics, run_config


@pytest.fixture
def fault():
    return faults.install  # conftest disarms it after each test


def _stopped_run(tmp_path, model_dir, data_root, spec, fault, **overrides):
    fault(spec)
    cfg = run_config(tmp_path, model_dir, data_root, **{"train.max_steps": 6, "train.save_every": 2, **overrides})
    with pytest.raises(NonFiniteError) as err:
        train(cfg)
    return str(err.value)


def _sources(message):
    """(dataset, manifest, line) of each sample in the bad batch."""
    return re.findall(r"'(\w+):([^':]+\.jsonl):(\d+)'", message)


def test_nan_loss_stops_with_step_and_sources_and_keeps_the_last_good_checkpoint(tmp_path, model_dir, data_root, fault):
    message = _stopped_run(tmp_path, model_dir, data_root, "nan_at:phase=loss,step=3", fault)
    assert "at step 3: loss=nan" in message and "train.max_bad_steps=0" in message
    sources = _sources(message)
    assert sources and all(path.startswith(str(data_root)) for _, path, _ in sources)
    assert f"newest complete checkpoint is {tmp_path / 'checkpoints' / '0000002'}" in message
    assert checkpoints(tmp_path) == ["0000002"]
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]


def test_inf_gradient_stops_the_run(tmp_path, model_dir, data_root, fault):
    message = _stopped_run(tmp_path, model_dir, data_root, "inf_at:phase=step,step=3", fault)
    loss, grad_norm = re.search(r"at step 3: loss=(\S+) grad_norm=(\S+);", message).groups()
    assert math.isfinite(float(loss)) and not math.isfinite(float(grad_norm))
    assert _sources(message)
    assert latest_complete(tmp_path / "checkpoints").name == "0000002"


def test_bad_steps_up_to_max_bad_steps_are_skipped_then_the_run_stops(tmp_path, model_dir, data_root, fault):
    message = _stopped_run(tmp_path, model_dir, data_root, "nan_at:phase=loss,step=3-5", fault,
                           **{"train.max_bad_steps": 2})
    assert "at step 5:" in message and "after 3 bad steps" in message
    rows = metrics(tmp_path)
    assert [(r["step"], r["skipped_update"]) for r in rows] == [(1, False), (2, False), (3, True), (4, True)]
    assert checkpoints(tmp_path) == ["0000002", "0000004"]


def test_skipped_steps_do_not_update_and_the_run_finishes(tmp_path, model_dir, data_root, fault):
    fault("nan_at:phase=loss,step=2;inf_at:phase=step,step=4")
    cfg = run_config(tmp_path, model_dir, data_root, **{"train.max_steps": 5, "train.save_every": 5,
                                                        "train.max_bad_steps": 2})
    assert train(cfg)["status"] == "completed"
    assert [r["skipped_update"] for r in metrics(tmp_path)] == [False, True, False, True, False]
    last = tmp_path / "checkpoints" / "0000005"
    optim = load_file(str(last / "state" / "shards.rank00000.safetensors"))
    assert {float(v) for k, v in optim.items() if k.startswith("optim/") and k.endswith(".step")} == {3.0}  # 5 steps, 2 skipped
    weights = load_file(str(last / "model.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())
    assert json.loads((last / "state" / "meta.json").read_text())["step"] == 5
