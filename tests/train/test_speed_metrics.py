"""The trainer's own speed numbers (the bench's formula), its cold-start time and its compile settings."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import umm
from umm.config import ConfigError
from umm.config.schema import TrainConfig
from umm.config.validate import validate
from umm.data.loader import build_loader
from umm.data.packing import PackGeometry
from umm.methods import get_recipe
from umm.model.io import load_tokenizer, read_model_dims
from umm.train import flops as F
from umm.train.compiling import CACHE_ENV, prepare_compile
from umm.train.logging import read_metrics
from umm.train.loop import train

from ..scripts import load_script
from ..toolkit.helpers import compose_root
from .conftest import REPO, build_model_dir, run_config, worker_env


def test_logged_tokens_per_gpu_and_mfu_are_the_bench_formula_for_the_steps_batches(tmp_path, model_dir, data_root,
                                                                                    one_thread):
    from torch._dynamo.utils import counters

    frames = counters["frames"]["total"]
    cfg = run_config(tmp_path, model_dir, data_root, **{"train.max_steps": 3, "train.log_every": 2,
                                                        "train.grad_accum": 2})
    assert cfg.train.compile == "auto"
    train(cfg)
    finished = time.time()
    assert counters["frames"]["total"] == frames  # auto on CPU: dynamo compiled nothing

    # The same batches, from a loader built as the trainer builds it (the data order is seeded).
    dims = read_model_dims(model_dir)
    tok = load_tokenizer(model_dir)
    loader = build_loader(cfg, get_recipe(cfg.method), tok, tok.special, geometry=PackGeometry.from_dims(dims))
    batches = iter(loader)
    per_step = [[F.token_counts(next(batches)) for _ in range(2)] for _ in range(3)]
    loader.close()

    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 3]
    for row in rows:
        micro = per_step[row["step"] - 1]
        flops = sum(F.bagel_step_flops(dims, c)["total"] for c in micro)
        tokens = sum(c.tokens for c in micro)
        assert row["tokens"] == tokens
        assert row["tokens_per_s_per_gpu"] == pytest.approx(tokens / row["step_time_s"], rel=1e-9)
        assert row["tflop_per_step_per_gpu"] == pytest.approx(flops / 1e12, rel=1e-9)
        assert row["mfu"] == pytest.approx(flops / row["step_time_s"] / 989e12, rel=1e-9)
        assert 0 < row["data_wait_s"] < row["step_time_s"]  # data.num_workers=0: packed in the step
        assert not any(k.startswith("compile_") for k in row)  # counted only when compiling
    # A row's step_parts_ms splits its step into phases (two micro-batches' each added up) that account
    # for the step's time; the CPU has only the host clock.
    parts = rows[0]["step_parts_ms"]
    assert set(parts) == {"host"}
    host = parts["host"]
    assert set(host) == {"data", "to_device", "vae", "forward", "backward", "clip", "reduce", "optimizer", "ema"}
    assert sum(host.values()) == pytest.approx(rows[0]["step_time_s"] * 1e3, rel=0.05)
    assert host["data"] >= rows[0]["data_wait_s"] * 1e3 > 0
    assert host["forward"] > 0 and host["backward"] > 0 and host["optimizer"] > 0
    # Once per process, in the first row after its first step.
    assert 0 < rows[0]["time_to_first_step_s"] < finished - umm.PROCESS_START
    # Where those seconds went, in parts that add up to them (the model load, the first batch, ...).
    startup = rows[0]["startup_s"]
    assert list(startup) == ["launch", "model_build", "model_wrap", "model_weights", "model_rest", "optimizer", "data",
                             "first_batch", "first_step", "other"]
    assert all(v >= 0 for v in startup.values()) and startup["model_weights"] > 0 and startup["first_step"] > 0
    assert sum(startup.values()) == pytest.approx(rows[0]["time_to_first_step_s"], abs=0.01)
    assert "startup_s" not in rows[1]
    assert "time_to_first_step_s" not in rows[1]


def test_compile_defaults_to_auto_with_a_cache_under_the_output_root(clean_umm_env):
    cfg = validate(compose_root(["model=tiny", "data=synthetic"]))
    assert cfg.train.compile == "auto"
    assert cfg.train.compile_cache_dir == f"{cfg.output_root}/.cache/compile"
    assert validate(compose_root(["model=tiny", "data=synthetic", "train.compile=false"])).train.compile is False
    with pytest.raises(ConfigError, match=r"^train.compile = 'yes' is not a valid choice. Choose one of: auto"):
        validate(compose_root(["model=tiny", "data=synthetic", "train.compile=yes"]))


def test_a_share_of_blocks_checkpointed_trains_to_the_same_losses(tmp_path, data_root, one_thread, monkeypatch):
    from umm.train import parallel

    model_dir = build_model_dir(tmp_path / "model", num_hidden_layers=4)
    real, calls, losses = parallel.checkpoint, {}, {}
    for ac in (True, "every2", 0.25, False):
        calls[ac] = 0

        def counted(*args, _ac=ac, **kwargs):
            calls[_ac] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(parallel, "checkpoint", counted)
        train(run_config(tmp_path / str(ac), model_dir, data_root,
                         **{"train.max_steps": 2, "train.activation_checkpointing": ac}))
        losses[ac] = [r["loss"] for r in read_metrics(tmp_path / str(ac) / "metrics.jsonl")]
    # The same batches through 2 ViT and 4 LLM blocks: true recomputes all 6, every2 4 (both ViT blocks,
    # LLM 0 and 2), 0.25 3 (both ViT blocks, LLM 0), false none.
    assert calls[True] / 6 == calls["every2"] / 4 == calls[0.25] / 3 > 0 == calls[False]
    assert losses["every2"] == pytest.approx(losses[True], rel=1e-6) == losses[False] == pytest.approx(losses[0.25])


def test_auto_checkpointing_names_its_choice_in_the_run_log(tmp_path, model_dir, data_root, one_thread, capsys):
    # The worker plans on its own GPU (the launcher may have none): a tiny model fits any memory, so
    # nothing recomputes.
    train(run_config(tmp_path, model_dir, data_root, **{"train.max_steps": 1, "train.activation_checkpointing": "auto",
                                                        "train.gpu_memory_gib": 80, "logger.progress_bar": False}))
    assert "activation checkpointing auto: 0 of 2 LLM layers recompute" in capsys.readouterr().out


def test_a_profile_of_the_chosen_steps_shows_their_host_ops(tmp_path, model_dir, data_root, one_thread):
    import gzip
    import json

    cfg = run_config(tmp_path, model_dir, data_root, **{"train.max_steps": 4, "train.profile_at": 2,
                                                        "train.profile_steps": 2})
    train(cfg)
    profile = tmp_path / "profile"
    assert sorted(p.name for p in profile.iterdir()) == ["rank0_steps2-3.json.gz", "rank0_steps2-3.txt"]
    events = json.loads(gzip.decompress((profile / "rank0_steps2-3.json.gz").read_bytes()))["traceEvents"]
    # Both steps' forward (with the shapes of their ops), backward and optimizer ran in the record: two
    # optimizer steps apart in time (a process that profiled before may hook the step twice, nested).
    assert any(e.get("name") == "aten::mm" and e.get("args", {}).get("Input Dims") for e in events)
    assert any(str(e.get("name")).startswith("autograd::engine::evaluate_function") for e in events)
    steps = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "Optimizer.step#AdamWEma.step")
    assert sum(start > earlier_end for (start, _), (_, earlier_end) in zip(steps[1:], steps)) + bool(steps) == 2
    assert "Self CPU" in (profile / "rank0_steps2-3.txt").read_text()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")][-1] == 4  # the run went on


def test_a_profile_the_run_cannot_finish_is_refused_or_reported(tmp_path, model_dir, data_root, one_thread, capsys):
    from umm import faults

    with pytest.raises(ConfigError, match="train.profile_at = 3 with train.profile_steps = 2 records steps up to 4, "
                                          "past train.max_steps = 3"):
        validate(compose_root(["model=tiny", "data=synthetic", "train.max_steps=3", "train.profile_at=3"]))
    # Stopped inside the window (SIGTERM at step 3, the window 2-7): nothing half-written, and said.
    faults.install("term_at:phase=step,step=3")
    try:
        cfg = run_config(tmp_path, model_dir, data_root, **{"train.max_steps": 8, "train.profile_at": 2,
                                                            "train.profile_steps": 6})
        result = train(cfg)
    finally:
        faults.install(None)
    assert result["status"] == "stopped" and not (tmp_path / "profile").exists()
    assert f"the profile of steps 2-7 was not written: the run ended at step {result['step']}" in capsys.readouterr().out
    # Resumed at step 5 or later (the stop's checkpoint), past the window's start: said at the start.
    cfg = run_config(tmp_path, model_dir, data_root, **{"train.max_steps": 8, "train.profile_at": 2,
                                                        "train.profile_steps": 2})
    assert train(cfg)["status"] == "completed" and not (tmp_path / "profile").exists()
    assert (f"train.profile_at=2: the run resumed at step {result['step']}, so no profile is recorded"
            in capsys.readouterr().out)


def test_bench_app_times_the_trainer_and_the_bench_in_lora_mode(tmp_path, model_dir, data_root):
    # scripts/bench_app.py end to end on CPU: the app as UniCoT's LoRA run, bench_train.py with --lora.
    bench_app = load_script("bench_app")
    r = bench_app.main(["--tiny", "--model-path", str(model_dir), "--no-compile", "--device", "cpu", "--steps", "6",
                        "--drop", "1", "--tokens", "1024", "--lora", "8", "--layers", "2", "--work", str(tmp_path / "w"),
                        "--keep-metrics", str(tmp_path / "app.jsonl"), "--profile", str(tmp_path / "profile"),
                        "--inductor", "triton.autotune_pointwise=false", "--inductor", "max_autotune_gemm_backends=ATEN,TRITON"])
    # Steps 2-4 timed; 5 and 6 recorded by the profiler (slower), kept, and left out.
    assert r["lora"] == 8 and r["bench"]["lora"] == 8 and r["app"]["steps_timed"] == 3
    # The bench ran with both settings (the app, which checks its keys too, would have failed the run).
    assert {k: r["bench"]["inductor"][k] for k in ("triton.autotune_pointwise", "max_autotune_gemm_backends")} == {
        "triton.autotune_pointwise": False, "max_autotune_gemm_backends": "ATEN,TRITON"}  # a comma: no Hydra sweep
    timed_ms = [1000 * row["step_time_s"] for row in read_metrics(tmp_path / "app.jsonl")[1:4]]
    assert r["app"]["ms_per_step_median"] == pytest.approx(sorted(timed_ms)[1])
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == ["rank0_steps5-6.json.gz", "rank0_steps5-6.txt"]
    assert r["app"]["tokens_per_s_per_gpu"] > 0 and r["bench"]["tokens_per_s_per_gpu"] > 0
    assert 0 < r["app"]["data_wait_ms"] < r["app"]["ms_per_step"]
    # Where the app's timed steps went: the phases in their rows against the mean of their times.
    assert sum(r["app"]["parts_ms"]["host"].values()) == pytest.approx(r["app"]["ms_per_step"], rel=0.5)
    assert list((tmp_path / "w").iterdir()) == []  # the app wrote no checkpoint; its temporary dir is gone
    assert [row["step"] for row in read_metrics(tmp_path / "app.jsonl")] == [1, 2, 3, 4, 5, 6]  # kept: every step's row
    assert r["app_over_bench_tokens_per_s"] == pytest.approx(
        r["app"]["tokens_per_s_per_gpu"] / r["bench"]["tokens_per_s_per_gpu"])


def test_bench_app_weights_the_apps_datasets_to_the_benchs_sample_mix():
    # The app's packs are drawn by dataset weight; the bench packs a fixed batch. Same mix on average.
    bench_app, bench_train = load_script("bench_app"), load_script("bench_train")
    cfg = validate(compose_root(["model=tiny", "pipeline=bagel", "data=synthetic", *bench_app.bench_mix()]))
    datasets = cfg.data.datasets
    assert not any(d.is_mandatory for d in datasets.values())  # a mandatory one adds to every pack
    share = {d.kind: d.weight / sum(e.weight for e in datasets.values()) for d in datasets.values()}
    plans = bench_train.anchor_plans(torch.Generator().manual_seed(0), vocab=1024)
    kinds = [p.source.rsplit(".", 1)[1].replace("und", "vlm") for p in plans]
    assert share == {kind: pytest.approx(kinds.count(kind) / len(kinds)) for kind in set(kinds)}


def test_compiling_sets_the_kernel_cache_first_unless_the_user_chose_one(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    train_cfg = TrainConfig(compile="auto", compile_cache_dir="outputs/.cache/compile")
    assert prepare_compile(train_cfg, torch.device("cpu")) is False
    assert CACHE_ENV not in os.environ  # nothing compiles: torch's settings untouched
    assert prepare_compile(train_cfg, torch.device("cuda")) is True  # no GPU needed: nothing compiles yet
    assert os.environ[CACHE_ENV] == str(tmp_path / "outputs/.cache/compile")  # absolute: every rank agrees

    monkeypatch.setenv(CACHE_ENV, "/somewhere/mine")
    assert prepare_compile(TrainConfig(compile=True, compile_cache_dir="x"), torch.device("cpu")) is True
    assert os.environ[CACHE_ENV] == "/somewhere/mine"

    monkeypatch.delenv(CACHE_ENV)
    assert prepare_compile(TrainConfig(compile=True, compile_cache_dir=None), torch.device("cpu")) is True
    assert CACHE_ENV not in os.environ  # null: torch's own default
    assert prepare_compile(TrainConfig(compile=False, compile_cache_dir="x"), torch.device("cpu")) is False
    assert CACHE_ENV not in os.environ
    # Uncompiled blocks on CUDA still compile flex attention: its kernels are cached too.
    assert prepare_compile(TrainConfig(compile=False, compile_cache_dir="x"), torch.device("cuda")) is False
    assert os.environ[CACHE_ENV] == str(tmp_path / "x")
    assert not Path("x").exists()


def test_inductor_options_compose_are_checked_and_set_only_where_something_compiles(tmp_path, monkeypatch):
    from torch._inductor import config

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    # The command line nests a dotted key: +train.inductor_options.triton.autotune_pointwise=false.
    cfg = validate(compose_root(["model=tiny", "data=synthetic", "+train.inductor_options.triton.autotune_pointwise=false"]))
    with config.patch({"triton.autotune_pointwise": True}):  # inductor's settings as they were, after
        assert prepare_compile(cfg.train, torch.device("cpu")) is False
        assert config.triton.autotune_pointwise is True  # nothing compiles: inductor untouched
        assert prepare_compile(cfg.train, torch.device("cuda")) is True
        assert config.triton.autotune_pointwise is False
    for bad, said in [({"triton": {"autotune_pointwize": False}}, "triton.autotune_pointwize: torch._inductor.config "
                       "has no such option (this torch: {}); did you mean triton.autotune_pointwise?"),
                      ({"triton.autotune_pointwise": 1}, "triton.autotune_pointwise=1: the option holds a value of type bool")]:
        with pytest.raises(ConfigError) as e:  # also where nothing compiles
            prepare_compile(TrainConfig(compile=False, inductor_options=bad), torch.device("cpu"))
        assert str(e.value) == "train.inductor_options " + said.format(torch.__version__)


def test_compiled_blocks_do_not_recompile_after_the_first_step_over_packs_of_varying_length(
        tmp_path, model_dir, data_root, one_thread, monkeypatch):
    # aot_eager: dynamo's guards and recompiles as on a GPU, without inductor's C++ builds on CPU;
    # it also reports two kernels' compile times the way inductor's Triton compiles do.
    from umm.train import parallel

    monkeypatch.setattr(parallel, "COMPILE_BACKEND", reports_kernel_compiles("aot_eager"))
    torch._dynamo.reset()
    # As in a fresh process: dynamo's records of compiles are per process, and reset() keeps them.
    torch._dynamo.utils.clear_compilation_metrics()
    cfg = run_config(tmp_path, model_dir, data_root, **{"train.max_steps": 6, "train.compile": True,
                                                        "train.activation_checkpointing": True,
                                                        "train.num_sample_prompts": 2, "train.sample_steps": 2})
    train(cfg)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    # The final samples (an image and an answer) ran the blocks eagerly: no graph compiled after the
    # last step (no-grad, KV-cached and one-token calls each compiled new ones).
    assert (tmp_path / "samples" / "final.png").is_file()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == rows[-1]["compile_graphs"]
    assert len({r["tokens"] for r in rows}) > 3  # the packs do vary in length
    # Step 1 compiles the ViT and the decoder block (sharing the checkpoint wrapper's code: dynamo
    # counts the second as a recompile); later packs reuse both graphs.
    assert rows[0]["compile_recompiles"] <= 1
    assert [r["compile_recompiles"] for r in rows[1:]] == [rows[0]["compile_recompiles"]] * 5
    assert rows[-1]["compile_graphs"] == rows[0]["compile_graphs"]
    # The seconds spent compiling, logged for the first step's account, stop growing after it.
    assert rows[0]["compile_fwd_s"] > 0 and {r["compile_fwd_s"] + r["compile_bwd_s"] for r in rows} == {
        rows[0]["compile_fwd_s"] + rows[0]["compile_bwd_s"]}
    # The slowest kernels to compile, slowest first, each under the compile (graph) it belongs to, once:
    # in the first step's row.
    slowest = list(rows[0]["compile_slowest_kernels_s"].items())
    graphs = sorted({key.split("] ")[0] + "]" for key, _ in slowest})
    assert len(graphs) == 1 + rows[0]["compile_recompiles"]  # the ViT's block, the decoder's (a recompile)
    assert slowest == [(f"{graph} {name}", s) for name, s in KERNEL_COMPILES_S for graph in graphs]
    assert not any("compile_slowest_kernels_s" in r for r in rows[1:])


def test_every_graph_the_trainer_compiles_is_one_aotautograd_can_cache(tmp_path, model_dir, data_root, one_thread,
                                                                       monkeypatch):
    # A warm start loads each block's forward and backward from AOTAutograd's cache instead of tracing
    # them again. The decoder block holds a custom autograd Function (the expert row permutation), for
    # which torch bypasses that cache unless told otherwise; torch's own check judges each graph.
    from torch._dynamo.backends.registry import lookup_backend
    from torch._functorch._aot_autograd.autograd_cache import check_cacheable

    from umm.train import parallel

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    monkeypatch.setattr(parallel, "COMPILE_BACKEND", keep)
    torch._dynamo.reset()
    train(run_config(tmp_path, model_dir, data_root, **{"train.max_steps": 1, "train.compile": True}))
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes}
    assert len(graphs) >= 2 and "autograd_function_apply" in targets
    for gm in graphs:
        check_cacheable(gm)


KERNEL_COMPILES_S = [("triton_tem_fused_flex_attention_backward_0", 61.25), ("triton_red_fused_rms_norm_1", 2.5)]


def reports_kernel_compiles(backend: str):
    """``backend`` that also records what inductor records for each Triton kernel it compiles
    (torch/_inductor/async_compile.py): the kernel's name and compile time, in dynamo's compile record."""
    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.utils import get_metrics_context

    def compile_fn(gm, example_inputs):
        for name, seconds in KERNEL_COMPILES_S:
            get_metrics_context().add_top_n("triton_kernel_compile_times_us", name, int(seconds * 1e6))
        return lookup_backend(backend)(gm, example_inputs)

    return compile_fn


# In a fresh interpreter: torch without opaque types for custom ops (< 2.12; the GPU image has 2.11).
NO_OPAQUE_TYPES = """
import sys, torch
from torch._dynamo.utils import counters
real = sys.modules["torch._opaque_base"]
sys.modules["torch._opaque_base"] = None  # umm's import of it fails, as on a torch that lacks it
from umm.model import attention
sys.modules["torch._opaque_base"] = real  # torch's own later imports need it
from umm.train import parallel
from umm.train.logging import read_metrics
from umm.train.loop import train
from tests.train.conftest import run_config
from pathlib import Path
assert attention.per_sample_sdpa is None
parallel.COMPILE_BACKEND = "aot_eager"
out, model_dir, data_root = map(Path, sys.argv[1:])
train(run_config(out, model_dir, data_root, **{"train.max_steps": 1, "train.compile": True,
                                              "train.activation_checkpointing": True}))
print("GRAPH_BREAKS", sum(counters["graph_break"].values()), "GRAPHS", read_metrics(out / "metrics.jsonl")[0]["compile_graphs"])
"""


def test_blocks_compile_whole_where_torch_has_no_opaque_types(tmp_path, model_dir, data_root):
    # Per-sample SDPA is then traced into the checkpointed blocks, which must still compile without a
    # graph break (a side effect in it would run them eagerly).
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", NO_OPAQUE_TYPES, str(tmp_path / "run"), str(model_dir), str(data_root)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=worker_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GRAPH_BREAKS 0 GRAPHS 2" in proc.stdout, proc.stdout[-2000:]
