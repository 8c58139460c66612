#!/bin/bash
# Lead, session 9, GPU call B2 (carries .whl .tok .gg2, right after B1 while the machine is warm:
# the GGUF's two halves make SmolLM2): the fidelity engineer's fidelity.sh (PART from the caller).
set -u
REAL=$OUT; export OUT=/tmp/resB2; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
PART=${PART:-musique} timeout 235 bash bench_results/session9/gpu/fidelity.sh > $OUT/fidelity.log 2>&1
echo "fidelity rc=$?" >> $OUT/setup.log
tar czf $REAL/callB2.tgz -C $OUT .
cat $OUT/setup.log; tail -n 60 $OUT/fidelity/tables.txt 2>/dev/null || tail -n 30 $OUT/fidelity.log
