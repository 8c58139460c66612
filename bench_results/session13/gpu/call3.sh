#!/bin/bash
# Lead, session 13, GPU call 3 (8B shape; carries .whl .tok): issue 13's load test with 5% misses
# again, each run drawing its own query streams (call 2's asyncio run met few misses: the threads
# run had stored them), threads and asyncio, concurrent_fusions 1 and 2; full prefill one at a
# time (each mode's first run). Then issue 14 req. 3 again (session 12's results were lost with
# its machine): bench_results/session11/gpu/probe.sh, the probe's share of the GPU TTFT at 8K and 32K.
set -u
REAL=$OUT; export OUT=/tmp/res3; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
t=$SECONDS
timeout ${M5_S:-300} python3 -m chunkcache.cli bench serve --model llama3-8b --clients 8 --k 16 --passages 64 \
  --new-tokens 1 --codec int8 --batching off --device-cache 24 --full sequential --seconds 10 --warmup-seconds 6 \
  --miss 0.05 --mode threads,asyncio --fusions 1,2 --out $OUT/serve_miss5 > $OUT/serve_miss5.log 2>&1
echo "serve_miss5 rc=$? took $((SECONDS-t))s" | tee $OUT/steps.txt
cp -r $OUT/* $REAL/ 2>/dev/null
[ "${PROBE:-1}" = 1 ] && { t=$SECONDS; timeout ${PROBE_S:-175} bash bench_results/session11/gpu/probe.sh > $OUT/probe.log 2>&1; echo "probe rc=$? took $((SECONDS-t))s" | tee -a $OUT/steps.txt; cp -r $OUT/* $REAL/ 2>/dev/null; }
grep -E "^== |q/s|with a miss|met misses|fused vs|graph warm" $OUT/serve_miss5.log | cut -c1-240
tail -n 45 $OUT/probe.log 2>/dev/null
exit 0
