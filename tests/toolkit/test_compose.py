"""Every pipeline x torchrun option composes, validates, and matches its resolved-config snapshot.

Snapshots: tests/toolkit/golden/<pipeline>-<torchrun>.yaml. After an intended config change,
regenerate them with `make golden` (UMM_UPDATE_GOLDEN=1) and review the diff.
"""
import difflib
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import umm.config.store  # noqa: F401
from umm.config import ConfigError, RootConfig, validate
from umm.launch import launch_mode, plan_commands

from .helpers import CONF, compose_root

GOLDEN = Path(__file__).parent / "golden"
PIPELINES = sorted(p.stem for p in (CONF / "pipeline").glob("*.yaml"))
TORCHRUNS = sorted(p.stem for p in (CONF / "torchrun").glob("*.yaml"))
# multinode needs a rendezvous host (launcher=slurm fills it in); everything else runs as shipped.
EXTRA = {"multinode": ["torchrun.rdzv_endpoint=node0:29500"]}
UPDATE = os.environ.get("UMM_UPDATE_GOLDEN") == "1"  # read before clean_umm_env clears UMM_*


@pytest.mark.parametrize("torchrun", TORCHRUNS)
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_pipeline_torchrun_composes_validates_and_matches_golden(pipeline, torchrun, clean_umm_env):
    cfg = validate(compose_root([f"pipeline={pipeline}", f"torchrun={torchrun}", *EXTRA.get(torchrun, [])]))
    assert isinstance(cfg, RootConfig)
    assert cfg.pipeline.name == pipeline
    assert launch_mode(cfg) == ("inprocess" if torchrun == "single" else "torchrun")
    assert len(plan_commands(cfg)) == 1
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    golden = GOLDEN / f"{pipeline}-{torchrun}.yaml"
    if UPDATE:
        golden.write_text(text)
    assert golden.is_file(), f"{golden} missing: run `make golden`"
    diff = "".join(difflib.unified_diff(golden.read_text().splitlines(True), text.splitlines(True), str(golden), "now"))
    assert not diff, f"resolved config changed; if intended, run `make golden`:\n{diff}"


def test_every_option_of_every_group_composes(clean_umm_env):
    for group_dir in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"):
        for option in sorted(group_dir.glob("*.yaml")):
            overrides = [f"{group_dir.name}={option.stem}"]
            if group_dir.name == "torchrun":
                overrides += EXTRA.get(option.stem, [])
            if group_dir.name == "launcher" and option.stem == "external":
                overrides.append("launcher.script=train.py")
            validate(compose_root(overrides))


def test_plus_key_inside_a_schema_node_is_rejected_after_composition(clean_umm_env):
    # Hydra itself accepts this (reference/ecosystem.md E6); the walk must not.
    cfg = compose_root(["+optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr' \(value: 1\)\. Did you mean 'optim\.lr'\?"):
        validate(cfg)


def test_plus_key_in_free_form_map_is_accepted(clean_umm_env):
    cfg = validate(compose_root(["+launcher.env.NCCL_DEBUG=INFO", "+launcher.args.lr=1e-5"]))
    assert cfg.launcher.env == {"NCCL_DEBUG": "INFO"} and cfg.launcher.args == {"lr": 1e-5}


def test_dataset_kind_is_a_checked_choice(clean_umm_env):
    with pytest.raises(ConfigError, match=r"data\.datasets\.t2i\.kind = 'txt2img' is not a valid choice"):
        validate(compose_root(["data.datasets.t2i.kind=txt2img"]))


def test_env_vars_choose_paths(monkeypatch, clean_umm_env):
    monkeypatch.setenv("UMM_MODEL_CACHE", "/models")
    monkeypatch.setenv("UMM_DATA", "/data")
    monkeypatch.setenv("UMM_OUTPUTS", "/runs")
    cfg = validate(compose_root(["model=bagel_7b_mot", "run_name=x"]))
    assert (cfg.model.path, cfg.data.root, cfg.run_dir) == ("/models/BAGEL-7B-MoT", "/data/bagel", "/runs/x")
