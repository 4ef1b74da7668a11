#!/usr/bin/env bash
# The GPU benchmark matrix of issue 8 (one command; run from the repository root on a GPU machine):
#
#   scripts/benchmark_gpu_matrix.sh [OUT.jsonl] [extra scripts/benchmark.py flags ...]
#
# For each of the four COCO configs (RetinaNet / Mask R-CNN x LIT-Ti / LIT-S), each mode (infer, train) and each
# compute dtype (float32, bfloat16), at the 1333x800 canvas (800x1344, H x W):
#   * batch 2;
#   * then batch 4, 8, 16, ... until a run fails (out of memory): the last batch that ran is the largest that fits
#     (a power of two: train batches must stay multiples of train.stats_group_size = 2).
# Every successful run appends its record to OUT (default workdir/benchmarks/gpu_matrix.jsonl); failed runs leave
# their log in OUT's folder. A summary table is printed at the end. Extra flags go to every run, e.g.
#   scripts/benchmark_gpu_matrix.sh out.jsonl --config.model.backbone_args.attention_impl=cudnn
# (cuDNN attention needs bfloat16: pair it with DTYPES=bfloat16). Environment: PYTHON (default python),
# CONFIGS / MODES / DTYPES (space-separated) to run a part, MAX_BATCH (default 64), STEPS (default 10).
set -u
# A GPU machine may get the working tree without lit_jax pip-installed: import it (and third_party) from here.
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"

OUT=${1:-workdir/benchmarks/gpu_matrix.jsonl}
shift $(( $# > 0 ? 1 : 0 ))
EXTRA=("$@")
PYTHON=${PYTHON:-python}
CONFIGS=${CONFIGS:-"retinanet_lit_ti_fpn_1x_coco retinanet_lit_s_fpn_1x_coco mask_rcnn_lit_ti_fpn_1x_coco mask_rcnn_lit_s_fpn_1x_coco"}
MODES=${MODES:-"infer train"}
DTYPES=${DTYPES:-"float32 bfloat16"}
MAX_BATCH=${MAX_BATCH:-64}
STEPS=${STEPS:-10}
SIZE=800x1344
LOGS=$(dirname "$OUT")/gpu_matrix_logs
mkdir -p "$LOGS"
# Let one process use (nearly) the whole GPU, so that "the largest batch that fits" means the device's memory.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}

run() {  # config mode dtype batch -> status of one benchmark run
  local log="$LOGS/$1_$2_$3_b$4.log"
  echo "== $1 $2 $3 batch $4"
  "$PYTHON" scripts/benchmark.py --config "configs/$1.py" --mode "$2" --dtype "$3" --batch "$4" --size "$SIZE" \
    --steps "$STEPS" --warmup 2 --out "$OUT" ${EXTRA[@]+"${EXTRA[@]}"} > "$log" 2>&1
  local status=$?
  grep -E "^(jax|torch) " "$log" || tail -n 3 "$log"
  return $status
}

for cfg in $CONFIGS; do
  for mode in $MODES; do
    for dtype in $DTYPES; do
      run "$cfg" "$mode" "$dtype" 2 || { echo "   batch 2 failed: see $LOGS"; continue; }
      largest=2
      batch=4
      while [ "$batch" -le "$MAX_BATCH" ] && run "$cfg" "$mode" "$dtype" "$batch"; do
        largest=$batch
        batch=$(( batch * 2 ))
      done
      echo "   largest batch that ran: $largest"
    done
  done
done

"$PYTHON" - "$OUT" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"\n{'config':36s} {'mode':5s} {'dtype':8s} {'batch':>5s} {'step ms':>9s} {'img/s':>8s} {'GFLOP/img':>9s} "
      f"{'TFLOP/s':>8s} {'peak GiB':>8s} {'compile s':>9s}")
for r in rows:
    if r.get("framework") != "jax" or r.get("compared"):
        continue
    print(f"{r['config'].split('/')[-1][:-3]:36s} {r['mode']:5s} {r['dtype']:8s} {r['batch']:5d} "
          f"{r['step_s']['median'] * 1e3:9.1f} {r['images_per_s']:8.2f} {r['flops_per_image'] / 1e9:9.1f} "
          f"{r.get('achieved_flops_per_s', 0) / 1e12:8.2f} {(r.get('peak_memory_bytes') or 0) / 2**30:8.2f} "
          f"{r.get('compile_s', 0):9.1f}")
EOF
