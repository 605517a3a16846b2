# Sourced by the *_figures.sh scripts: `keep RUN_DIR NAME` copies a run (or search) folder's small
# files (configs, metrics, logs, predictions, reports, tables) into $OUT/NAME/, leaving out weights,
# checkpoints, tokenizer files and Ray's own results.
keep() {
  local run=$1 name=$2; mkdir -p "$OUT/$name"
  (cd "$run" && find . -maxdepth 3 \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.csv' \) \
     ! -path '*/checkpoints/*' ! -path './ray/*' ! -name 'tokenizer*' -exec cp --parents {} "$OUT/$name/" \;)
}
