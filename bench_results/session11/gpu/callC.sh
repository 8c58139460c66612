#!/bin/bash
# Lead, session 11, GPU call C (no carry needed beyond the tree; .tok must travel: carry .tok):
#   adaptive   issue 16: bench_results/session10/gpu/adaptive.sh with session 10's fixed warm-up
#              (int2m at 10, 25, 1 Gb/s; int8 at 10; the projection), <= 205 s
set -u
REAL=$OUT; export OUT=/tmp/resC; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/steps.txt
  tar czf $REAL/callC.tgz -C $OUT . ; cp $OUT/steps.txt $REAL/
}
step adaptive 210 bash bench_results/session10/gpu/adaptive.sh
cat $OUT/steps.txt
tail -n 40 $OUT/adaptive.log
exit 0
