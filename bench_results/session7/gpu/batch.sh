#!/bin/bash
# GPU call of the batch engineer (issue 13, requirement 2: batched fusion). About 6 minutes:
#   1. gpu-marked tests of batching (packed layer with the fused kernels; 16 threads with
#      different chunk sets and lengths through an engine with batching, against each call
#      alone) and the existing GPU concurrency tests                              (<= 120 s)
#   2. batch_micro.py: J = 1, 2, 4, 8 requests at 8K, 8B shape: fuse_many against one at a time
#      (eager and the engine's graphs path), stage times, and equality with the call alone (<= 100 s)
#   3. bench serve, 8B shape, int8, 8K (16 passages), 8 clients, one new token (TTFT load):
#      hits only: full prefill (one at a time and batched), fused one at a time, fused batched (<= 150 s)
#   4. the same with 5% misses: full prefill one at a time (its best in session 6), fused one
#      at a time, fused batched                                                    (<= 130 s)
#
#   source bench_results/session7/gpu/setup.sh      # the lead's set-up (skipped here if done)
#   bash bench_results/session7/gpu/batch.sh        # logs and JSON to $OUT/batch/
set -u
export PYTHONUNBUFFERED=1
case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) source bench_results/session7/gpu/setup.sh ;; esac
OUT=${OUT:-/tmp/out}
O=$OUT/batch; mkdir -p $O
S="python3 -m chunkcache.cli bench serve --model llama3-8b --clients 8 --seconds 12 --k 16 --passages 64 \
  --new-tokens 1 --codec int8 --batching off,on --max-wait-ms 0"

timeout 120 python3 -m pytest -q -x -m gpu tests/test_batch.py tests/test_gpu_concurrency.py > $O/tests.log 2>&1
echo "tests rc=$?" >> $O/rc.txt
timeout 100 python3 bench_results/session7/gpu/batch_micro.py --out $O/micro.json > $O/micro.log 2>&1
echo "micro rc=$?" >> $O/rc.txt
timeout 150 $S --miss 0 --full both --out $O/serve_hits > $O/serve_hits.log 2>&1
echo "serve hits rc=$?" >> $O/rc.txt
timeout 130 $S --miss 0.05 --full sequential --out $O/serve_miss > $O/serve_miss.log 2>&1
echo "serve miss rc=$?" >> $O/rc.txt
cat $O/rc.txt
tail -n 3 $O/tests.log; cat $O/micro.log | grep '^{' ; grep -E "q/s|fused" $O/serve_hits.log $O/serve_miss.log
