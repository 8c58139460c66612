#!/bin/bash
# Lead, GPU call A of session 7 (8B shape; carries .whl .tok .gg1): every engineer's step in turn
# under its wall budget, results tarred into $OUT/call_a.tgz (plus a summary).
set -u
REAL=$OUT; export OUT=/tmp/res; rm -rf $OUT; mkdir -p $OUT/lead
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
export PYTHONUNBUFFERED=1
step() { local name=$1 budget=$2; shift 2; local t=$SECONDS; timeout $budget "$@" > $OUT/$name.log 2>&1; echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/steps.txt; }
# lead: device cache gpu tests, pipeline gpu tests, then TTFT from the store and from the device cache
step lead_tests 60 python3 -m pytest -q -m gpu tests/test_gpu_devicecache.py tests/test_pipeline.py -p no:cacheprovider -x
CODECS=${CODECS:-int8}
step lead_ttft 100 python3 -m chunkcache.bench.ttft --model llama3-8b --contexts 8192,32768 --codecs $CODECS \
  --policies qfast --reps 3 --warmup 2 --no-cold --batch 0 --device-cache 24 --out $OUT/lead/ttft
step batch 195 bash bench_results/session7/gpu/batch.sh
mkdir -p $OUT/decode $OUT/adaptive
step decode 95 env OUT=$OUT/decode bash bench_results/session7/gpu/decode.sh
step adaptive 95 env OUT=$OUT/adaptive bash bench_results/session7/gpu/adaptive.sh
cat $OUT/steps.txt
grep -E "engine.fuse|full prefill" $OUT/lead_ttft.log | head -12
tail -n 2 $OUT/lead_tests.log
tar czf $REAL/call_a.tgz -C $OUT . ; cp $OUT/steps.txt $REAL/
