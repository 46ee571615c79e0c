"""Time the trainer itself (``python -m umm``) against ``scripts/bench_train.py`` at the same settings.

Runs the app on synthetic data for ``--steps`` steps at a fixed token budget, reads its
metrics.jsonl, drops the first ``--drop`` steps (compile, warm-up), then runs bench_train.py with
the same layers, checkpointing and compile setting, and prints one JSON line: each side's steady
ms/step, tokens/s per GPU, MFU, time to first step and recompiles, and the ratio app/bench of ms/step;
for the app also where its steps went (``parts_ms``: the mean of each phase, host clock and GPU events).

    python scripts/bench_app.py --model-path artifacts/models/bagel_7b_shaped --layers 4   # the slice, 1 GPU
    python scripts/bench_app.py --model-path artifacts/models/bagel_7b_shaped --layers 28 --lora 256  # UniCoT's LoRA
    python scripts/bench_app.py --tiny --no-compile --steps 4 --drop 1 --tokens 1024        # CPU smoke run

The app packs real synthetic samples up to ``--tokens`` per step (data.max_num_tokens and
data.expected_num_tokens), its datasets weighted to the bench's mix (``--lora``: UniCoT's own); the
bench runs its fixed perf-anchors.md batch, so each step's tokens differ a little (``token_counts``:
the app's mean beside the bench's): compare ms per token (tokens/s), not only ms/step. Both build the model dir's ViT (26 layers
for BAGEL-7B-MoT; the bench's own default is 4) and ``--layers`` LLM layers. The app's images are
the bench's sizes (VAE 512 px, ViT 378 px; ``--tiny``: 64 and 56), written to the work dir and loaded
by two workers. Both run the frozen VAE encoder in each step (the bench with ``--vae``; its time is
the bench's ``vae`` phase and the app's ``parts_ms`` ``vae``).
The app run writes no checkpoint (train.save_at_end=false; a save's cost has its own rows in
metrics.jsonl), and ``data_wait_ms`` says how long its steps waited for batches.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))  # bench_train's anchor batch and option parsing

from umm.model.io import read_model_dims  # noqa: E402

APP_AC = {"full": True, "every2": "every2", "none": False}  # bench_train.py --ac as the app's setting


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="model dir (e.g. scripts/make_shaped_model_dir.py's output; "
                                                      "with --tiny, a tiny one other than make tiny-model's)")
    p.add_argument("--tiny", action="store_true", help="the tiny model and bench_train.py --tiny (CPU smoke runs)")
    p.add_argument("--layers", type=int, default=4, help="LLM decoder layers of both runs (model.num_layers)")
    p.add_argument("--tokens", type=int, default=16384, help="token budget per step (data.max_num_tokens)")
    p.add_argument("--ac", choices=list(APP_AC), default="full", help="activation checkpointing of both runs")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--lora", type=int, default=0,
                   help="LoRA rank: the app runs pipeline=unicot (no EMA, frozen base in bf16), the bench "
                        "--lora R --params bf16 --ema none (0: both fine-tune everything, as pipeline=bagel)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--drop", type=int, default=5, help="first steps left out of the steady numbers")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the trainer's auto)")
    p.add_argument("--work", default=None, help="where the app's run dir goes (default: a temporary dir)")
    p.add_argument("--keep-metrics", default=None, metavar="PATH",
                   help="copy the app's metrics.jsonl (every step's row) here before its run dir goes")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="record the app's last two steps with torch.profiler (train.profile_at; left out of "
                        "the steady numbers) and keep their files in DIR")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="a torch._inductor.config setting for both runs (the app's train.inductor_options.KEY, "
                        "bench_train.py's --inductor), e.g. triton.autotune_pointwise=false")
    p.add_argument("overrides", nargs="*", help="more Hydra overrides for the app run")
    a = p.parse_args(argv)
    if not a.tiny and not a.model_path:
        p.error("give --model-path (or --tiny)")
    if a.steps <= a.drop + 2 * bool(a.profile):
        p.error(f"--steps {a.steps} must be more than --drop {a.drop}" + (" + the 2 profiled steps" if a.profile else ""))
    return a


def _run(cmd, what: str) -> None:
    """Run ``cmd``; a failure ends the benchmark with one line under the command's own error."""
    rc = subprocess.run(cmd, cwd=REPO).returncode
    if rc:
        sys.exit(f"bench_app: the {what} run failed (exit status {rc}); its error is above")


def last_timed_step(a) -> int:
    """The last step of both sides' timed ones: with ``--profile`` the app's last two are recorded
    (slower) and left out."""
    return a.steps - 2 if a.profile else a.steps


def bench_mix() -> list:
    """Dataset weights that give the app's packs the bench's mix on average (``ANCHOR_ORDER``: 5 t2i,
    2 edit, 5 understanding, no interleaved). Upstream's weights (conf/data/synthetic.yaml) gave packs
    of 13 VAE images and 2 ViT images where the bench has 9 and 7: a different step to time."""
    from collections import Counter

    from bench_train import ANCHOR_ORDER

    counts = Counter(ANCHOR_ORDER)
    weights = {"t2i": counts["t2i"], "edit": counts["edit"], "vlm": counts["und"]}
    # Not mandatory: a pack would start with one t2i sample beyond the weighted draws (5.5 t2i a pack).
    return [f"data.datasets.{name}.weight={w}" for name, w in weights.items()] + [
        "data.datasets.t2i.is_mandatory=false", "~data.datasets.interleaved"]


def bench_sized_data(work: Path, tokens: int, tiny: bool) -> list:
    """Overrides for synthetic data at the bench's image sizes (the tiny model's with ``tiny``),
    written under ``work``."""
    from umm.data.synthetic import SyntheticSettings, generate

    vae, vit = (64, 56) if tiny else (512, 378)
    root = work / "data"
    generate(str(root), SyntheticSettings(size=vae, num_t2i=64, num_edit=32, num_interleaved=16, num_vlm=32,
                                          num_unicot=32))
    return [f"data.root={root}", "data.synthesize=false", "data.num_workers=2",
            f"data.vae_transform.min_size={vae}", f"data.vae_transform.max_size={vae}",
            f"data.vit_transform.min_size={vit}", f"data.vit_transform.max_size={vit}",
            f"data.max_num_tokens_per_sample={tokens}", f"data.prefer_buffer_before={tokens}"]


def run_app(a, work: Path) -> dict:
    model = ["model=tiny", "train=tiny", "optim=tiny"] if a.tiny else []
    model += [f"model.path={a.model_path}"] if a.model_path else []
    data = bench_sized_data(work, a.tokens, a.tiny)
    method = ["pipeline=bagel", "data=synthetic", *bench_mix()]
    if a.lora:  # UniCoT's own mix and scale (alpha/r = 2 at any rank)
        method = ["pipeline=unicot", "data=synthetic_unicot", f"method.lora.r={a.lora}", f"method.lora.alpha={2 * a.lora}"]
    cmd = [sys.executable, "-m", "umm", *method, *model,
           f"model.num_layers={a.layers}", f"data.max_num_tokens={a.tokens}", f"data.expected_num_tokens={a.tokens}",
           f"train.max_steps={a.steps}", "train.log_every=1", f"train.save_every={a.steps + 1}", "train.save_at_end=false",
           f"train.activation_checkpointing={APP_AC[a.ac]}", f"train.compile={'auto' if a.compile else False}",
           f"output_root={work}", "run_name=bench_app", "logger.progress_bar=false", *data,
           *inductor_overrides(a.inductor), *a.overrides]
    if a.device:
        cmd.append(f"train.device={a.device}")
    last_timed = last_timed_step(a)
    if a.profile:
        cmd += [f"train.profile_at={last_timed + 1}", "train.profile_steps=2"]
    _run(cmd, "app")
    metrics = work / "bench_app" / "metrics.jsonl"
    if a.keep_metrics:
        shutil.copyfile(metrics, a.keep_metrics)
    if a.profile:
        shutil.copytree(work / "bench_app" / "profile", a.profile, dirs_exist_ok=True)
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step_time_s" in r]
    steady = [r for r in rows if a.drop < r["step"] <= last_timed]
    first = next((r["time_to_first_step_s"] for r in rows if "time_to_first_step_s" in r), None)
    recompiles = [r["compile_recompiles"] for r in rows if "compile_recompiles" in r]
    return {
        "ms_per_step": 1000 * statistics.fmean(r["step_time_s"] for r in steady),
        # Beside the mean: a few slow steps (a new shape's one-off cost) move the mean, not the median.
        "ms_per_step_median": 1000 * statistics.median(r["step_time_s"] for r in steady),
        "tokens_per_s_per_gpu": statistics.fmean(r["tokens_per_s_per_gpu"] for r in steady),
        "mfu": statistics.fmean(r["mfu"] for r in steady),
        "data_wait_ms": 1000 * statistics.fmean(r["data_wait_s"] for r in steady),
        "time_to_first_step_s": first,
        "recompiles": recompiles[-1] if recompiles else None,
        "recompiles_after_drop": recompiles[-1] - recompiles[a.drop - 1] if len(recompiles) > a.drop > 0 else None,
        "steps_timed": len(steady),
        "parts_ms": mean_parts([r["step_parts_ms"] for r in steady if "step_parts_ms" in r]),
        "token_counts": {k: statistics.fmean(r["token_counts"][k] for r in steady) for k in steady[0]["token_counts"]},
    }


def inductor_overrides(items) -> list:
    """``--inductor KEY=VALUE`` items as the app's overrides, each value read as bench_train.py reads
    it and written so Hydra reads the same (a string quoted: ``a,b`` would be a sweep; ``null``)."""
    from bench_train import parse_inductor_options

    def hydra_value(value) -> str:
        if value is None or isinstance(value, bool):
            return {None: "null", True: "true", False: "false"}[value]
        return repr(value) if isinstance(value, str) else json.dumps(value)

    return [f"++train.inductor_options.{key}={hydra_value(value)}" for key, value in parse_inductor_options(items).items()]


def mean_parts(parts: list) -> dict:
    """The mean ms of each phase, per clock, over the rows' ``step_parts_ms`` (where the app's step
    goes: umm/train/step_timeline.py)."""
    return {clock: {phase: round(statistics.fmean(p[clock][phase] for p in parts), 2) for phase in parts[0][clock]}
            for clock in parts[0]} if parts else {}


def run_bench(a, work: Path) -> dict:
    out = work / "bench_train.jsonl"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_train.py"), "--layers", str(a.layers), "--ac", a.ac,
           "--steps", str(last_timed_step(a) - a.drop), "--warmup", str(a.drop), "--vae", "--out", str(out)]
    # The same ViT as the app's: the model dir's depth (26 for BAGEL-7B-MoT), not the bench's default 4.
    cmd += ["--tiny"] if a.tiny else ["--vit-layers", str(read_model_dims(a.model_path).vit_num_layers)]
    cmd += [] if a.compile else ["--no-compile"]
    cmd += ["--lora", str(a.lora), "--params", "bf16", "--ema", "none"] if a.lora else []
    cmd += ["--device", a.device] if a.device else []
    cmd += [arg for item in a.inductor for arg in ("--inductor", item)]
    _run(cmd, "bench_train.py")
    r = json.loads(out.read_text().splitlines()[-1])
    return {
        "ms_per_step": r["step_wall_ms"],
        "tokens_per_s_per_gpu": r["tokens_per_s_per_gpu"],
        "mfu": r["mfu"],
        "time_to_first_step_s": r.get("process_to_first_step_s"),
        "graphs": r["compile"]["counters"].get("stats", {}).get("unique_graphs"),  # its batch is fixed
        "tokens_per_gpu": r["tokens_per_gpu"],
        "token_counts": r["token_counts"],
        "lora": r["lora"],
        "phase_ms": r["phase_ms"],
        "host_phase_ms": r["host_phase_ms"],
        "inductor": r["inductor"],
    }


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.work:
        Path(a.work).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        app, bench = run_app(a, Path(tmp)), run_bench(a, Path(tmp))
    result = {"layers": a.layers, "tokens": a.tokens, "ac": a.ac, "compile": a.compile, "lora": a.lora,
              "inductor": a.inductor,
              "app": app, "bench": bench,
              "app_over_bench_ms_per_step": app["ms_per_step"] / bench["ms_per_step"],
              "app_over_bench_tokens_per_s": app["tokens_per_s_per_gpu"] / bench["tokens_per_s_per_gpu"]}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
