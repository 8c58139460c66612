#!/bin/bash
# Lead, session 16, GPU call 4: NOT RUN (the session's device time was spent; the device tool
# refused it). For the next session: the concurrency and batching GPU tests, twice each, on
# session 15's pipeline with graphs recorded on their own stream (ca66f13), including
# test_graphs_are_recorded_on_a_stream_no_pooled_stream_shares and the two tests that failed in
# calls 2-3 (test_batch ...[0.0-True-False], test_gpu_concurrency ...[2]).
set -u
REAL=$OUT; export OUT=/tmp/res4; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
for i in 1 2; do
  timeout 70 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_gpu_concurrency.py tests/test_batch.py > $OUT/conc$i.log 2>&1
  echo "round $i rc=$?" | tee -a $OUT/steps.txt; tail -n 2 $OUT/conc$i.log
  cp -r $OUT/* $REAL/
done
exit 0
