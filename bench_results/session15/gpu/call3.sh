#!/bin/bash
# Lead, session 15, GPU call 3 (8B shape; carries .whl .tok), the final code:
#   ab15      issue 13 req. 5 store path: main (one upload, identity memo) against
#             session 14 (s14) and main without the memo (nomemo)
#   ttft      session 7's command (store and device cache, 8K/16K/32K)
#   gputests  gpu-marked tests (the prompt's one upload; test_batch failed in call 2 with the step-ahead loader, since reverted)
set -u
REAL=$OUT; export OUT=/tmp/res3; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/steps.txt
  cp -r $OUT/* $REAL/ 2>/dev/null
}
step gputests ${GPUTEST_S:-230} python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_warmup.py tests/test_pipeline.py tests/test_gpu.py tests/test_gpu_devicecache.py tests/test_gpu_concurrency.py tests/test_batch.py tests/test_fuzz_entries.py tests/test_store_hostile.py tests/test_kernels.py tests/test_adaptive.py
export FORMS=main,s14,nomemo; step ab15 ${AB_S:-170} python3 bench_results/session15/gpu/ab15.py $OUT
step ttft ${TTFT_S:-120} python3 -m chunkcache.cli bench ttft --model llama3-8b --contexts 8192,16384,32768 --codecs int8 \
  --policies qfast --reps 3 --warmup 2 --no-cold --batch 0 --device-cache 24 --out $OUT/ttft
cat $OUT/steps.txt
grep -E "==|x \(min" $OUT/ab15.log | cut -c1-300
cat $OUT/ttft.md 2>/dev/null || tail -n 30 $OUT/ttft.log
tail -n 12 $OUT/gputests.log
exit 0
