"""The tiny model dir builder: complete upstream layout, strict load, round trip, trained autoencoder."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from umm.data.packing import PackGeometry, pack
from umm.data.plan import ImageItem, SamplePlan, TextItem
from umm.data.shapes import render, to_tensor
from umm.model.io import load_model_dir, save_model_dir
from umm.model.tiny import (
    MARKER,
    AETraining,
    TinyModelError,
    build_tiny_model_dir,
    psnr,
    shape_images,
    tiny_model_config,
    train_autoencoder,
)
from umm.model.tokenizer import UNKNOWN

REPO = Path(__file__).resolve().parents[2]
# A few AE steps: enough to exercise the build, far from the real PSNR target (tested separately).
QUICK = AETraining(num_images=16, num_val=4, max_steps=4, min_steps=4, eval_every=4, min_psnr=0.0)
FILES = {"llm_config.json", "vit_config.json", "bagel_config.json", "ae_config.json", "ae.safetensors",
         "ema.safetensors", "tokenizer.json", "build_info.json", MARKER}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny", tiny_model_config(), ae_training=QUICK,
                                log=lambda msg: None)


def test_dir_is_complete_and_loads_strictly(tiny_dir):
    assert {p.name for p in tiny_dir.iterdir()} == FILES
    cfg = tiny_model_config()
    m = load_model_dir(tiny_dir)
    assert m.config.llm.hidden_size == cfg.llm.hidden_size
    assert m.config.bagel.latent_downsample == 16 and m.config.bagel.latent_token_dim == 16
    assert len(m.tokenizer) <= cfg.llm.vocab_size
    ids = m.tokenizer.encode("draw a purple diamond on white")
    assert m.tokenizer.token_to_id(UNKNOWN) not in ids
    # The latent scale/shift were measured on the trained AE, not copied from the preset.
    ae_cfg = json.loads((tiny_dir / "ae_config.json").read_text())
    assert (ae_cfg["scale_factor"], ae_cfg["shift_factor"]) != (cfg.ae.scale_factor, cfg.ae.shift_factor)


def test_building_a_complete_dir_does_nothing(tiny_dir):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()}
    build_tiny_model_dir(tiny_dir, tiny_model_config(), ae_training=QUICK, log=lambda msg: None)
    assert {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()} == before


def test_concurrent_builders_build_once(tmp_path):
    """Parallel `make` targets / test sessions: the second builder waits and finds the dir complete."""
    logs = []
    threads = [
        threading.Thread(target=build_tiny_model_dir, args=(tmp_path / "tiny", tiny_model_config()),
                         kwargs=dict(ae_training=QUICK, log=logs.append))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (tmp_path / "tiny" / MARKER).is_file()
    assert sum("written to" in m for m in logs) == 1 and sum("nothing to do" in m for m in logs) == 1


def test_incomplete_dir_is_refused(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "ema.safetensors").write_text("half written")
    with pytest.raises(FileExistsError, match="without a COMPLETE marker"):
        build_tiny_model_dir(tmp_path / "tiny", tiny_model_config(), ae_training=QUICK)


def test_round_trip_gives_identical_outputs(tiny_dir, tmp_path):
    a = load_model_dir(tiny_dir)
    out = tmp_path / "copy"
    save_model_dir(a.bagel, out, ae=a.ae)
    shutil.copy(tiny_dir / "tokenizer.json", out / "tokenizer.json")
    b = load_model_dir(out)
    for k, v in a.bagel.state_dict().items():
        assert torch.equal(v, b.bagel.state_dict()[k]), k
    tok, geo = a.tokenizer, PackGeometry.from_dims(a.config)
    assert geo == PackGeometry.from_dims(b.config)
    plans = [
        SamplePlan([TextItem(tok.encode("a red circle")),
                    ImageItem(to_tensor(render("red", "circle", 64, 1)), "vae_noised", loss=True)]),
        SamplePlan([ImageItem(to_tensor(render("blue", "square", 56, 2)), "vit"),
                    TextItem(tok.encode("what colour is it")), TextItem(tok.encode("blue"), loss=True)]),
    ]
    batch = pack(plans, special=tok.special, geometry=geo, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lat_a = a.ae.encode(batch.padded_images, generator=torch.Generator().manual_seed(0))
        lat_b = b.ae.encode(batch.padded_images, generator=torch.Generator().manual_seed(0))
        assert torch.equal(lat_a, lat_b)
        noise = torch.randn(batch.num_gen, a.config.bagel.latent_token_dim, generator=torch.Generator().manual_seed(1))
        oa, ob = a.bagel(batch, lat_a, noise), b.bagel(batch, lat_b, noise)
    assert torch.equal(oa.ce_per_token, ob.ce_per_token) and torch.equal(oa.mse_per_token, ob.mse_per_token)


def test_autoencoder_below_its_floor_fails_the_build():
    with pytest.raises(TinyModelError, match="PSNR"):
        train_autoencoder(tiny_model_config().ae, AETraining(num_images=8, num_val=4, max_steps=2, min_steps=2,
                                                             eval_every=2, min_psnr=25.0), log=lambda msg: None)


@pytest.mark.slow
def test_script_builds_a_dir_whose_autoencoder_reconstructs_shapes(tmp_path):
    """scripts/make_tiny_model.py as `make tiny-model` runs it (AE trained with the defaults):
    at least 25 dB on held-out renders with the sampled posterior, latents scaled to ~N(0, 1)."""
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), "--out", str(out)],
                   check=True, cwd=REPO, capture_output=True, text=True)
    assert json.loads((out / "build_info.json").read_text())["ae_val_psnr_db"] >= 25.0
    ae = load_model_dir(out).ae
    fresh = shape_images(48, 64, seed=123456)
    assert psnr(ae, fresh, sample=True) >= 25.0
    with torch.no_grad():
        latent = ae.encode(fresh, sample=False)
    assert abs(latent.mean().item()) < 0.2 and 0.7 < latent.std().item() < 1.3
