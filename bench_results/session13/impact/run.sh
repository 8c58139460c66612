#!/bin/sh
# Session 13, issue 14 req. 2: qimpact vs qfast (the engine default, PrecomputeConfig.default_policy
# with sink=prefix) at equal compute, SmolLM2-135M fp32 on CPU. One process at a time.
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1 PYTHONPATH=.
D=bench_results/session13/impact
.venv/bin/python -m chunkcache.cli bench quality --data /work/shared/data/musique_dev.json \
  --questions 20 --passages 5 --device cpu --dtype float32 --token-scores \
  --policies qimpact,qfast --ratios 0.15,0.05 --out $D/musique20.json > $D/musique20.log 2>&1
.venv/bin/python -m chunkcache.cli bench quality --data chunkcache/bench/data/factual.json --split heldout \
  --questions 20 --passages 6 --device cpu --dtype float32 --token-scores \
  --policies qimpact,qfast --ratios 0.15,0.05 --out $D/factual_heldout20.json > $D/factual_heldout20.log 2>&1
