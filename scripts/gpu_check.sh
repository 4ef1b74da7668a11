#!/usr/bin/env bash
# One prepared device check of the four COCO configs (fits 8 minutes on one H200):
#   1. per config: the train step (bf16, batch 2) and the inference step (batch 1), at 800x1344;
#   2. with the time left: the train step at the largest of 4 / 8 / 16 images that fits (ascending, stops at
#      the first failure: out of memory or past the per-run limit).
# Each run is its own process (an OOM leaves nothing behind) and prints images/s, compile time, peak memory and
# MFU (scripts/benchmark.py; JSON lines in $OUT/gpu_check.jsonl, logs in $OUT/*.log).
#
# Environment (defaults for the H200):
#   GPU_CHECK_SIZE=800x1344   canvas (on this CPU: GPU_CHECK_SIZE=64x96 GPU_CHECK_TINY=1 for a smoke run)
#   GPU_CHECK_TINY=0          1: one-block backbones (depths 1,1,1,1) so that a CPU can run it
#   GPU_CHECK_BATCHES="4 8 16" GPU_CHECK_STEPS=5 GPU_CHECK_DTYPE=bfloat16
#   GPU_CHECK_PEAK_FLOPS=989e12 (H200 dense bf16; MFU = achieved / this)
#   GPU_CHECK_BUDGET_S=450    no new run starts after this many seconds; GPU_CHECK_RUN_S=150 per-run limit
#   GPU_CHECK_CONFIGS         space-separated config files (default: the four COCO configs)
#   OUT                       output folder (default workdir/gpu_check)
set -u
cd "$(dirname "$0")/.."
# The GPU machine gets the working tree without lit_jax pip-installed: import it (and third_party) from here.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
SIZE=${GPU_CHECK_SIZE:-800x1344}
TINY=${GPU_CHECK_TINY:-0}
BATCHES=${GPU_CHECK_BATCHES:-4 8 16}
STEPS=${GPU_CHECK_STEPS:-5}
DTYPE=${GPU_CHECK_DTYPE:-bfloat16}
PEAK=${GPU_CHECK_PEAK_FLOPS:-989e12}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
RUN_S=${GPU_CHECK_RUN_S:-150}
CONFIGS=${GPU_CHECK_CONFIGS:-configs/retinanet_lit_ti_fpn_1x_coco.py configs/retinanet_lit_s_fpn_1x_coco.py configs/mask_rcnn_lit_ti_fpn_1x_coco.py configs/mask_rcnn_lit_s_fpn_1x_coco.py}
OUT=${OUT:-workdir/gpu_check}
mkdir -p "$OUT"
RESULTS="$OUT/gpu_check.jsonl"
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
EXTRA=()
if [ "$TINY" = "1" ]; then EXTRA+=("--config.model.backbone_args.depths=(1, 1, 1, 1)"); fi
SECONDS=0
failures=0

run() {  # run NAME ARGS... -> 0 on success
  local name=$1; shift
  if [ "$SECONDS" -ge "$BUDGET" ]; then echo "SKIP $name (budget ${BUDGET}s spent)"; return 2; fi
  echo "== $name (t=${SECONDS}s)"
  timeout "$RUN_S" "$PY" scripts/benchmark.py --steps "$STEPS" --warmup 1 --dtype "$DTYPE" --size "$SIZE" \
    --peak-flops "$PEAK" --out "$RESULTS" "$@" ${EXTRA[@]+"${EXTRA[@]}"} > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -E "^(jax|torch) |error" "$OUT/$name.log" | sed 's/^/   /'
  if [ $rc -ne 0 ]; then
    if grep -qiE "RESOURCE_EXHAUSTED|out of memory" "$OUT/$name.log"; then echo "   -> out of memory";
    elif [ $rc -eq 124 ]; then echo "   -> past ${RUN_S}s"; else echo "   -> failed (rc $rc), see $OUT/$name.log"; fi
  fi
  return $rc
}

for cfg in $CONFIGS; do
  n=$(basename "$cfg" .py)
  run "${n}_train_b2" --config "$cfg" --mode train --batch 2 || failures=$((failures + 1))
  run "${n}_infer_b1" --config "$cfg" --mode infer --batch 1 || failures=$((failures + 1))
done
for cfg in $CONFIGS; do
  n=$(basename "$cfg" .py)
  largest=2
  for b in $BATCHES; do
    if run "${n}_train_b${b}" --config "$cfg" --mode train --batch "$b"; then largest=$b; else break; fi
  done
  echo "largest train batch that fits for $n: $largest"
done
echo "done in ${SECONDS}s; $failures required run(s) failed; records in $RESULTS"
[ $failures -eq 0 ]
