#!/usr/bin/env bash
# The BENCHMARKS.md table: runs in priority order, one at a time (concurrent cold compiles of
# different graphs starved each other on 2026-11-28: none finished in 230 s), skipping runs that
# need more GPUs than the node has. Results are JSON lines in $OUT/bench.jsonl, every log in
# $OUT/suite.log. The whole suite stops at $END seconds (fits one 10-minute device call).
#
#   OUT=out bash scripts/bench_suite.sh                     # everything the node allows
#   ONLY="1gpu hf_fp32_ac hf_bf16" OUT=out bash scripts/bench_suite.sh
#
# The inductor cache makes a second call cheap: with CACHE_OUT=1 it is packed into $OUT
# (inductor.tgz.*, 15 MB parts); put the parts in .inductor_parts/ here and name that folder
# in the call's carry to restore it before the runs.
set -u
OUT=${OUT:-artifacts/bench}
END=${END:-570}
mkdir -p "$OUT"
LOG="$OUT/suite.log"
# NVLink multicast stays off (shared machines: see the device notes).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/umm_inductor}
if ls .inductor_parts/inductor.tgz.* >/dev/null 2>&1; then
  mkdir -p "$TORCHINDUCTOR_CACHE_DIR" && cat .inductor_parts/inductor.tgz.* | tar xzf - -C "$TORCHINDUCTOR_CACHE_DIR"
fi
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
# perf-anchors.md's protocol: 3 warm-up steps, then 10 timed.
S="--steps ${STEPS:-10} --warmup ${WARMUP:-3}"
# EMA_FLAG="--ema gpu-side": the EMA as its own pass instead of inside the fused optimizer kernel
# (e.g. where tests/train/test_adamw_ema.py fails on the node).
EMA=${EMA_FLAG:-}
FULL="--layers 28 --vit-layers 26"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvidia-smi topo -m  # how the GPUs reach each other (NVLink or PCIe): what FSDP2 scaling depends on
  python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
  # The card's bf16 matmul rate today (8192^3, random inputs, 3 warm-ups, median of 10): MFU's real ceiling.
  python3 -c "
import torch, triton.testing as tt
a, b = (torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16) for _ in range(2))
ms = tt.do_bench(lambda: a @ b, warmup=50, rep=200, return_mode='median')
print(f'bf16 matmul 8192^3: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s')"
} > "$OUT/gpus.txt" 2>&1

bench() {  # bench <tag> <gpus> args...
  local tag=$1 n=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $tag "* ]]; then return; fi
  if [ "$n" -gt "$NGPU" ]; then echo "SKIPPED $tag: needs $n GPUs, node has $NGPU" >> "$LOG"; return; fi
  local left=$(( END - SECONDS ))
  if [ "$left" -lt 30 ]; then echo "SKIPPED $tag: out of time" >> "$LOG"; return; fi
  echo "== $(date +%T) +${SECONDS}s $tag ($n GPU) $*" >> "$LOG"
  local cmd=(python3 scripts/bench_train.py)
  [ "$n" -gt 1 ] && cmd=(python3 -m torch.distributed.run --standalone --nproc-per-node "$n" scripts/bench_train.py)
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) timeout -s INT "$left" \
    "${cmd[@]}" --out "$OUT/bench.jsonl" --tag "$tag" "$@" >> "$LOG" 2>&1 \
    || echo "FAILED rc=$? $tag" >> "$LOG"
}

# The anchor slice (4 LLM + 4 ViT layers, 15,873-token anchor batch per GPU) and the stock anchor.
bench 1gpu 1 $S $EMA --profile --trace "$OUT/trace_1gpu.json.gz"
# The same with fp32 parameters cast by autocast (train.master_weights=params): the A/B of the masters' place.
bench 1gpu_params 1 --master-weights params $S $EMA --profile
# The same with the frozen VAE encoder run in each step, as the trainer does: the VAE's cost.
bench 1gpu_vae 1 --vae $S $EMA
bench hf_fp32_ac 1 --hf-anchor fp32_ac $S
bench hf_bf16 1 --hf-anchor bf16 $S
# FSDP2 scaling, same per-GPU batch.
bench fsdp2 2 $S $EMA --profile
bench fsdp2_params 2 --master-weights params $S $EMA --profile
bench fsdp4 4 $S $EMA --profile
# The full model: fp32 master on 4 GPUs with the fp32 EMA in host memory; LoRA r256 on one GPU.
bench full28L_fsdp4 4 $FULL --ac full --ema cpu --steps 3 --warmup 2 --profile
bench full28L_fsdp4_eager 4 $FULL --ac full --ema cpu --no-compile --steps 3 --warmup 1 --profile
bench lora256_28L 1 $FULL --lora 256 --params bf16 --ac full --steps 4 --warmup 2 --profile
# Variants.
bench 1gpu_side 1 --ema gpu-side $S
bench 1gpu_fsdp 1 --fsdp $S $EMA --profile
bench 1gpu_every2 1 --ac every2 $S
bench 1gpu_bf16params 1 --params bf16 $S
bench 1gpu_32k_every2 1 --batch 32k --ac every2 $S
bench fsdp4_noreshard 4 --no-reshard $S

echo "suite done at ${SECONDS}s" >> "$LOG"
if [ "${CACHE_OUT:-0}" = 1 ]; then
  tar czf - -C "$TORCHINDUCTOR_CACHE_DIR" . | split -b 15m - "$OUT/inductor.tgz."
fi
