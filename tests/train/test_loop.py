"""Real training runs of a tiny Bagel on CPU: learning, resume, init, freezing, bad numbers."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from umm.data.shapes import COLOURS, SHAPES
from umm.train.checkpoint import latest_complete
from umm.train.loop import NonFiniteError, train
from umm.train.state_dict import upstream_key

from .conftest import build_model_dir, run_config


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(run_dir / "metrics.jsonl"))]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_loss_decreases_and_checkpoints_are_kept(tmp_path, model_dir, data_root):
    cfg = run_config(tmp_path, model_dir, data_root, **{"train.max_steps": 12, "train.keep_last": 2,
                                                        "logger.tensorboard": True, "logger.progress_bar": True})
    result = train(cfg)
    assert result["status"] == "completed" and result["step"] == 12
    seq = [loss for _, loss in losses(tmp_path)]
    assert len(seq) == 12
    assert sum(seq[-3:]) / 3 < 0.9 * sum(seq[:3]) / 3
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["0000008", "0000012"]
    last = tmp_path / "checkpoints" / "0000012"
    assert result["last_checkpoint"] == str(last)
    model, ema = load_file(str(last / "model.safetensors")), load_file(str(last / "ema.safetensors"))
    reference = load_file(str(model_dir / "ema.safetensors"))
    assert set(model) == set(ema) == set(reference)  # upstream key names
    assert all(v.dtype == torch.float32 for v in model.values())
    row = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert {"step", "ce", "mse", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "skipped_samples",
            "mem_gb"} <= set(row)
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_save_at_end_false_writes_no_last_checkpoint_but_keeps_the_scheduled_ones(tmp_path, model_dir, data_root,
                                                                                   async_save):
    # Steps 2 and 4 are scheduled saves, step 5 the end: only the scheduled ones are written, none
    # consolidated; the step-4 one, written in the background with async_save, is complete by the end.
    cfg = run_config(tmp_path, model_dir, data_root, **{"train.max_steps": 5, "train.save_every": 2,
                                                        "train.save_at_end": False, "train.async_save": async_save})
    result = train(cfg)
    four = tmp_path / "checkpoints" / "0000004"
    assert result["status"] == "completed" and result["last_checkpoint"] == str(four)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0000002", "0000004"]
    assert latest_complete(tmp_path / "checkpoints") == four and not (four / "model.safetensors").exists()


def test_wandb_without_the_package_is_one_clear_error(tmp_path):
    from umm.config.schema import LoggerConfig
    from umm.train.logging import LoggerSetupError, RunLogger

    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    with pytest.raises(LoggerSetupError, match="logger.wandb=false"):
        RunLogger(LoggerConfig(wandb=True, tensorboard=False, progress_bar=False), tmp_path, enabled=True,
                  start_step=0, total_steps=1, run_name="x")


def test_resumed_run_repeats_the_uninterrupted_losses(tmp_path, model_dir, data_root):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(run_config(whole, model_dir, data_root, **{"train.max_steps": 8}))
    first = train(run_config(split, model_dir, data_root, **{"train.max_steps": 5}))
    assert first["step"] == 5
    second = train(run_config(split, model_dir, data_root, **{"train.max_steps": 8}))
    assert second["status"] == "completed" and second["step"] == 8
    assert losses(split) == losses(whole)  # exact: same data order, same random streams
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(whole / "checkpoints" / "0000008" / name))
        b = load_file(str(split / "checkpoints" / "0000008" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_master_weights_in_the_optimizer_train_save_fp32_and_resume_exactly(tmp_path, model_dir, data_root):
    """bf16 parameters for compute, fp32 masters in the optimizer (the default on one GPU)."""
    from umm.train import distributed as D
    from umm.train.loop import Trainer

    over = {"train.precision": "bf16", "train.master_weights": "optimizer"}
    whole, split = tmp_path / "whole", tmp_path / "split"
    env = D.setup("cpu")
    trainer = Trainer(run_config(whole, model_dir, data_root, **over, **{"train.max_steps": 6}), env)
    assert trainer.run()["step"] == 6
    names = [n for n, _ in trainer.trainable]
    assert names == [n for n, _ in trainer.weights]
    assert all(p.dtype == torch.bfloat16 for _, p in trainer.trainable)
    assert all(torch.equal(p, w.to(torch.bfloat16)) for (_, p), (_, w) in zip(trainer.trainable, trainer.weights))
    saved = load_file(str(whole / "checkpoints" / "0000006" / "model.safetensors"))
    masters = {upstream_key(n): w for n, w in trainer.weights}
    assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], masters[k]) for k in masters)
    assert any(not torch.equal(w, w.to(torch.bfloat16).float()) for w in masters.values())  # not rounded
    seq = [loss for _, loss in losses(whole)]
    assert sum(seq[-2:]) < sum(seq[:2])

    train(run_config(split, model_dir, data_root, **over, **{"train.max_steps": 4}))
    train(run_config(split, model_dir, data_root, **over, **{"train.max_steps": 6}))
    assert losses(split) == losses(whole)
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(whole / "checkpoints" / "0000006" / name))
        b = load_file(str(split / "checkpoints" / "0000006" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_another_runs_ema(tmp_path, model_dir, data_root):
    source = tmp_path / "source"
    train(run_config(source, model_dir, data_root, **{"train.max_steps": 4}))
    target = tmp_path / "target"
    # lr 0: the one step leaves the weights exactly as initialised.
    train(run_config(target, model_dir, data_root, **{
        "train.max_steps": 1, "optim.lr": 0.0, "method.init_from": str(source / "checkpoints"),
        "method.init_from_ema": True}))
    ema = load_file(str(latest_complete(source / "checkpoints") / "ema.safetensors"))
    got = load_file(str(target / "checkpoints" / "0000001" / "model.safetensors"))
    assert all(torch.equal(ema[k], got[k]) for k in ema)


def test_frozen_parts_stay_bitwise_and_get_no_optimizer_state(tmp_path, model_dir, data_root):
    from umm.model.parts import part_of

    cfg = run_config(tmp_path, model_dir, data_root, **{"train.max_steps": 3, "method.trainable": ["llm_gen", "gen_heads"]})
    train(cfg)
    before = load_file(str(model_dir / "ema.safetensors"))
    ckpt = tmp_path / "checkpoints" / "0000003"
    after = load_file(str(ckpt / "model.safetensors"))
    shards = load_file(str(ckpt / "state" / "shards.rank00000.safetensors"))
    optim_params = {k[len("optim/"):].rsplit(".", 1)[0] for k in shards if k.startswith("optim/")}
    for key in before:
        trainable = part_of(key) in ("llm_gen", "gen_heads") and not key.endswith("pos_embed.pos_embed")
        if trainable:
            assert key in optim_params
        else:
            assert torch.equal(before[key], after[key]), key
            assert key not in optim_params
    moved = [k for k in optim_params if not torch.equal(before[k], after[k])]
    assert moved and len(moved) >= len(optim_params) - 2  # zero-init llm2vae bias may stay put by chance


def test_nan_loss_stops_with_step_and_sources(tmp_path, model_dir, data_root):
    broken = build_model_dir(tmp_path / "broken")
    weights = load_file(str(broken / "ema.safetensors"))
    weights["vae2llm.weight"][0, 0] = float("nan")
    save_file(weights, str(broken / "ema.safetensors"))
    cfg = run_config(tmp_path / "run", broken, data_root, **{"train.max_steps": 3, "train.max_bad_steps": 1})
    with pytest.raises(NonFiniteError, match=r"step 2: .*t2i") as err:
        train(cfg)
    assert "max_bad_steps=1" in str(err.value)
    assert latest_complete(tmp_path / "run" / "checkpoints") is None


def test_resume_with_other_trainable_parts_is_refused(tmp_path, model_dir, data_root):
    train(run_config(tmp_path, model_dir, data_root, **{"train.max_steps": 2}))
    cfg = run_config(tmp_path, model_dir, data_root, **{"train.max_steps": 4, "method.trainable": ["llm_gen"]})
    with pytest.raises(RuntimeError, match="other parameters"):
        train(cfg)


def test_gradient_accumulation_counts_every_micro_batch(tmp_path, model_dir, data_root):
    # lr 0: the weights stay put, so two 1-batch steps see what one 2-micro-batch step sees.
    one = run_config(tmp_path / "one", model_dir, data_root, **{"train.max_steps": 2, "optim.lr": 0.0})
    two = run_config(tmp_path / "two", model_dir, data_root, **{"train.max_steps": 1, "train.grad_accum": 2,
                                                               "optim.lr": 0.0})
    train(one), train(two)
    a, b = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
    row = json.loads(open(tmp_path / "two" / "metrics.jsonl").readline())
    assert row["tokens"] == a["tokens"] + b["tokens"]
    # CE has no random draw; MSE does (flow noise is keyed by step and micro-step, so it differs).
    assert row["ce"] == pytest.approx((a["ce"] + b["ce"]) / 2, rel=1e-5)


def test_sample_grids_and_the_colour_check_are_written(tmp_path, model_dir, data_root):
    cfg = run_config(tmp_path, model_dir, data_root, **{
        "train.max_steps": 2, "train.sample_every": 1, "train.num_sample_prompts": 3, "train.sample_steps": 2})
    result = train(cfg)
    samples = tmp_path / "samples"
    assert (samples / "step0000001.png").stat().st_size > 0 and (samples / "final.png").stat().st_size > 0
    final = json.loads((samples / "final.json").read_text())
    assert final["num_images"] == 24 and len(final["checked"]) == 24  # every colour x shape
    assert {p["prompt"] for p in final["checked"]} == {f"a {c} {s}" for c in COLOURS for s in SHAPES}
    assert result["samples"]["colour_accuracy"] == final["colour_accuracy"]


def test_resume_false_starts_over_and_replaces_old_checkpoints(tmp_path, model_dir, data_root):
    train(run_config(tmp_path, model_dir, data_root, **{"train.max_steps": 4}))
    old = load_file(str(tmp_path / "checkpoints" / "0000004" / "model.safetensors"))
    result = train(run_config(tmp_path, model_dir, data_root, **{
        "train.max_steps": 4, "train.resume": False, "optim.lr": 1e-4}))
    assert result["step"] == 4 and [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4]
    new = load_file(str(tmp_path / "checkpoints" / "0000004" / "model.safetensors"))
    assert any(not torch.equal(old[k], new[k]) for k in old)


def test_a_steps_numbers_are_read_after_the_next_step_is_queued(tmp_path, model_dir, data_root, monkeypatch):
    """The host never waits for a step before it has queued the next one, except where the loop acts on
    the step itself (the first step, saves, samples, the last step), and every step is logged in order."""
    from umm.train.loop import Trainer

    order = []
    queue, read = Trainer._train_step, Trainer._read_step

    def queued(self, data_iter, after=None):
        step = queue(self, data_iter, after)
        order.append(f"q{step.step}")
        return step

    def numbers(self, step):
        order.append(f"r{step.step}")
        return read(self, step)

    monkeypatch.setattr(Trainer, "_train_step", queued)
    monkeypatch.setattr(Trainer, "_read_step", numbers)
    cfg = run_config(tmp_path, model_dir, data_root, **{"train.max_steps": 8, "train.save_every": 3,
                                                        "train.sample_every": 5, "train.num_sample_prompts": 1,
                                                        "train.log_every": 1})
    train(cfg)
    assert order == "q1 r1 q2 q3 r2 r3 q4 q5 r4 r5 q6 r6 q7 q8 r7 r8".split()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["step_time_s"] > 0 and r["step_parts_ms"]["host"]["forward"] > 0 for r in rows)
