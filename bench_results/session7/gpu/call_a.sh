#!/bin/bash
# Lead, GPU call A of session 7 (8B shape; carries .whl .tok .gg1): every engineer's step in turn
# under its wall budget; everything under /tmp/res is tarred into $OUT/call_a.tgz after each step
# (a call cut at its limit still returns what finished).
set -u
REAL=$OUT; export OUT=/tmp/res; rm -rf $OUT; mkdir -p $OUT/lead $OUT/decode $OUT/adaptive
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
export PYTHONUNBUFFERED=1
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/steps.txt
  tar czf $REAL/call_a.tgz -C $OUT . ; cp $OUT/steps.txt $REAL/
}
# lead + codec: gpu tests of the device cache (zero copy) and of int2m's kernel
step lead_tests 50 python3 -m pytest -q -m gpu tests/test_gpu_devicecache.py tests/test_kernels.py \
  -k "int2m or resident or threads_with" -p no:cacheprovider
# lead + codec: TTFT through engine.fuse on texts, from the store and behind the device cache, int8 and int2m
step lead_ttft 130 python3 -m chunkcache.bench.ttft --model llama3-8b --contexts 8192,32768 --codecs ${CODECS:-int8,int2m} \
  --policies qfast --reps 3 --warmup 2 --no-cold --batch 0 --device-cache 24 --out $OUT/lead/ttft
# batch: its gpu tests (50 s) and batch_serve (hits and 5% misses; full, fused, batched, batched + device cache)
step batch 185 bash bench_results/session7/gpu/batch.sh
# decode: bench decode only (its gpu tests are cut for time), K = 1 and 8
step decode 95 python3 -m chunkcache.cli bench decode --model llama3-8b --context 8192 --k 1,8 --new-tokens 32 \
  --out $OUT/decode/decode_h200
# adaptive: fewer splits and reps than its script
step adaptive 115 python3 bench_results/session7/gpu/adaptive_h200.py --splits 0,4,8,12,16 --reps 2 --warmup 1 --out $OUT/adaptive
cat $OUT/steps.txt
grep -E "engine.fuse|full prefill" $OUT/lead_ttft.log | head -16
tail -n 2 $OUT/lead_tests.log
grep -E "^\|" $OUT/batch/serve.log 2>/dev/null | head -20
