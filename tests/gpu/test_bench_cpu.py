"""scripts/bench_train.py end to end on the CPU at tiny widths: one process, and FSDP2 over two gloo
processes (the path the GPU runs take, minus CUDA)."""
import gzip
import json
import os
import subprocess
import sys

import pytest
import torch

from .bench import SCRIPT, bench_train

TINY = ["--tiny", "--device", "cpu", "--no-compile", "--layers", "2", "--vit-layers", "1", "--steps", "2", "--warmup", "1"]


@pytest.mark.parametrize("fsdp", [False, True])
def test_one_process_reports_a_consistent_step(tmp_path, fsdp):
    torch.set_num_threads(1)
    out = tmp_path / "bench.jsonl"
    r = bench_train.main(TINY + ["--out", str(out), "--tag", "t"] + (["--fsdp"] if fsdp else []))
    assert r["fsdp"] is fsdp and not torch.distributed.is_initialized()
    assert json.loads(out.read_text().splitlines()[-1]) == json.loads(json.dumps(r))
    assert r["tokens_per_gpu"] == 15873 and r["gpus"] == 1 and r["layers"] == 2 and r["vit_layers"] == 1
    step_s = r["step_wall_ms"] / 1000
    assert sum(r["phase_ms"].values()) == pytest.approx(r["step_ms"]["mean"])
    assert r["host_phase_ms"] == r["phase_ms"]  # the CPU: the host's clock is the only one
    # The wall time over the timed steps holds their phases (plus the gaps between them).
    assert r["step_ms"]["mean"] <= r["step_wall_ms"] < r["step_ms"]["mean"] * 1.5
    assert r["mfu"] == pytest.approx(r["tflop_per_step_per_gpu"] * 1e12 / step_s / 989e12)
    assert r["tokens_per_s_per_gpu"] == pytest.approx(15873 / step_s)
    (ce0, mse0), (ce1, mse1) = r["loss_first_last"]
    assert 0 < ce1 < ce0 and mse0 > 0  # random tiny model: CE starts near ln(vocab) and falls
    assert r["trainable_params"] == r["trainable_params_on_rank0"] > 0


def test_vae_runs_the_frozen_encoder_in_each_step_as_a_phase_of_its_own():
    torch.set_num_threads(1)
    plain, vae = (bench_train.main(TINY + flag) for flag in ([], ["--vae"]))
    assert "vae" not in plain["phase_ms"] and plain["vae"] is False and vae["vae"] is True
    assert vae["phase_ms"]["vae"] > 0 and sum(vae["phase_ms"].values()) == pytest.approx(vae["step_ms"]["mean"])
    assert vae["tokens_per_gpu"] == plain["tokens_per_gpu"]  # the same batch; the encoder's latents train it
    (ce0, mse0), (ce1, mse1) = vae["loss_first_last"]
    assert 0 < ce1 < ce0 and mse0 > 0


def test_trace_holds_the_steps_host_ops_with_shapes(tmp_path):
    torch.set_num_threads(1)
    trace = tmp_path / "step.json.gz"
    bench_train.main(TINY + ["--steps", "1", "--trace", str(trace)])
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    mms = [e for e in events if e.get("name") in ("aten::mm", "aten::addmm", "aten::linear")]
    assert mms and all(e["args"].get("Input Dims") for e in mms)


def test_real_widths_on_cpu_is_one_clear_error():
    with pytest.raises(bench_train.BenchConfigError, match="--tiny"):
        bench_train.main(["--device", "cpu"])


def test_fsdp2_over_two_gloo_processes_shards_and_trains(tmp_path):
    out = tmp_path / "bench.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
            *TINY, "--ema", "cpu", "--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (r,) = [json.loads(line) for line in out.read_text().splitlines()]  # rank 0 writes once
    assert r["gpus"] == 2 and r["reshard_after_forward"] is True
    # Every trainable tensor is split over the two ranks (dim-0 shards, rounded up).
    assert r["trainable_params"] / 2 <= r["trainable_params_on_rank0"] < r["trainable_params"] / 2 + 4096
    (ce0, _), (ce1, _) = r["loss_first_last"]
    assert 0 < ce1 < ce0


def test_mlp_time_is_the_matmuls_of_ops_with_an_mlp_width():
    ops = [
        ([[16, 3584], [18944, 3584]], [("nvjet_sm90_tst_128x256", 500.0), ("triton_poi_fused_mul_silu_1", 100.0)]),
        ([[16, 3584], [3584, 3584], []], [("nvjet_sm90_tst_192x192", 300.0)]),  # an attention projection
        ([[5103, 1152], [4304, 1152], []], [("cutlass_75_tensorop_bf16_gemm", 200.0)]),  # the ViT's fc1
        ([], [("adamw_ema", 1000.0)]),
        ([[[18944, 3584], [3584]], []], [("multi_tensor_apply_kernel", 50.0)]),  # a tensor list, not a matmul
    ]
    assert bench_train.mlp_matmul_ms(ops, (18944, 4304)) == pytest.approx(0.7)
    assert bench_train.kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma") == "attention"
    assert bench_train.kernel_kind("ncclDevKernel_AllGather_RING_LL") == "comm"


def test_kernel_split_counts_kernels_not_the_gpu_ranges_of_annotations():
    from torch.autograd.profiler_util import FunctionEvent
    from torch.profiler import DeviceType

    def gpu(name, us, annotation=False):
        return FunctionEvent(0, name, 0, 0, us, use_device="cuda", device_type=DeviceType.CUDA,
                             is_user_annotation=annotation)

    events = [gpu("adamw_ema", 3000.0), gpu("nvjet_sm90_tst_192x192", 2000.0),
              gpu("Optimizer.step#AdamWEma.step", 3100.0, annotation=True),
              gpu("## Call CompiledFxGraph fabc ##", 2500.0, annotation=True)]
    split = bench_train.kernel_split(events, (18944,))
    assert (split["optimizer"], split["matmul"], split["other"], split["kernels_total"]) == (3.0, 2.0, 0.0, 5.0)
    assert [name for name, _, _ in split["top"]] == ["adamw_ema", "nvjet_sm90_tst_192x192"]


def test_inductor_options_are_set_for_the_run_and_a_wrong_one_is_named(capsys):
    # --inductor: what the cold-compile experiments of BENCHMARKS.md vary.
    from torch._inductor import config

    with config.patch({"triton.autotune_pointwise": True}):  # restored after
        r = bench_train.main(TINY + ["--steps", "1", "--inductor", "triton.autotune_pointwise=false"])
        assert r["inductor"]["triton.autotune_pointwise"] is False and config.triton.autotune_pointwise is False
    for bad, said in [("triton.no_such_knob=1", "triton.no_such_knob: torch._inductor.config has no such option"),
                      ("triton.autotune_pointwise=3", "triton.autotune_pointwise=3: the option holds a value of type bool")]:
        with pytest.raises(SystemExit):
            bench_train.parse_args(TINY + ["--inductor", bad])
        assert f"--inductor {said}" in capsys.readouterr().err


def test_ac_takes_a_share_of_blocks_and_recomputes_to_the_same_losses(capsys, monkeypatch):
    from umm.train import parallel

    torch.set_num_threads(1)
    real, calls = parallel.checkpoint, []
    monkeypatch.setattr(parallel, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    none = bench_train.main(TINY + ["--ac", "none"])
    assert calls == []
    half = bench_train.main(TINY + ["--ac", "0.5"])
    assert len(calls) > 0  # one of the 2 LLM layers and the ViT's one layer, every forward
    assert none["ac"] == "none" and half["ac"] == 0.5
    flat = [[loss for pair in r["loss_first_last"] for loss in pair] for r in (none, half)]
    assert flat[1] == pytest.approx(flat[0], rel=1e-6)
    with pytest.raises(SystemExit):
        bench_train.parse_args(TINY + ["--ac", "2"])
    assert "'2': use none, full, every2 or a share in [0, 1]" in capsys.readouterr().err
