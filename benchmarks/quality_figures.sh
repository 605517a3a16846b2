#!/usr/bin/env bash
# Summary quality of SmolLM2-135M-Instruct + LoRA against the extractive LEAD baseline and the base
# model's honest zero-shot (its own chat template), and what each lever of the recipe buys:
#   bash benchmarks/quality_figures.sh DATA OUT xsum|cnn
# DATA holds xsum/ and cnn_dailymail/ with {train,validation}.jsonl. For one dataset it trains the
# recipe (configs/smollm2_xsum.json or configs/smollm2_cnn_dailymail.json: chat prompt, LoRA on every
# linear layer, 3 epochs) and one run per lever switched off (the dataset's raw recipe prompt, LoRA on
# attention only, 1 epoch; for CNN/DailyMail also 256 tokens instead of 512; LEVERS="five-epochs
# lr-1e-3 rank-32 all-three" instead pushes levers further), all at once on one GPU;
# then scores the recipe with BART's beam-search decoding, 4 beams without BART's length settings and
# greedy without repeated trigrams beside its greedy evaluation, the base model
# zero-shot and LEAD-k on the same validation rows. OUT/<run>/ receives each run's small files,
# OUT/<name>.log each command's output, OUT/ablation.md the table, OUT/report/ the runs side by side.
# TINY=1 runs the same sequence at CPU size (a few rows and steps, one run at a time), to check the
# sequence itself.
set -uo pipefail
DATA=$(realpath "$1"); OUT=$(realpath -m "$2"); SET=$3; mkdir -p "$OUT"
RUNS=${RUNS:-$(mktemp -d)}
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
PY=${PYTHON:-python3}

case $SET in
  xsum) CONFIG=configs/smollm2_xsum.json; FOLDER=xsum
        RAW=(--set 'data.template="### Instruction: Summarize the following news article in a concise and abstractive way.\n### Article: {article}\n### Summary: {summary}"'
             --set 'eval.stop_strings=["\n", "###"]')
        BEAMS=(--set eval.num_beams=6 --set eval.length_penalty=1.0 --set eval.min_new_tokens=10
               --set eval.max_new_tokens=60 --set eval.no_repeat_ngram_size=3)
        LEVERS=(${LEVERS:-raw-prompt attention-only one-epoch}) ;;
  cnn)  CONFIG=configs/smollm2_cnn_dailymail.json; FOLDER=cnn_dailymail
        RAW=(--set 'data.template="Summarize: {article}\n\nSummary: {summary}"'
             --set 'eval.stop_strings=["\n\n", "Summarize:"]')
        BEAMS=(--set eval.num_beams=4 --set eval.length_penalty=2.0 --set eval.min_new_tokens=55
               --set eval.max_new_tokens=140 --set eval.no_repeat_ngram_size=3)
        LEVERS=(${LEVERS:-raw-prompt attention-only one-epoch max-length-256}) ;;
  *) echo "usage: $0 DATA OUT xsum|cnn" >&2; exit 2 ;;
esac
# All training rows (2,331 XSum / 1,219 CNN/DailyMail here), the first 500 validation rows.
BASE=(--set data.dataset="$DATA/$FOLDER" --set data.train_split=train --set data.eval_split=validation --set data.max_eval_rows=500)
if [ "${TINY:-0}" = 1 ]; then
  BASE+=(--set data.max_train_rows=16 --set data.max_eval_rows=8 --set train.max_steps=2 --set train.warmup_steps=1 --set eval.eval_every=0
         --set eval.generate_rows=4 --set eval.max_new_tokens=8 --set data.max_length=256)
  PARALLEL=${PARALLEL:-1}
  BEAMS+=(--set eval.num_beams=2 --set eval.min_new_tokens=2 --set eval.max_new_tokens=8)
fi

lever() {  # the --set options that switch one lever off (or, for the last three, push it further)
  case $1 in
    recipe) ;;
    raw-prompt) printf '%s\n' --set data.prompt_format=raw "${RAW[@]}" ;;
    attention-only) printf '%s\n' --set 'lora.target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]' ;;
    one-epoch) printf '%s\n' --set train.epochs=1 ;;
    max-length-256) printf '%s\n' --set data.max_length=256 ;;
    five-epochs) printf '%s\n' --set train.epochs=5 ;;
    lr-1e-3) printf '%s\n' --set train.lr=1e-3 ;;
    rank-32) printf '%s\n' --set lora.r=32 --set lora.alpha=64 ;;
    all-three) lever five-epochs; lever lr-1e-3; lever rank-32 ;;
  esac
}

source benchmarks/keep.sh

train_run() {
  local name=$1 opts; mapfile -t opts < <(lever "$name")
  echo "== $name start $(date -u +%T)"
  ( time $PY run.py --config "$CONFIG" "${BASE[@]}" "${opts[@]}" --set log.output_dir="$RUNS/$name" ) \
    >"$OUT/$name.log" 2>&1
  echo "== $name rc=$? end $(date -u +%T)"; keep "$RUNS/$name" "$name"
}

post() {  # an evaluation of the trained recipe run: beam search, the zero-shot base model, LEAD-k
  local name=$1; shift
  echo "== $name start $(date -u +%T)"
  ( time $PY run.py eval --run "$RUNS/recipe" "$@" ) >"$OUT/$name.log" 2>&1
  echo "== $name rc=$? end $(date -u +%T)"
}

# The runs train side by side (a 135M model leaves most of a GPU idle); PARALLEL=N caps how many.
PARALLEL=${PARALLEL:-0}
for name in recipe "${LEVERS[@]}"; do
  while (( PARALLEL > 0 && $(jobs -rp | wc -l) >= PARALLEL )); do wait -n; done
  train_run "$name" &
done
wait
post beams --name beams "${BEAMS[@]}" &
post beams-short --name beams-short --set eval.num_beams=4 --set eval.no_repeat_ngram_size=3 &
post no-repeat --name no-repeat --set eval.no_repeat_ngram_size=3 &
post zero-shot --zero-shot &
post lead --baseline lead
wait
keep "$RUNS/recipe" recipe
$PY run.py report "$RUNS/recipe" "${LEVERS[@]/#/$RUNS/}" --best "$RUNS/recipe" --out "$OUT/report" >"$OUT/report.log" 2>&1
$PY benchmarks/ablation_table.py "$OUT" recipe "${LEVERS[@]}" >"$OUT/ablation.md" 2>"$OUT/ablation.log"
cat "$OUT/ablation.md"
