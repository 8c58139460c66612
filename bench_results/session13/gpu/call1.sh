#!/bin/bash
# Lead, session 13, GPU call 1 (8B shape; carries .whl .tok .gg1). In this order:
#   gputests      tests/test_gpu.py (epic0's exact tie-break among them), test_gpu_devicecache,
#                 test_gpu_concurrency
#   miss_profile  issue 13: 8 clients, 5% misses against full prefill, hits only, the write-behind
#                 A/B, with graph warm-up (bench_results/session11/gpu/miss_profile.py)
#   adaptive      issue 16: bench_results/session10/gpu/adaptive.sh
set -u
REAL=$OUT; export OUT=/tmp/res1; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/steps.txt
  tar czf $REAL/call1.tgz -C $OUT . ; cp $OUT/steps.txt $REAL/
}
step gputests ${GPUTEST_S:-110} python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_gpu.py \
  tests/test_gpu_devicecache.py tests/test_gpu_concurrency.py
mkdir -p $OUT/miss
step miss_profile ${MISS_S:-230} python3 bench_results/session11/gpu/miss_profile.py $OUT/miss --seconds 6
step adaptive ${ADAPT_S:-205} bash bench_results/session10/gpu/adaptive.sh
cat $OUT/steps.txt
tail -n 5 $OUT/gputests.log
grep -E "==|q/s|with a miss|met misses|busy|fused vs|_ms\"|graph warm" $OUT/miss_profile.log | cut -c1-220 | head -40
tail -n 30 $OUT/adaptive.log
exit 0
