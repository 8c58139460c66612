#!/bin/bash
# Lead, session 9, GPU call A (8B shape; carries .whl .tok .gg1). Measures, in this order:
#   gputests    every gpu-marked test (warm-up: no graph recorded in its range afterwards, and
#               the recorded shapes equal fuse.graph_shapes; exact_first on CUDA; the rest)
#   serve_hits  8 clients, 16 of 64 passages, no misses, device cache, graph warm-up at start-up:
#               fused (concurrent_fusions 1 and 2) against full prefill (p50/p90/p99, q/s)
#   serve_miss  the same with 5% misses (precomputed on the spot), threads and asyncio, 8 tokens
#   ttft        one request through engine.fuse at 8K and 32K, store and device cache, 9 reps
set -u
REAL=$OUT; export OUT=/tmp/resA; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/steps.txt
  tar czf $REAL/callA.tgz -C $OUT . ; cp $OUT/steps.txt $REAL/
}
step gputests 110 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py \
  tests/test_gpu_devicecache.py tests/test_gpu_concurrency.py tests/test_warmup.py tests/test_batch.py \
  tests/test_decode.py tests/test_pipeline.py tests/test_store_hostile.py tests/test_kernels.py \
  tests/test_fuzz_entries.py ${EXTRA_TESTS:-}
step serve_hits 120 python3 -m chunkcache.cli bench serve --model llama3-8b --clients 8 --seconds 10 \
  --warmup-seconds 4 --k 16 --miss 0 --new-tokens 1 --codec int8 --batching off --fusions 1,2 \
  --device-cache 24 --full sequential --out $OUT/serve_hits
step serve_miss 110 python3 -m chunkcache.cli bench serve --model llama3-8b --clients 8 --seconds 8 \
  --warmup-seconds 3 --k 16 --miss 0.05 --new-tokens 8 --codec int8 --batching off --mode threads,asyncio \
  --device-cache 24 --full sequential --out $OUT/serve_miss
step ttft 90 python3 -m chunkcache.cli bench ttft --model llama3-8b --contexts 8192,32768 --codecs int8 \
  --policies qfast --reps 9 --warmup 2 --no-cold --batch 0 --device-cache 24 --out $OUT/ttft
cat $OUT/steps.txt
tail -n 3 $OUT/gputests.log
grep -E "warm-up|q/s|fused vs" $OUT/serve_hits.log $OUT/serve_miss.log
grep -E "engine.fuse" $OUT/ttft.log
