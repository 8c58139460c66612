#!/bin/bash
# Lead, session 8, GPU call 5 (carries .whl .tok .gg2, right after call 4 while the machine is
# warm: the GGUF's two halves make SmolLM2): the fidelity engineer's fidelity.sh, slices cut at 170 s.
set -u
REAL=$OUT; export OUT=/tmp/res5; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
SLICE_S=${SLICE_S:-145} timeout 195 bash bench_results/session8/gpu/fidelity.sh > $OUT/fidelity.log 2>&1
echo "fidelity rc=$?" >> $OUT/setup.log
tar czf $REAL/call5.tgz -C $OUT .
cat $OUT/setup.log; tail -n 60 $OUT/fidelity/tables.txt
