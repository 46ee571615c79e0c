"""``umm export``: a tiny run's checkpoint becomes a BAGEL model dir that our strict loader reads back."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from umm.export.cli import main as export_main
from umm.model.io import load_model_dir, materialize_from_file

REPO = Path(__file__).resolve().parents[2]


def _bf16_exact(out: Path, weights: str, expected: dict) -> None:
    """The strict loader reads ``out``; every tensor is stored in bf16 and equals ``expected``'s bf16 value."""
    with safe_open(str(out / f"{weights}.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    state = load_model_dir(out, weights=weights, dtype=torch.float32).bagel.state_dict()
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], v.to(torch.bfloat16).float()), k


def test_export_run_dir_both_weights_then_refuse_to_overwrite(sft_run, model_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "umm", "export", str(sft_run), str(out), "--weights", "both"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    ckpt = sft_run / "checkpoints" / "0000002"  # the run's newest complete checkpoint
    for weights in ("ema", "model"):
        _bf16_exact(out, weights, load_file(str(ckpt / f"{weights}.safetensors")))
    ema, raw = (load_file(str(out / f"{w}.safetensors")) for w in ("ema", "model"))
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # each file holds the weights asked for
    copied = [f.name for f in model_dir.iterdir() if f.name not in ("ema.safetensors", "model.safetensors")]
    assert {"llm_config.json", "vit_config.json", "tokenizer.json", "ae.safetensors"} <= set(copied)
    for name in copied:
        assert (out / name).read_bytes() == (model_dir / name).read_bytes(), name

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert export_main(cmd[4:]) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and len(err.splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_lora_export_merges_as_peft_does_and_keeps_a_peft_adapter(lora_run, model_dir, tmp_path):
    from peft import PeftModel

    ckpt = lora_run / "checkpoints" / "0000002"
    assert export_main([str(ckpt), str(tmp_path / "merged"), "--weights", "both"]) == 0
    assert export_main([str(ckpt), str(tmp_path / "adapter"), "--lora", "adapter"]) == 0
    for weights, adapter in (("ema", "adapter_ema"), ("model", "adapter")):
        # peft's own merge: base + scaling * B @ A in fp32. The base is the model dir's (LoRA trains
        # nothing else, so the checkpoint holds no copy of it)
        assert not (ckpt / f"{weights}.safetensors").exists()
        base = load_model_dir(model_dir).bagel
        materialize_from_file(base, model_dir / "ema.safetensors", device="cpu", dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(ckpt / adapter)).merge_and_unload().state_dict()
        _bf16_exact(tmp_path / "merged", weights, merged)
    plain = load_file(str(model_dir / "ema.safetensors"))
    changed = [k for k, v in load_file(str(tmp_path / "merged" / "ema.safetensors")).items()
               if not torch.equal(v, plain[k].to(torch.bfloat16))]
    assert changed and all(k.endswith(("q_proj.weight", "v_proj_moe_gen.weight", "up_proj.weight", "down_proj.weight"))
                           for k in changed)

    out = tmp_path / "adapter"
    assert not (out / "model.safetensors").exists() and (out / "adapter_ema" / "adapter_config.json").is_file()
    _bf16_exact(out, "ema", plain)  # the base, unmerged
    adapted = PeftModel.from_pretrained(load_model_dir(out).bagel, str(out / "adapter_ema"))
    saved = load_file(str(ckpt / "adapter_ema" / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in adapted.state_dict().items() if ".lora_B." in k}
    assert len(lora_b) == sum(".lora_B." in k for k in saved)
    assert all(torch.equal(v, saved[k.replace(".default", "")]) for k, v in lora_b.items())


def test_checkpoint_of_only_shards_resumes_exactly_and_exports_as_a_consolidated_one(model_dir, data_root, tmp_path):
    """train.export_every=0: checkpoint 2 of 4 holds only the ranks' shards; it resumes exactly, and
    ``umm export`` assembles from it what a consolidated checkpoint 2 (export_every=2) holds."""
    import json
    import shutil

    from tests.export.conftest import _trained
    from tests.train.conftest import run_config

    def losses(run_dir):
        return [(r["step"], r["loss"]) for r in map(json.loads, open(run_dir / "metrics.jsonl"))]

    # Frozen parts too: a resume and an export read them from the model dir, not from the shards.
    over = {"train.max_steps": 4, "train.save_every": 2, "method.trainable": ["llm_gen", "gen_heads"]}
    shards_only, consolidated = tmp_path / "shards_only", tmp_path / "consolidated"
    _trained(shards_only, run_config(shards_only, model_dir, data_root, **over))
    _trained(consolidated, run_config(consolidated, model_dir, data_root, **over, **{"train.export_every": 2}))
    two, four = (shards_only / "checkpoints" / s for s in ("0000002", "0000004"))
    reference = consolidated / "checkpoints" / "0000002"
    names = ("model.safetensors", "ema.safetensors")
    assert not any((two / n).exists() for n in names) and all((four / n).is_file() for n in names)
    assert all((reference / n).is_file() for n in names)
    assert losses(shards_only) == losses(consolidated)
    trained = json.loads((two / "state" / "meta.json").read_text())["trainable"]
    shards = load_file(str(two / "state" / "shards.rank00000.safetensors"))
    assert sorted(k[len("model/"):] for k in shards if k.startswith("model/")) == sorted(trained)
    assert len(trained) < len(load_file(str(model_dir / "ema.safetensors")))

    out = tmp_path / "exported"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "umm", "export", str(two), str(out), "--weights", "both"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    for weights in ("ema", "model"):
        _bf16_exact(out, weights, load_file(str(reference / f"{weights}.safetensors")))

    shutil.rmtree(four)  # resume from the checkpoint of only shards
    _trained(shards_only, run_config(shards_only, model_dir, data_root, **over))
    assert losses(shards_only) == losses(consolidated)
    for name in names:
        a = load_file(str(four / name))
        b = load_file(str(consolidated / "checkpoints" / "0000004" / name))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
