#!/bin/bash
# Lead, GPU call B of session 7 (right after A, machine warm; carries .whl .gg2): SmolLM2 quality,
# the codec and fidelity engineers' scripts in parallel, results tarred into $OUT/call_b.tgz.
set -u
REAL=$OUT; export OUT=/tmp/resb; rm -rf $OUT; mkdir -p $OUT/codec $OUT/fidelity
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
export PYTHONUNBUFFERED=1
t=$SECONDS
(OUT=$OUT/codec timeout 310 bash bench_results/session7/gpu/codec.sh > $OUT/codec.log 2>&1; echo "codec rc=$? took $((SECONDS-t))s" >> $OUT/steps.txt) &
(OUT=$OUT/fidelity timeout 310 bash bench_results/session7/gpu/fidelity.sh > $OUT/fidelity.log 2>&1; echo "fidelity rc=$? took $((SECONDS-t))s" >> $OUT/steps.txt) &
wait
cat $OUT/setup.log | grep -i md5; cat $OUT/steps.txt
tail -n 25 $OUT/codec.log; tail -n 25 $OUT/fidelity.log
tar czf $REAL/call_b.tgz -C $OUT . ; cp $OUT/steps.txt $REAL/
