#!/usr/bin/env bash
# Every GPU measurement behind benchmarks/RESULTS.md, most important first, one folder and log each.
#
#   bash benchmarks/gpu_suite.sh DATA OUT
#
# DATA is a folder holding xsum/ and cnn_dailymail/, each with train.jsonl and validation.jsonl (one
# JSON object per line: XSum `document` / `summary`, CNN/DailyMail `article` / `highlights`). The
# steps read at most 2,331 XSum and 1,219 CNN/DailyMail training rows (ROWS_X / ROWS_C below) and 500
# XSum validation rows for generation: the sizes RESULTS.md was measured with. OUT/<step>/ gets each
# script's JSON / markdown / plots, OUT/<step>.log its output, OUT/DONE the end.
# TINY=1 runs the same sequence at CPU size in a few minutes, to check the sequence itself.
set -u
DATA=${1:?DATA folder}
OUT=${2:?OUT folder}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
X=$DATA/xsum
C=$DATA/cnn_dailymail
if [ "${TINY:-0}" = 1 ]; then
  SIZE=(--tiny --rows 12) STEPS=(--steps 2 --warmup 1)
  GEN=(--tiny --pairs smollm2:xsum phi2:xsum --xsum-rows 6 --batch-size 4) CURVES=(--tiny --steps 3 --warmup 1)
  VRAM=(--tiny --rows 12 --tokens 256) KERNELS=(--tokens 256)
else
  SIZE=() STEPS=(--steps 20 --warmup 2)
  GEN=(--pairs tinyllama:cnn phi2:xsum) CURVES=(--steps 20 --warmup 5 --micro-batch 8 --accumulation 1)
  VRAM=(--rows 2331)
  # The graphed Phi-2 micro-batch of bench_phi2's `graphs` row: 8 full rows, no recompute.
  KERNELS=(--tokens 4096 --set train.cuda_graphs=true --set model.checkpointed_layers=0)
fi
ROWS_X=(--rows 2331) ROWS_C=(--rows 1219)
# The fastest settings measured add CUDA graphs (one CUDA GPU): the recipe graphed, and our rows per
# step graphed (Phi-2: micro-batches of 8 full rows, no recompute; compiled layers under graphs draw
# dropout masks with torch's kernel).
GRAPHS_PHI=(--variant recipe:graphs train.cuda_graphs=true
            --variant graphs train.cuda_graphs=true train.micro_batch_tokens=4096 model.checkpointed_layers=0)
GRAPHS_TL=(--variant recipe:graphs train.cuda_graphs=true --variant graphs train.cuda_graphs=true)
[ "${TINY:-0}" = 1 ] && ROWS_X=() && ROWS_C=() && GRAPHS_PHI=() && GRAPHS_TL=()

step() {
  local name=$1
  shift
  echo "== $name start $(date -u +%T)"
  "$@" >"$OUT/$name.log" 2>&1
  echo "== $name rc=$? end $(date -u +%T)"
}

# Peak memory at the reference recipe's own shape (8 micro-batches of 1 row: the probe's choice
# turned off).
step vram $PY benchmarks/profile_vram.py --model phi2 --data-xsum "$X" "${VRAM[@]}" \
  --set train.auto_micro_batch=false --out "$OUT/vram"
# The peers, the shipped recipe (8 rows per step, micro-batches from the probe), our benchmark
# settings (bench_train.MODELS: more rows per step) and the graphed rows, in one run; --t4 adds
# recipe_t4 and ours_t4.
step bench_phi2 $PY benchmarks/bench_train.py --models phi2 --runners reference tuned recipe ours --t4 "${SIZE[@]}" \
  "${ROWS_X[@]}" "${STEPS[@]}" --data-xsum "$X" "${GRAPHS_PHI[@]}" --out "$OUT/bench_phi2"
step bench_tinyllama $PY benchmarks/bench_train.py --models tinyllama --runners reference tuned recipe ours --t4 "${SIZE[@]}" \
  "${ROWS_C[@]}" "${STEPS[@]}" --data-cnn "$C" "${GRAPHS_TL[@]}" --out "$OUT/bench_tinyllama"
step generate $PY benchmarks/bench_generate.py --data-xsum "$X" --data-cnn "$C" "${GEN[@]}" --out "$OUT/generate"
# Same rows in the same order, same seed: the HF Trainer recipe against our loop.
step curves $PY benchmarks/loss_curves.py --data-xsum "$X" "${CURVES[@]}" --runners hf_trainer ours --out "$OUT/curves"
# One micro-batch of the budget per step (rows per step: as many full-length rows as it holds).
step kernels $PY benchmarks/profile_kernels.py --model phi2 --data-xsum "$X" "${SIZE[@]}" "${ROWS_X[@]}" \
  "${KERNELS[@]}"
date -u +%T >"$OUT/DONE"
