#!/bin/bash
# Lead, session 16, GPU call 4: the concurrency and batching GPU tests, twice each, on session 15's
# pipeline (the copies ahead reverted): is the capture failure of calls 2-3 gone with them?
set -u
REAL=$OUT; export OUT=/tmp/res4; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
for i in 1 2; do
  timeout 70 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_gpu_concurrency.py tests/test_batch.py > $OUT/conc$i.log 2>&1
  echo "round $i rc=$?" | tee -a $OUT/steps.txt; tail -n 2 $OUT/conc$i.log
  cp -r $OUT/* $REAL/
done
exit 0
