#!/bin/bash
# GPU call 1 of the serve engineer (issue 13): gpu-marked tests, bench ttft through engine.fuse,
# bench serve on the Llama-3-8B shape. Run from the worktree copy on the device machine.
set -u
export PYTHONUNBUFFERED=1
T=/tmp/res; mkdir -p $T
timeout 140 python3 -m pytest -q -m gpu tests/test_gpu_concurrency.py tests/test_gpu.py tests/test_pipeline.py -p no:cacheprovider -s > $OUT/gpu_tests.log 2>&1
echo "tests rc=$?" >> $OUT/gpu_tests.log
timeout 150 python3 -m chunkcache.bench.ttft --model llama3-8b --contexts 8192,16384,32768 --codecs int8,raw \
  --policies qfast --reps 3 --warmup 2 --no-cold --batch 0 --out $T/ttft_h200 > $OUT/ttft_h200.log 2>&1
echo "ttft rc=$?" >> $OUT/ttft_h200.log
cp $T/ttft_h200.json $T/ttft_h200.md $OUT/ 2>/dev/null || cp $T/ttft_h200_llama3-8b.partial.json $OUT/ 2>/dev/null
timeout 170 python3 -m chunkcache.bench.serve --model llama3-8b --clients 8 --seconds 20 --k 16 --passages 64 \
  --new-tokens 1 --codec int8 --full both --out $T/serve_h200 > $OUT/serve_h200.log 2>&1
echo "serve rc=$?" >> $OUT/serve_h200.log
cp $T/serve_h200.json $T/serve_h200.md $OUT/ 2>/dev/null
