#!/bin/bash
# GPU call of the codec engineer (issue 16, requirement 1 and the codec half of 5), on the H200:
#   1. `chunkcache bench quality --codec C` with SmolLM2-135M in fp32 for C in raw, int4, int2,
#      int2m (CODECS="..." to change; int2r is int2 with rotated values) over all 100 musique_dev questions: naive reuse and qfast at 15%, answer-level
#      metrics over 32 answer tokens. On CUDA every fusion goes through the pipelined loader, so
#      the lossy codecs are decoded by the Triton kernel there. 4 slices of 25 questions per
#      codec = 16 parallel processes on one GPU; each slice writes its rows after every question
#      and a slice cut by its timeout still counts what it did. Then --merge per codec and
#      codec_report.py: KL increase over raw as % of the naive-reuse gap, start and per token,
#      on the questions every codec finished; bytes vs bf16.
#   2. `chunkcache bench ttft` on the Llama-3-8B shape (random bf16 weights), 8K and 32K, int8
#      against int2m, qfast, in one run (fused TTFT of int2m must not exceed int8's).
#   3. the gpu-marked kernel and pipeline tests of the int2 family.
# About 8.5 minutes, under 9: quality 260 s (cut), merges ~20 s, ttft cut at 170 s, tests cut at 75 s.
#
#   source bench_results/session7/gpu/setup.sh      # the lead's set-up (skipped here if done)
#   bash bench_results/session7/gpu/codec.sh        # writes codec_report.txt, quality_*.json, ttft_codec.{md,json}, tests.log, logs.txt to $OUT
set -u
export PYTHONUNBUFFERED=1
case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) source bench_results/session7/gpu/setup.sh ;; esac
OUT=${OUT:-/tmp/out}
T=/tmp/codec; rm -rf $T; mkdir -p $T $OUT
SLICE_S=${SLICE_S:-260}
CODECS=${CODECS:-raw int4 int2 int2m}
Q="python3 -m chunkcache.bench.quality --device cuda --dtype float32 --policies qfast --ratios 0.15 --answer-tokens 32 --passages 5"

pids=()
for c in $CODECS; do
  for s in 0 25 50 75; do
    timeout $SLICE_S $Q --codec $c --start $s --questions 25 --out $T/${c}_$s.json > $T/${c}_$s.log 2>&1 &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait $p; echo "pid $p rc=$?" >> $T/env.log; done
for c in $CODECS; do
  timeout 60 python3 -m chunkcache.bench.quality --questions 1000 --merge $T/${c}_*.json --out $OUT/quality_$c.json > $T/merge_$c.log 2>&1
done
timeout 60 python3 bench_results/session7/gpu/codec_report.py $OUT/quality_*.json > $OUT/codec_report.txt 2>&1

timeout 170 python3 -m chunkcache.bench.ttft --model llama3-8b --contexts 8192,32768 --codecs int8,int2m \
  --policies qfast --reps 3 --warmup 2 --no-cold --batch 0 --dir /tmp/codec_ttft --out $OUT/ttft_codec > $T/ttft.log 2>&1
echo "ttft rc=$?" >> $T/env.log
rm -rf /tmp/codec_ttft

timeout 75 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_pipeline.py -k "int2" > $OUT/tests.log 2>&1
echo "tests rc=$?" >> $T/env.log

cat $T/env.log > $OUT/logs.txt
for f in $T/*.log; do echo "== $f"; grep -v "GGUF\|Loading weights" $f | tail -n 6; done >> $OUT/logs.txt
cat $OUT/codec_report.txt; tail -n 25 $T/ttft.log; tail -n 3 $OUT/tests.log
