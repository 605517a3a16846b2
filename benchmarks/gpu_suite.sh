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
  SIZE=(--tiny --rows 12) STEPS=(--steps 2 --warmup 1) BUDGETS_PHI=(128 256) BUDGETS_TL=(128 256)
  GEN=(--tiny --pairs smollm2:xsum phi2:xsum --xsum-rows 6 --batch-size 4) CURVES=(--tiny --steps 3 --warmup 1)
  VRAM=(--tiny --rows 12 --tokens 256) LAYER_STEP=1 OPTIMIZER=(--steps 2 --busy-ms 1)
else
  SIZE=() STEPS=(--steps 20 --warmup 2) BUDGETS_PHI=(2048 4096 8192 16384) BUDGETS_TL=(4096 8192 16384)
  GEN=(--pairs tinyllama:cnn phi2:xsum) CURVES=(--steps 20 --warmup 5 --micro-batch 8 --accumulation 1)
  VRAM=(--rows 2331) LAYER_STEP=4 OPTIMIZER=()
fi
ROWS_X=(--rows 2331) ROWS_C=(--rows 1219)
# The fastest settings measured add CUDA graphs (one CUDA GPU): the recipe graphed, and our rows per
# step graphed (Phi-2: micro-batches of 8 full rows, no recompute, torch's dropout kernel in the
# compiled layers).
GRAPHS_PHI=(--variant recipe:graphs train.cuda_graphs=true
            --variant graphs train.cuda_graphs=true train.micro_batch_tokens=4096 model.checkpointed_layers=0
            'model.compile_options={"fallback_random":true}')
GRAPHS_TL=(--variant recipe:graphs train.cuda_graphs=true --variant graphs train.cuda_graphs=true)
[ "${TINY:-0}" = 1 ] && ROWS_X=() && ROWS_C=() && GRAPHS_PHI=() && GRAPHS_TL=()

step() {
  local name=$1
  shift
  echo "== $name start $(date -u +%T)"
  "$@" >"$OUT/$name.log" 2>&1
  echo "== $name rc=$? end $(date -u +%T)"
}

best() { cat "$OUT/$1/best_sets.txt" 2>/dev/null; }
sets() { for s in $(best "$1"); do printf -- '--set %s ' "$s"; done; }

# Peak memory at the reference recipe's own shape (8 micro-batches of 1 row: the probe's choice
# turned off), embedding table in host memory.
step vram $PY benchmarks/profile_vram.py --model phi2 --data-xsum "$X" "${VRAM[@]}" \
  --set train.auto_micro_batch=false --set model.embeddings_on_cpu=true --out "$OUT/vram"
# Fastest token budget x recomputed layers under the 15 GiB cap (how a step's rows run), then the
# peers, the shipped recipe (8 rows per step, micro-batches from the probe), our benchmark settings
# (bench_train.MODELS: more rows per step), those with the tuner's point and the graphed rows, in one
# run; --t4 adds recipe_t4 and ours_t4.
step tune_phi2 $PY benchmarks/tune_microbatch.py --model phi2 --data-xsum "$X" "${SIZE[@]}" "${ROWS_X[@]}" \
  --budgets "${BUDGETS_PHI[@]}" --layer-step $LAYER_STEP --out "$OUT/tune_phi2"
# shellcheck disable=SC2046
step bench_phi2 $PY benchmarks/bench_train.py --models phi2 --runners reference tuned recipe ours --t4 "${SIZE[@]}" \
  "${ROWS_X[@]}" "${STEPS[@]}" --data-xsum "$X" --variant best $(best tune_phi2) "${GRAPHS_PHI[@]}" --out "$OUT/bench_phi2"
step tune_tinyllama $PY benchmarks/tune_microbatch.py --model tinyllama --data-cnn "$C" "${SIZE[@]}" \
  "${ROWS_C[@]}" --budgets "${BUDGETS_TL[@]}" --layer-step $LAYER_STEP --out "$OUT/tune_tinyllama"
# shellcheck disable=SC2046
step bench_tinyllama $PY benchmarks/bench_train.py --models tinyllama --runners reference tuned recipe ours --t4 "${SIZE[@]}" \
  "${ROWS_C[@]}" "${STEPS[@]}" --data-cnn "$C" --variant best $(best tune_tinyllama) "${GRAPHS_TL[@]}" \
  --out "$OUT/bench_tinyllama"
# One optimizer step over the Phi-2 recipe's LoRA tensors: bitsandbytes as it ships, as summ steps it, fused AdamW.
step optimizer $PY benchmarks/bench_optimizer.py --model phi2 "${OPTIMIZER[@]}" --out "$OUT/optimizer"
step generate $PY benchmarks/bench_generate.py --data-xsum "$X" --data-cnn "$C" "${GEN[@]}" --out "$OUT/generate"
# Same rows, same seed: the HF Trainer recipe against our loop with the tuned recompute setting.
# shellcheck disable=SC2046
step curves $PY benchmarks/loss_curves.py --data-xsum "$X" "${CURVES[@]}" --runners hf_trainer ours \
  $(best tune_phi2 | tr ' ' '\n' | grep checkpointed_layers | sed 's/^/--set /') --out "$OUT/curves"
# The tuner's budget, each step one micro-batch of it (rows per step: as many full-length rows as it holds).
# shellcheck disable=SC2046
step kernels $PY benchmarks/profile_kernels.py --model phi2 --data-xsum "$X" "${SIZE[@]}" "${ROWS_X[@]}" \
  $(sets tune_phi2)
date -u +%T >"$OUT/DONE"
