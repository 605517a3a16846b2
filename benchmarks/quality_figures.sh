#!/usr/bin/env bash
# Summary quality of SmolLM2-135M-Instruct + LoRA against the extractive LEAD baseline and the base
# model's honest zero-shot (its own chat template), what each lever of the recipe buys, and what each
# decoding gives:
#   bash benchmarks/quality_figures.sh DATA OUT xsum|cnn
# DATA holds xsum/ and cnn_dailymail/ with {train,validation}.jsonl. For one dataset it trains the
# recipe (configs/smollm2_xsum.json or configs/smollm2_cnn_dailymail.json: chat prompt, LoRA on every
# linear layer, 3 epochs) and one run per lever (LEVERS; by default each switched off: the dataset's
# raw recipe prompt, LoRA on attention only, 1 epoch, and for CNN/DailyMail 256 tokens instead of 512;
# others push a lever further: five-epochs lr-1e-3 rank-32 all-three max-length-768 max-length-1024),
# all at once on one GPU. Then it scores the recipe run under every decoding of DECODINGS (greedy and
# beam search, no repeated trigrams over the summary or, as transformers' `generate` does, over
# article and summary, shorter and longer summaries) and each lever run under LEVER_DECODINGS, the
# base model zero-shot and LEAD-k, on the same validation rows, POST_PARALLEL evaluations at a time.
# A decoding name ending in -words (no-repeat-words, beams-2-words) bans repeated trigrams ignoring case.
# LEVERS="" trains the recipe alone.
# OUT/<run>/ receives each run's small files (OUT/<run>/<decoding>/ each decoding's), OUT/<name>.log
# each command's output, OUT/ablation.md the table, OUT/report/ the runs side by side.
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
        # BART's XSum decoding (fairseq): 6 beams, length penalty 1.0, 10-60 tokens, no repeated trigram.
        BART=(--set eval.num_beams=6 --set eval.length_penalty=1.0 --set eval.min_new_tokens=10
              --set eval.max_new_tokens=60 --set eval.no_repeat_ngram_size=3)
        SHORTER=(--set eval.max_new_tokens=40); LONGER=(--set eval.min_new_tokens=10)
        LEVERS=(${LEVERS-raw-prompt attention-only one-epoch}) ;;
  cnn)  CONFIG=configs/smollm2_cnn_dailymail.json; FOLDER=cnn_dailymail
        RAW=(--set 'data.template="Summarize: {article}\n\nSummary: {summary}"'
             --set 'eval.stop_strings=["\n\n", "Summarize:"]')
        # BART's CNN/DailyMail decoding: 4 beams, length penalty 2.0, 55-140 tokens, no repeated trigram.
        BART=(--set eval.num_beams=4 --set eval.length_penalty=2.0 --set eval.min_new_tokens=55
              --set eval.max_new_tokens=140 --set eval.no_repeat_ngram_size=3)
        SHORTER=(--set eval.max_new_tokens=100); LONGER=(--set eval.min_new_tokens=30)
        LEVERS=(${LEVERS-raw-prompt attention-only one-epoch max-length-256}) ;;
  *) echo "usage: $0 DATA OUT xsum|cnn" >&2; exit 2 ;;
esac
DECODINGS=(${DECODINGS:-greedy no-repeat-sequence no-repeat-shorter no-repeat-longer beams-2 beams-4 beams-4-lp2 bart})
LEVER_DECODINGS=(${LEVER_DECODINGS:-})
# All training rows (2,331 XSum / 1,219 CNN/DailyMail here), the first 500 validation rows.
BASE=(--set data.dataset="$DATA/$FOLDER" --set data.train_split=train --set data.eval_split=validation --set data.max_eval_rows=500)
if [ "${TINY:-0}" = 1 ]; then
  BASE+=(--set data.max_train_rows=16 --set data.max_eval_rows=8 --set train.max_steps=2 --set train.warmup_steps=1 --set eval.eval_every=0
         --set eval.generate_rows=4 --set eval.max_new_tokens=8 --set data.max_length=256)
  PARALLEL=${PARALLEL:-1}
  BART+=(--set eval.num_beams=2 --set eval.min_new_tokens=2 --set eval.max_new_tokens=8)
  SHORTER=(--set eval.max_new_tokens=6); LONGER=(--set eval.min_new_tokens=2)
fi

lever() {  # the --set options that switch one lever off (or, for the last three, push it further)
  case $1 in
    recipe) ;;
    raw-prompt) printf '%s\n' --set data.prompt_format=raw "${RAW[@]}" ;;
    attention-only) printf '%s\n' --set 'lora.target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]' ;;
    one-epoch) printf '%s\n' --set train.epochs=1 ;;
    max-length-256) printf '%s\n' --set data.max_length=256 ;;
    max-length-768) printf '%s\n' --set data.max_length=768 ;;
    max-length-1024) printf '%s\n' --set data.max_length=1024 ;;
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

decoding() {  # the --set options of one decoding; the repetition rules see the summary only unless named
  local NR=(--set eval.no_repeat_ngram_size=3 --set eval.no_repeat_ignore_case=false)  # by token ids, whatever the config ships
  case $1 in
    greedy) printf '%s\n' --set eval.no_repeat_ngram_size=0 ;;
    no-repeat-sequence) printf '%s\n' "${NR[@]}" --set eval.repetition_scope=sequence ;;
    no-repeat) printf '%s\n' "${NR[@]}" ;;
    no-repeat-shorter) printf '%s\n' "${NR[@]}" "${SHORTER[@]}" ;;
    no-repeat-longer) printf '%s\n' "${NR[@]}" "${LONGER[@]}" ;;
    beams-2) printf '%s\n' "${NR[@]}" --set eval.num_beams=2 ;;
    beams-4) printf '%s\n' "${NR[@]}" --set eval.num_beams=4 ;;
    beams-4-lp2) printf '%s\n' "${NR[@]}" --set eval.num_beams=4 --set eval.length_penalty=2.0 ;;
    *-words) decoding "${1%-words}"; printf '%s\n' --set eval.no_repeat_ignore_case=true ;;  # the ban ignores case
    bart) printf '%s\n' "${BART[@]}" ;;
  esac
}

post() {  # an evaluation of a trained run (RUN NAME LOG OPTIONS...): another decoding, the zero-shot base model, LEAD-k
  local run=$1 log=$2; shift 2
  echo "== $log start $(date -u +%T)"
  ( time $PY run.py eval --run "$RUNS/$run" "$@" ) >"$OUT/$log.log" 2>&1
  echo "== $log rc=$? end $(date -u +%T)"
}

POST_PARALLEL=${POST_PARALLEL:-4}
queue() {  # run a command in the background, at most POST_PARALLEL at a time
  while (( $(jobs -rp | wc -l) >= POST_PARALLEL )); do wait -n; done
  "$@" &
}

# The runs train side by side (a 135M model leaves most of a GPU idle); PARALLEL=N caps how many.
PARALLEL=${PARALLEL:-0}
for name in recipe "${LEVERS[@]}"; do
  while (( PARALLEL > 0 && $(jobs -rp | wc -l) >= PARALLEL )); do wait -n; done
  train_run "$name" &
done
wait
queue post recipe zero-shot --zero-shot
queue post recipe lead --baseline lead
for d in "${DECODINGS[@]}"; do
  mapfile -t opts < <(decoding "$d"); queue post recipe "recipe-$d" --name "$d" "${opts[@]}"
done
for name in "${LEVERS[@]}"; do
  for d in "${LEVER_DECODINGS[@]}"; do
    mapfile -t opts < <(decoding "$d"); queue post "$name" "$name-$d" --name "$d" "${opts[@]}"
  done
done
wait
for name in "${LEVERS[@]}"; do keep "$RUNS/$name" "$name"; done
keep "$RUNS/recipe" recipe
$PY run.py report "$RUNS/recipe" "${LEVERS[@]/#/$RUNS/}" --best "$RUNS/recipe" --out "$OUT/report" >"$OUT/report.log" 2>&1
$PY benchmarks/ablation_table.py "$OUT" recipe "${LEVERS[@]}" >"$OUT/ablation.md" 2>"$OUT/ablation.log"
cat "$OUT/ablation.md"
