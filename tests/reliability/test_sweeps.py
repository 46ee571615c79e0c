"""A sweep run again resumes each job from its own checkpoints, whatever the order of its values."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .conftest import metrics, small_run, umm


def _jobs_by_lr(sweep_dir: Path) -> dict:
    """{optim.lr: job dir} of the jobs that wrote a resolved.yaml (names: tests/toolkit/test_cli.py)."""
    return {yaml.safe_load(p.read_text())["optim"]["lr"]: p.parent for p in sweep_dir.glob("*/resolved.yaml")}


@pytest.mark.slow
def test_a_sweep_run_again_in_another_order_resumes_each_job_from_its_own_dir(tmp_path, model_dir, data_root):
    def sweep(values: str, fault=None):
        # run_dir is the sweep dir (output_root/run_name), as by default: each job gets a dir of its own.
        args = small_run(model_dir, data_root, tmp_path / "sw", "train.max_steps=4", f"output_root={tmp_path}",
                         "run_name=sw")
        return umm(["-m", f"optim.lr={values}", *args], fault)

    first = sweep("1e-3,2e-3", "term_at:phase=step,step=2")
    assert first.returncode == 0, first.stdout[-3000:]
    # The stop ends the sweep: job 0 saved at step 2 and the job after it did not start.
    (low,) = _jobs_by_lr(tmp_path / "sw").values()
    assert f"umm: stopped: {low} " in first.stdout and "the sweep's later jobs did not start" in first.stdout

    again = sweep("2e-3,1e-3")
    assert again.returncode == 0, again.stdout[-3000:]
    jobs = _jobs_by_lr(tmp_path / "sw")
    assert sorted(jobs) == [1e-3, 2e-3] and jobs[1e-3] == low
    job0, job1 = again.stdout.split(f"umm: completed: {jobs[2e-3]} ")
    assert "resumed from" not in job0
    assert f"resumed from {low / 'checkpoints' / '0000002'} at step 2" in job1
    for lr, run in jobs.items():
        assert [(r["step"], r["lr"]) for r in metrics(run)] == [(step, pytest.approx(lr)) for step in (1, 2, 3, 4)]
