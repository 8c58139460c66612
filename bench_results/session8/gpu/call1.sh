#!/bin/bash
# Lead, session 8, GPU call 1 (8B shape; carries .whl .tok): diagnosis of serving and the
# never-GPU-run parts of session 7. Results tarred into $OUT/call1.tgz after each step.
set -u
REAL=$OUT; export OUT=/tmp/res; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/steps.txt
  tar czf $REAL/call1.tgz -C $OUT . ; cp $OUT/steps.txt $REAL/
}
step profile 260 python3 bench_results/session8/gpu/profile_serve.py --out $OUT/profile --seconds 5
step gputests 110 python3 -m pytest -q -m gpu tests/test_batch.py tests/test_decode.py -p no:cacheprovider
step ttft8k 90 python3 -m chunkcache.bench.ttft --model llama3-8b --contexts 8192 --codecs int8 \
  --policies qfast --reps 5 --warmup 2 --no-cold --batch 0 --device-cache 24 --out $OUT/ttft8k
cat $OUT/steps.txt
grep '^{' $OUT/profile.log
tail -n 3 $OUT/gputests.log
grep -E "engine.fuse|full prefill" $OUT/ttft8k.log | head
