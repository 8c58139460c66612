#!/bin/bash
# Lead, GPU call (issue 13): the device cache of hot entries on the H200.
# gpu tests of the device cache, then bench ttft through engine.fuse on texts, 8B shape, int8,
# from the LMDB store and behind a device cache (rows int8+dev), 8K/16K/32K.
set -u
source bench_results/session7/gpu/setup.sh
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu_devicecache.py -p no:cacheprovider -x > $OUT/gpu_devcache_tests.log 2>&1
echo "tests rc=$?" >> $OUT/gpu_devcache_tests.log; tail -3 $OUT/gpu_devcache_tests.log
timeout 330 python3 -m chunkcache.bench.ttft --model llama3-8b --contexts 8192,16384,32768 --codecs int8 \
  --policies qfast --reps 3 --warmup 2 --no-cold --batch 0 --device-cache 24 --out /tmp/ttft_dev > $OUT/ttft_dev.log 2>&1
echo "ttft rc=$?" >> $OUT/ttft_dev.log
cp /tmp/ttft_dev.md /tmp/ttft_dev.json $OUT/ 2>/dev/null || cp /tmp/ttft_dev_llama3-8b.partial.json $OUT/ 2>/dev/null
grep -E "engine.fuse|full prefill|rc=" $OUT/ttft_dev.log
