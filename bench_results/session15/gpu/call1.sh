#!/bin/bash
# Lead, session 15, GPU call 1 (8B shape; carries .whl .tok): host profile of the read phase
# (bench_results/session15/gpu/read_profile.py) at 8K and 16K from the int8 LMDB store.
set -u
REAL=$OUT; export OUT=/tmp/res1; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/steps.txt
  cp -r $OUT/* $REAL/ 2>/dev/null
}
step prof8k 150 python3 bench_results/session15/gpu/read_profile.py $OUT 8192
step prof16k 150 python3 bench_results/session15/gpu/read_profile.py $OUT 16384
cat $OUT/steps.txt
for f in prof8k prof16k; do grep -v "^precompute" $OUT/$f.log | head -75 | cut -c1-200; done
exit 0
