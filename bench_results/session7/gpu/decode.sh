#!/bin/bash
# GPU call of the decode engineer (issue 13, requirement 2, the decode half), about 3 minutes expected, 4 at most (the cuts):
#   1. the batched decoder's gpu tests (tests/test_decode.py -m gpu: 32 requests from 16 threads,
#      at most 4 / 16 decoded together, eager and with the step as a CUDA graph, greedy and seeded
#      sampling, each equal to its own-alone tokens and greedy ones to model.generate; 16 asyncio
#      callers equal to sequential calls), tiny random fp32 model on CUDA; cut at 70 s;
#   2. chunkcache bench decode on the Llama-3-8B shape (random bf16 weights, SmolLM2's tokenizer),
#      8K-token prompts (16 passages of ~512 tokens), K = 1, 8, 16 concurrent generations of 32
#      tokens each, greedy with end-of-sequence off: model.generate one request after another
#      (hf-sequential), the batched decoder from K threads (batched: one packed step for all
#      active requests; batched-graphs: that step replayed as a CUDA graph), model.generate from K
#      threads (hf-threads, last), in the same run, with the ratios to hf-sequential and how many
#      answers equal hf-sequential's (bf16); cut at 160 s (K = 1, 8 took 71 s in call A).
#
#   source bench_results/session7/gpu/setup.sh      # the lead's set-up (skipped here if done)
#   bash bench_results/session7/gpu/decode.sh       # writes decode_h200.{json,md,png}, tests.log, run.log to $OUT
set -u
export PYTHONUNBUFFERED=1
case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) source bench_results/session7/gpu/setup.sh ;; esac
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
timeout 70 python3 -m pytest -q -m gpu tests/test_decode.py -p no:cacheprovider > $OUT/tests.log 2>&1
echo "gpu tests rc=$?" >> $OUT/tests.log
tail -n 5 $OUT/tests.log
timeout 160 python3 -m chunkcache.cli bench decode --model llama3-8b --context 8192 --k 1,8,16 --new-tokens 32 \
  --out $OUT/decode_h200 > $OUT/run.log 2>&1
echo "bench decode rc=$?" >> $OUT/run.log
grep -v "it/s" $OUT/run.log | tail -n 30
