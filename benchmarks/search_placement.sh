#!/usr/bin/env bash
# Search trials at whole versus fractional GPUs: the same 8 Ray Tune trials of SmolLM2-135M-Instruct
# (configs/search_xsum_smollm2.json's space, no early stopping so both runs train the same steps),
# once at search.gpus_per_trial=1 (one trial at a time on one GPU) and once at 0.25 (4 at a time),
# with the GPU's utilisation sampled every second by nvidia-smi.
#   bash benchmarks/search_placement.sh DATA OUT [GPUS_PER_TRIAL ...]      (default: 1 0.25)
# DATA holds xsum/{train,validation}.jsonl. OUT receives per placement the search's trials table,
# its log, the utilisation samples, and placement.md (wall time and mean utilisation side by side).
# TINY=1 runs a 2-step search on a CPU (no utilisation), to keep the script working.
set -uo pipefail
DATA=$(realpath "$1"); OUT=$(realpath -m "$2"); shift 2
PLACEMENTS=("${@:-1 0.25}"); [ $# -eq 0 ] && PLACEMENTS=(1 0.25)
mkdir -p "$OUT"; RUNS=$(mktemp -d)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
REPO=$(cd "$(dirname "$0")/.." && pwd)

S="--set data.dataset=$DATA/xsum --set data.max_train_rows=null --set data.max_length=512 \
   --set train.micro_batch_size=16 --set train.grad_accum_steps=1 --set train.optimizer=adamw --set train.lr=5e-4 \
   --set train.warmup_steps=10 --set train.save_every=1000 --set train.mixed_precision=bf16"
STEPS=60 ROWS=100
if [ "${TINY:-0}" = 1 ]; then
  S="--set data.dataset=$DATA/xsum --set data.max_train_rows=16 --set data.max_eval_rows=4 --set data.max_length=128 \
     --set train.micro_batch_size=4 --set train.grad_accum_steps=1 --set train.optimizer=adamw --set train.save_every=1000 \
     --set eval.max_new_tokens=4 --set train.warmup_steps=0"
  STEPS=2 ROWS=2
fi

echo "| gpus per trial | trials at once | wall s | mean GPU utilisation % | trials completed |" > "$OUT/placement.md"
echo "|---|---|---|---|---|" >> "$OUT/placement.md"
for g in "${PLACEMENTS[@]}"; do
  dir="$OUT/gpus-$g"; mkdir -p "$dir"
  python - "$REPO/configs/search_xsum_smollm2.json" "$dir/search.json" "$g" "$STEPS" "$ROWS" <<'EOF'
import json, sys
src, dst, gpus, steps, rows = sys.argv[1:]
spec = json.load(open(src))
spec["search"].update(gpus_per_trial=float(gpus), scheduler="fifo", max_steps=int(steps),
                      eval_every=max(1, int(steps) // 3), eval_rows=int(rows), generate_rows=int(rows))
json.dump(spec, open(dst, "w"), indent=2)
EOF
  sampler=""
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 \
      > "$dir/utilisation.csv" & sampler=$!
  fi
  start=$(date +%s.%N)
  python "$REPO/run.py" tune --config "$REPO/configs/demo.json" --search "$dir/search.json" $S \
    --set log.output_dir="$RUNS/gpus-$g" > "$dir/search.log" 2>&1
  status=$?
  wall=$(python -c "print(f'{$(date +%s.%N) - $start:.1f}')")
  [ -n "$sampler" ] && kill "$sampler"
  cp "$RUNS/gpus-$g/trials.md" "$dir/" 2>/dev/null
  util=$(python -c "
import csv, sys
rows = [r for r in csv.reader(open('$dir/utilisation.csv'))] if '$sampler' else []
print(f'{sum(float(r[1]) for r in rows) / len(rows):.0f}' if rows else 'n/a')")
  done_trials=$(grep -c "| completed |" "$dir/trials.md" 2>/dev/null || echo 0)
  at_once=$(python -c "print(max(1, int(1 / $g)) if $g > 0 else 'all')")
  echo "| $g | $at_once | $wall | $util | $done_trials (exit $status) |" >> "$OUT/placement.md"
done
cat "$OUT/placement.md"
