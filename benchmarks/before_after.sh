#!/usr/bin/env bash
# Training speed before and after a change, in one call on one machine: bench_train.py in an older tree
# and in this one, in turn, REPEAT times (before, after, before, after: a drift of the host's speed
# spreads over both trees instead of favouring one):
#   git archive --format=tar.gz -o before.tgz COMMIT     # where the repository is
#   REPEAT=2 bash benchmarks/before_after.sh before.tgz OUT -- --models phi2 --runners recipe \
#       --rows 2331 --steps 12 --warmup 3 --data-xsum /abs/DATA/xsum
# Give data paths absolute: each tree runs from its own folder. BEFORE_EXTRA (whitespace-separated)
# is appended to the older tree's arguments only, e.g. settings of the last --variant that the older
# code needs to run what this code runs unasked. Writes OUT/{before,after}-N/bench_train.{json,md},
# OUT/{before,after}-N.log and OUT/before_after.md (each runner's tokens/s in every run, the ratio of
# the medians).
set -uo pipefail
ARCHIVE=$(realpath "$1"); OUT=$(realpath -m "$2"); shift 2
[ "${1:-}" = "--" ] && shift
REPEAT=${REPEAT:-2}; PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."; AFTER=$PWD
BEFORE=$(mktemp -d); trap 'rm -rf "$BEFORE"' EXIT
tar xzf "$ARCHIVE" -C "$BEFORE" || { echo "error: $ARCHIVE: not a tree archive (git archive --format=tar.gz)" >&2; exit 2; }
mkdir -p "$OUT"
read -r -a EXTRA <<< "${BEFORE_EXTRA:-}"
for i in $(seq 1 "$REPEAT"); do
  (cd "$BEFORE" && $PY benchmarks/bench_train.py "$@" "${EXTRA[@]}" --out "$OUT/before-$i") > "$OUT/before-$i.log" 2>&1
  echo "before-$i rc=$?"
  (cd "$AFTER" && $PY benchmarks/bench_train.py "$@" --out "$OUT/after-$i") > "$OUT/after-$i.log" 2>&1
  echo "after-$i rc=$?"
done
$PY benchmarks/before_after_table.py "$OUT" > "$OUT/before_after.md" && cat "$OUT/before_after.md"
