#!/usr/bin/env bash
# Real-size smoke run through `python -m umm` on one GPU (issue 17): a model dir with BAGEL-7B-MoT's
# files, keys and shapes (random weights), synthetic data at 512 px, then
#   1. UniCoT's LoRA (upstream's targets, r 256): train, checkpoint, SIGKILL mid-run, resume;
#   2. `umm export` (LoRA merged, bf16) and `umm sample` (an image and an answer) from the export;
#   3. recA (the generation side, EMA in host memory) when the memory plan says it fits the GPU.
# Every phase has its own time limit so the later ones still run; logs, metrics and samples go to
# $OUT. Needs ~68 GB of disk (the model dir and two LoRA checkpoints of 18.6 GB each) and host memory
# for the merged export, which goes to /dev/shm (29 GB) when the disk has no room.
#
#   OUT=artifacts/smoke bash scripts/smoke_real_size.sh
# PHASES picks phases (default all: "unicot export reca"); COMPILE=false skips compiling (function
# only, no cold compile); EXTRA adds overrides to every run (e.g. train.attn_backend=sdpa: no flex
# kernels to compile either); a model dir already in $WORK is reused. MODEL=/dev/shm/... keeps the
# model dir in host memory, leaving the disk to the checkpoints. SAVE_EVERY (default 10) times the
# step time should exceed a checkpoint's write (13-16 s for UniCoT's 18.6 GB on an H100 host), or the
# async saves' stalls also hold the wait for the last write (BENCHMARKS.md, fourth smoke run).
set -u
OUT=${OUT:-artifacts/smoke}
WORK=${WORK:-/tmp/umm_smoke}
STEPS=${STEPS:-30}
KILL_AT=$(printf %07d "${KILL_AT:-10}")  # SIGKILL the first run once this checkpoint is complete
TOKENS=${TOKENS:-16384}  # per micro-batch (upstream's UniCoT packs 49,152; the plan says that fits too)
PHASES=${PHASES:-unicot export reca}
COMPILE=${COMPILE:-true}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
MODEL=${MODEL:-$WORK/bagel_shaped} DATA=$WORK/data RUNS=$WORK/outputs
log() { echo "[smoke +${SECONDS}s] $*" | tee -a "$OUT/smoke.log"; }

has() { [[ " $PHASES " == *" $1 "* ]]; }
if [ ! -f "$MODEL/ema.safetensors" ]; then
  log "model dir"
  /usr/bin/time -v $PY scripts/make_shaped_model_dir.py --out "$MODEL" > "$OUT/model_dir.log" 2>&1 || { log "FAILED model dir"; exit 1; }
fi
log "data"
$PY scripts/make_synthetic_data.py --out "$DATA" --size 512 --num-t2i 64 --num-edit 32 --num-interleaved 16 \
  --num-vlm 32 --num-unicot 32 > "$OUT/data.log" 2>&1 || { log "FAILED data"; exit 1; }

# Real image sizes (upstream's UniCoT: VAE 512-1024, ViT 378-980); the budget is $TOKENS.
COMMON=(model=bagel_7b_mot "model.path=$MODEL" "data.root=$DATA" data.synthesize=false "output_root=$RUNS"
  data.vae_transform.min_size=512 data.vae_transform.max_size=1024 data.vit_transform.min_size=378
  data.vit_transform.max_size=980 "data.expected_num_tokens=$TOKENS" "data.max_num_tokens=$TOKENS"
  "data.max_num_tokens_per_sample=$TOKENS" "data.prefer_buffer_before=$TOKENS" data.num_workers=2
  "train.max_steps=$STEPS" train.save_every=${SAVE_EVERY:-10} train.keep_last=1 train.log_every=1 train.num_sample_prompts=2 train.sample_steps=10
  train.compile=$COMPILE logger.tensorboard=false logger.progress_bar=false ${EXTRA:-})
UNICOT=(pipeline=unicot data=synthetic_unicot run_name=unicot "${COMMON[@]}")

if has unicot; then
log "unicot: train until checkpoint $KILL_AT is complete, then SIGKILL"
$PY -m umm "${UNICOT[@]}" > "$OUT/unicot_1.log" 2>&1 &
pid=$!
# That save, seen from outside: when its temp dir appears, when COMPLETE does, the trainer's
# peak RSS in between (0.2 s samples).
t_tmp="" rss_peak=0
for _ in $(seq 1 1500); do
  [ -f "$RUNS/unicot/checkpoints/$KILL_AT/COMPLETE" ] && break
  kill -0 $pid 2>/dev/null || break
  if [ -d "$RUNS/unicot/checkpoints/.tmp-$KILL_AT" ]; then
    [ -n "$t_tmp" ] || t_tmp=$(date +%s.%N)
    rss=$(ps -o rss= -p $pid | tr -d ' '); [ "${rss:-0}" -gt "$rss_peak" ] && rss_peak=$rss
  fi
  sleep 0.2
done
[ -n "$t_tmp" ] && log "save of $KILL_AT: $(awk "BEGIN{print $(date +%s.%N) - $t_tmp}") s from its temp dir to COMPLETE," \
  "trainer peak RSS $((rss_peak / 1024)) MiB meanwhile, $(du -sb "$RUNS/unicot/checkpoints/$KILL_AT" | cut -f1) bytes"
sleep 3  # a step or two past the checkpoint
kill -9 $pid 2>/dev/null && log "SIGKILLed at $(tail -1 "$RUNS/unicot/metrics.jsonl" | cut -c1-60)"
wait $pid 2>/dev/null
# The first run saves synchronously, the resume in the background (a change a resume may make): its
# saves before the last give the async rows beside the sync ones; the run's last save stays in line.
log "unicot: resume with the same command and train.async_save=true"
timeout 300 $PY -m umm "${UNICOT[@]}" train.async_save=true > "$OUT/unicot_2.log" 2>&1 \
  || log "FAILED resume rc=$?"
cp "$RUNS/unicot/metrics.jsonl" "$OUT/unicot_metrics.jsonl" 2>/dev/null
du -sb "$RUNS"/unicot/checkpoints/* >> "$OUT/smoke.log" 2>&1
fi

if has export; then
# The merged export is as big as the model dir: host memory (/dev/shm) when the disk has no room.
EXPORTED=$WORK/exported
[ "$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1)" -gt 35 ] 2>/dev/null && EXPORTED=/dev/shm/umm_exported
df -h "$WORK" /dev/shm >> "$OUT/smoke.log" 2>&1
log "export (LoRA merged, raw weights: the run keeps no EMA) to $EXPORTED, then sample"
timeout 200 /usr/bin/time -v $PY -m umm export "$RUNS/unicot" "$EXPORTED" --weights raw > "$OUT/export.log" 2>&1 \
  || log "FAILED export rc=$?"
mv "$EXPORTED/model.safetensors" "$EXPORTED/ema.safetensors" 2>/dev/null  # BAGEL's name
SRC=$EXPORTED; [ -f "$EXPORTED/ema.safetensors" ] || { SRC=$RUNS/unicot; log "sampling from the run dir instead"; }
timeout 150 $PY -m umm sample "$SRC" --mode t2i --prompt "a red circle" --height 512 --width 512 \
  --num-timesteps 10 --out "$OUT" > "$OUT/sample.log" 2>&1 || log "FAILED sample t2i rc=$?"
timeout 100 $PY -m umm sample "$SRC" --mode understand --image "$OUT/t2i-seed0.png" \
  --prompt "what is in the image" --max-new-tokens 16 --out "$OUT" >> "$OUT/sample.log" 2>&1 || log "FAILED sample understand rc=$?"
rm -rf "$EXPORTED"
fi

left=$(( ${END:-560} - SECONDS ))
if has reca && [ "$left" -gt 120 ]; then
  # Killed at the time limit, never saved: its resume shards (7 B trained parameters: ~110 GB) would
  # not fit a 64 GB disk beside the model dir. What it measures is in metrics.jsonl by then.
  log "recA (EMA in host memory) for ${left}s at most"
  timeout -s KILL "$left" $PY -m umm pipeline=recA data=synthetic_reca run_name=reca train.ema_on_cpu=true \
    "${COMMON[@]}" train.max_steps=100000 train.save_every=100000 \
    data.vit_transform.min_size=224 data.vit_transform.max_size=224 > "$OUT/reca.log" 2>&1 \
    || log "recA ended rc=$?"
  cp "$RUNS/reca/metrics.jsonl" "$OUT/reca_metrics.jsonl" 2>/dev/null
fi
log "done"
