#!/bin/bash
# Lead, session 8, GPU call 3 (8B shape; carries .whl .tok): after the one-launch zero-copy
# assembly (every layer's decode from the device cache in one launch) and the FIFO staging pool.
set -u
REAL=$OUT; export OUT=/tmp/res; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/steps.txt
  tar czf $REAL/call3.tgz -C $OUT . ; cp $OUT/steps.txt $REAL/
}
step gputests 110 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_devicecache.py tests/test_gpu_concurrency.py -p no:cacheprovider
step kerneltests 60 python3 -m pytest -q tests/test_kernels.py -k "layers or packed or probe" -p no:cacheprovider
step ttft 110 python3 -m chunkcache.bench.ttft --model llama3-8b --contexts 8192,16384,32768 --codecs int8 \
  --policies qfast --reps 5 --warmup 2 --no-cold --batch 0 --device-cache 24 --out $OUT/ttft
step serve_hits 130 python3 -m chunkcache.cli bench serve --model llama3-8b --clients 8 --seconds 10 \
  --warmup-seconds 5 --k 16 --miss 0 --new-tokens 1 --codec int8 --batching off --device-cache 24 \
  --full both --out $OUT/serve_hits
cat $OUT/steps.txt
tail -n 2 $OUT/gputests.log $OUT/kerneltests.log
grep -E "engine.fuse|full prefill" $OUT/ttft.log | grep -v naive
grep -E "q/s|fused vs" $OUT/serve_hits.log
