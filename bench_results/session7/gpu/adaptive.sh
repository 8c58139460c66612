#!/bin/bash
# GPU call of the adaptive-loading engineer (issue 16, requirements 3-5): on the H200, Llama-3-8B
# shape (random bf16 weights), 8K context (16 passages of 512 tokens), qfast 15%, one process:
#   - full prefill TTFT (the recompute rate) and the adaptive full-prefill fallback's TTFT;
#   - the front recompute of 8 chunks in place: the model's forward (used) against the fusion's
#     own layer loop (the alternative), same KV;
#   - per codec (int8, int2, and any newer codec on main): fused TTFT with every chunk from the warm
#     local store, then the in-place mixed fusion at splits recompute k / fetch 16 - k,
#     k = 0, 2, ..., 16, with its stages (plan, fetch, recompute, fuse);
#   - a PROJECTION table per link 1/10/25 Gb/s per codec, with its formula, from those numbers.
# About 2-3 minutes (model build ~30 s, precompute, ~150 fusions); the step is cut at 230 s.
#
#   source bench_results/session7/gpu/setup.sh      # the lead's set-up (skipped here if done)
#   bash bench_results/session7/gpu/adaptive.sh     # writes adaptive_h200.{json,log}, adaptive_h200_projection.md, run.log to $OUT
set -u
export PYTHONUNBUFFERED=1
case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) source bench_results/session7/gpu/setup.sh ;; esac
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
timeout 230 python3 bench_results/session7/gpu/adaptive_h200.py --out $OUT > $OUT/run.log 2>&1
echo "adaptive_h200 rc=$?" >> $OUT/run.log
tail -n 40 $OUT/run.log
