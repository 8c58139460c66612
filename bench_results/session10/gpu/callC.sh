#!/bin/bash
# Lead, session 10, GPU call C (8B shape; carries .whl .tok): bench_results/session10/gpu/ab_serve.py
set -u
REAL=$OUT; export OUT=/tmp/resC; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
t=$SECONDS
timeout ${AB_S:-175} python3 bench_results/session10/gpu/ab_serve.py $OUT > $OUT/ab_serve.log 2>&1
echo "ab_serve rc=$? took $((SECONDS-t))s" | tee $OUT/steps.txt
cp $OUT/* $REAL/ 2>/dev/null
grep -E "^== |q/s|with a miss|met misses" $OUT/ab_serve.log
