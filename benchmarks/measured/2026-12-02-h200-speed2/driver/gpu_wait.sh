#!/usr/bin/env bash
# Device side: wait up to $1 seconds (or until the lane ends), then send back what it wrote so far.
R=/tmp/res4; end=$((SECONDS + $1))
while (( SECONDS < end )) && [ ! -f $R/swap.done ]; do sleep 5; done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv >> $R/nvidia-smi-samples.txt
tar czf "$OUT/res.tgz" -C $R .
cat $R/lane.log; for f in $R/*/bench_*.md $R/placement/placement.md; do [ -f $f ] && { echo "--- $f"; tail -n 14 $f; }; done
date -u +%T
