#!/bin/bash
# Lead, session 11, GPU call B (right after call A, machine warm; carries .gg2, the second half of
# SmolLM2's GGUF: call A brought the first): the fidelity engineer's
# bench_results/session10/gpu/fidelity.sh (SmolLM2-135M fp32, every factual case, MuSiQue as far
# as it gets), cut at FID_S seconds.
set -u
REAL=$OUT; export OUT=/tmp/resB; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
t=$SECONDS
F=bench_results/session11/gpu/fidelity.sh; [ -f $F ] || F=bench_results/session10/gpu/fidelity.sh
timeout ${FID_S:-530} bash $F > $OUT/fidelity.log 2>&1
echo "fidelity rc=$? took $((SECONDS-t))s" | tee $OUT/steps.txt
tar czf $REAL/callB.tgz -C $OUT . ; cp $OUT/steps.txt $REAL/
grep -i "md5" $OUT/setup.log
tail -n 60 $OUT/fidelity.log
