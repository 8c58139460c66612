#!/bin/bash
# Lead, session 11, GPU call A (8B shape; carries .whl .tok .gg1). In this order:
#   gputests      CUDA tests of what changed (misses admitted to the device cache from the device;
#                 the helpers' GPU tests)
#   miss_profile  issue 13: a miss's parts alone, the GPU's busy share under 8 clients with and
#                 without misses, the write-behind's two forms (bench_results/session11/gpu/miss_profile.py)
#   probe         issue 14 req. 3: the probe's share of TTFT at 8K and 32K (bench_results/session11/gpu/probe.sh)
set -u
REAL=$OUT; export OUT=/tmp/resA; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/steps.txt
  tar czf $REAL/callA.tgz -C $OUT . ; cp $OUT/steps.txt $REAL/
}
step gputests ${GPUTEST_S:-80} python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_gpu_devicecache.py \
  tests/test_gpu_concurrency.py ${EXTRA_TESTS:-}
mkdir -p $OUT/miss
step miss_profile ${MISS_S:-170} python3 bench_results/session11/gpu/miss_profile.py $OUT/miss --seconds 6
[ -f bench_results/session11/gpu/probe.sh ] && step probe ${PROBE_S:-170} bash bench_results/session11/gpu/probe.sh
cat $OUT/steps.txt
tail -n 3 $OUT/gputests.log
grep -E "==|q/s|with a miss|met misses|busy|fused vs|_ms\"" $OUT/miss_profile.log | cut -c1-220 | head -40
[ -f $OUT/probe.log ] && tail -n 40 $OUT/probe.log
exit 0
