#!/bin/sh
# The rest of the factual heldout split (cases 20-55) and MuSiQue questions 20-29, then merged
# with run.sh's rows into factual_heldout56.json and musique30.json.
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1 PYTHONPATH=.
D=bench_results/session13/impact
.venv/bin/python -m chunkcache.cli bench quality --data chunkcache/bench/data/factual.json --split heldout \
  --start 20 --questions 36 --passages 6 --device cpu --dtype float32 --token-scores \
  --policies qimpact,qfast --ratios 0.15,0.05 --out $D/factual_heldout20-55.json > $D/factual_heldout20-55.log 2>&1
.venv/bin/python -m chunkcache.cli bench quality --merge $D/factual_heldout20.json $D/factual_heldout20-55.json \
  --start 0 --questions 56 --out $D/factual_heldout56.json > $D/factual_heldout56.log 2>&1
.venv/bin/python -m chunkcache.cli bench quality --data /work/shared/data/musique_dev.json \
  --start 20 --questions 10 --passages 5 --device cpu --dtype float32 --token-scores \
  --policies qimpact,qfast --ratios 0.15,0.05 --out $D/musique20-29.json > $D/musique20-29.log 2>&1
.venv/bin/python -m chunkcache.cli bench quality --merge $D/musique20.json $D/musique20-29.json \
  --start 0 --questions 30 --out $D/musique30.json > $D/musique30.log 2>&1
