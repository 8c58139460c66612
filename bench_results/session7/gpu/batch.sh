#!/bin/bash
# GPU call of the batch engineer (issue 13, requirement 2: batched fusion). About 190 s:
#   1. gpu-marked tests of batching (tests/test_batch.py): the packed layer with the fused Triton
#      kernels; 16 threads, 48 requests with different chunk sets and lengths through an engine
#      with batching (CUDA fast path, loaders, graphs for batches of one), each result against
#      the same call alone                                                           (<= 50 s)
#   2. batch_serve.py: 8B shape, int8, 8K (16 passages), 8 clients, one new token, 8 s a side:
#      hits only and 5% misses: full prefill one at a time, fused one at a time, fused batched
#      (+ batched behind the lead's device cache of DEVCACHE GiB, default 24; DEVCACHE=0:
#      batched without preload instead, hits only)                                   (<= 135 s)
#   PREP=1 adds a hits side with BatchConfig(prep_stream=True), WAIT=20 one with max_wait_ms=20
#   (about 12 s each); EACH=1 a side with BatchConfig(recompute="each") (probes packed, each
#   recompute replayed as CUDA graphs alone), hits and 5% misses (about 25 s).
#   MICRO=1 adds batch_micro.py (fuse_many of J = 1, 4, 8 against one at a time, eager and with
#   the engine's graphs, stage times: the profile of a batched pass; at most 80 s more).
#
#   source bench_results/session7/gpu/setup.sh      # the lead's set-up (skipped here if done)
#   bash bench_results/session7/gpu/batch.sh        # logs, JSON and tables to $OUT/batch/
set -u
export PYTHONUNBUFFERED=1
case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) source bench_results/session7/gpu/setup.sh ;; esac
OUT=${OUT:-/tmp/out}
O=$OUT/batch; mkdir -p $O
t=$SECONDS
timeout 50 python3 -m pytest -q -x -m gpu tests/test_batch.py -p no:cacheprovider > $O/tests.log 2>&1
echo "tests rc=$? took $((SECONDS-t))s" >> $O/rc.txt; t=$SECONDS
ST=135; [ -n "${PREP:-}" ] && ST=$((ST + 15)); [ -n "${WAIT:-}" ] && ST=$((ST + 15))
[ -n "${EACH:-}" ] && ST=$((ST + 30))
timeout $ST python3 bench_results/session7/gpu/batch_serve.py --seconds 8 --device-cache ${DEVCACHE:-24} ${PREP:+--prep-stream} \
  ${WAIT:+--wait-ms $WAIT} ${EACH:+--each} --out $O/serve > $O/serve.log 2>&1
echo "serve rc=$? took $((SECONDS-t))s" >> $O/rc.txt; t=$SECONDS
if [ "${MICRO:-0}" = 1 ]; then
  timeout 80 python3 bench_results/session7/gpu/batch_micro.py --sizes 1,4,8 --out $O/micro.json > $O/micro.log 2>&1
  echo "micro rc=$? took $((SECONDS-t))s" >> $O/rc.txt
fi
cat $O/rc.txt
tail -n 3 $O/tests.log; grep -E "q/s|^\|" $O/serve.log; grep '^{' $O/micro.log 2>/dev/null
