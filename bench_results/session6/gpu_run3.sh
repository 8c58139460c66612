#!/bin/bash
# GPU call 3 of the serve engineer: the load test at 8 clients, 8K prompts, hits only (miss 0),
# fused with one and two concurrent fusions against sequential full prefill.
set -u
export PYTHONUNBUFFERED=1
T=/tmp/res; mkdir -p $T
timeout 120 python3 -m chunkcache.bench.serve --model llama3-8b --clients 8 --seconds 10 --k 16 --passages 64 \
  --miss 0 --new-tokens 1 --codec int8 --fusions 1,2 --full sequential --out $T/serve_h200_hits > $OUT/serve_h200_hits.log 2>&1
echo "serve rc=$?" >> $OUT/serve_h200_hits.log
cp $T/serve_h200_hits.json $T/serve_h200_hits.md $T/serve_h200_hits.png $OUT/ 2>/dev/null
