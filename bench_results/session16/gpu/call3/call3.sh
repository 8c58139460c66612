#!/bin/bash
# Lead, session 16, GPU call 3 (8B shape; carries .whl .tok): the final code (copies ahead,
# pageable small uploads: to_device reverted after call 2)
#   ab16      main (copies ahead) against noahead
#   ttft      session 7's command (store and device cache, 8K/16K/32K)
#   gputests  gpu-marked tests of the loader, kernels and their callers
set -u
REAL=$OUT; export OUT=/tmp/res3; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/steps.txt
  cp -r $OUT/* $REAL/ 2>/dev/null
}
export FORMS=${FORMS:-main,noahead}; step ab16 ${AB_S:-150} python3 bench_results/session16/gpu/ab16.py $OUT
step ttft ${TTFT_S:-100} python3 -m chunkcache.cli bench ttft --model llama3-8b --contexts 8192,16384,32768 --codecs int8 \
  --policies qfast --reps 3 --warmup 2 --no-cold --batch 0 --device-cache 24 --out $OUT/ttft
step gputests ${GPUTEST_S:-290} python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_kernels.py tests/test_pipeline.py tests/test_warmup.py tests/test_gpu.py tests/test_batch.py tests/test_gpu_concurrency.py tests/test_gpu_devicecache.py tests/test_store_hostile.py tests/test_fuzz_entries.py tests/test_adaptive.py
step batch2 90 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_batch.py
cat $OUT/steps.txt
grep -E "==|x \(min" $OUT/ab16.log | cut -c1-330
cat $OUT/ttft.md 2>/dev/null || tail -n 30 $OUT/ttft.log
tail -n 15 $OUT/gputests.log; tail -n 4 $OUT/batch2.log
exit 0
