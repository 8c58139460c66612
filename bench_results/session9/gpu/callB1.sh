#!/bin/bash
# Lead, session 9, GPU call B1 (8B shape; carries .whl .tok .gg1):
#   warmtests   the warm-up's gpu tests first (they failed in call A; tracebacks), then the gpu
#               tests call A's budget cut (batch, decode, pipeline, store faults, kernels, fuzz)
#   adaptive    the adaptive engineer's adaptive.sh (<= 200 s)
set -u
REAL=$OUT; export OUT=/tmp/resB1; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/steps.txt
  tar czf $REAL/callB1.tgz -C $OUT . ; cp $OUT/steps.txt $REAL/
}
step warmtests 45 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_warmup.py
step moretests 100 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_batch.py \
  tests/test_decode.py tests/test_pipeline.py tests/test_store_hostile.py tests/test_kernels.py \
  tests/test_fuzz_entries.py
step adaptive 205 bash bench_results/session9/gpu/adaptive.sh
cat $OUT/steps.txt
grep -E "passed|failed|Error|^E " $OUT/warmtests.log $OUT/moretests.log | head -30
tail -n 40 $OUT/adaptive.log
