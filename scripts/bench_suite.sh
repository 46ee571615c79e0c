#!/usr/bin/env bash
# The BENCHMARKS.md table in one go on a 4 × H100 node: single-GPU variants four at a time (one per
# GPU), then FSDP2 on 2 and 4 GPUs, then the full 28-layer model on 4 GPUs. Results are JSON lines
# in $OUT/bench.jsonl, logs beside them. Each phase has a deadline (seconds since start) so the
# whole suite ends inside one 10-minute device call; a run cut by its deadline is logged as FAILED.
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
# NVLink multicast stays off (shared machines: see the device notes).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/umm_inductor}
BENCH="scripts/bench_train.py --out $OUT/bench.jsonl"
P1=${P1:-330} P2=${P2:-450} P3=${P3:-585}

left() { echo $(( $1 - SECONDS > 5 ? $1 - SECONDS : 5 )); }
one() {  # one <gpu> <deadline> args...: a single-GPU run
  local gpu=$1 end=$2; shift 2
  echo "== $(date +%T) gpu$gpu $*" >> "$OUT/gpu$gpu.log"
  CUDA_VISIBLE_DEVICES=$gpu timeout "$(left "$end")" python3 $BENCH "$@" >> "$OUT/gpu$gpu.log" 2>&1 \
    || echo "FAILED rc=$? gpu$gpu $*" >> "$OUT/gpu$gpu.log"
}
multi() {  # multi <gpus> <deadline> args...: torchrun, one process per GPU
  local n=$1 end=$2; shift 2
  echo "== $(date +%T) torchrun x$n $*" >> "$OUT/fsdp.log"
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) timeout "$(left "$end")" \
    python3 -m torch.distributed.run --standalone --nproc-per-node "$n" $BENCH "$@" >> "$OUT/fsdp.log" 2>&1 \
    || echo "FAILED rc=$? torchrun x$n $*" >> "$OUT/fsdp.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt" 2>&1
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" >> "$OUT/gpus.txt" 2>&1

# Phase 1, three slots at once: FSDP2 on GPUs 0-1; the 1-GPU anchor slice (4 LLM + 4 ViT layers,
# 15,873-token anchor batch) and the stock transformers anchor on GPU 2; LoRA r256 on the full model on GPU 3.
S="--steps ${STEPS:-6} --warmup ${WARMUP:-2}"
( multi 2 $P1 --tag fsdp2_fp32master_noac $S --profile ) &
( one 2 $P1 --tag 1gpu_fp32master_noac $S --profile; one 2 $P1 --tag hf_fp32_ac --hf-anchor fp32_ac $S;
  one 2 $P1 --tag hf_bf16 --hf-anchor bf16 $S; one 2 $P1 --tag 1gpu_fp32master_every2 --ac every2 $S ) &
( one 3 $P1 --tag lora256_28L --layers 28 --vit-layers 26 --lora 256 --params bf16 --ac full --steps 4 --warmup 2 --profile ) &
wait

# Phase 2: the same slice on 4 GPUs, same per-GPU batch.
multi 4 $P2 --tag fsdp4_fp32master_noac $S --profile

# Phase 3: the full model (28 LLM + 26 ViT layers) on 4 GPUs: fp32 master, fp32 EMA in host memory.
multi 4 $P3 --tag full28L_fsdp4 --layers 28 --vit-layers 26 --ac full --ema cpu --steps 3 --warmup 2 --profile
echo "suite done at ${SECONDS}s" >> "$OUT/fsdp.log"
