#!/bin/bash
# Lead, GPU call B of session 7 (right after A, machine warm; carries .whl .gg2): SmolLM2-135M
# quality in fp32 on the H200, 26 processes at once (16 cores, one GPU), every slice cut at $B s
# (each writes its rows after every question, so a cut slice still counts what it finished):
#   codec (issue 16): raw, int4, int2m over the 100 MuSiQue dev questions, naive + qfast 15%;
#   fidelity (issue 14): MuSiQue 100 and the factual set (dev, heldout), naive + qfast, qstale
#   and qvalue at 15% (POLICIES, RATIOS to change).
# Merged tables and JSON in $OUT/call_b.tgz.
set -u
REAL=$OUT; O=/tmp/resb; T=/tmp/q; rm -rf $O $T; mkdir -p $O $T
source bench_results/session7/gpu/setup.sh > $O/setup.log 2>&1
export PYTHONUNBUFFERED=1
B=${B:-480}
POLICIES=${POLICIES:-qfast,qstale,qvalue}
RATIOS=${RATIOS:-0.15}
CODECS=${CODECS:-raw int4 int2m}
Q="python3 -m chunkcache.bench.quality --device cuda --dtype float32 --answer-tokens 32"
FACT=chunkcache/bench/data/factual.json
for c in $CODECS; do
  for s in 0 25 50 75; do
    timeout $B $Q --passages 5 --codec $c --policies qfast --ratios 0.15 --start $s --questions 25 \
      --out $T/codec_${c}_$s.json > $T/codec_${c}_$s.log 2>&1 &
  done
done
for s in 0 17 34 51 68 84; do
  timeout $B $Q --passages 5 --policies $POLICIES --ratios $RATIOS --start $s --questions 17 \
    --out $T/mus_$s.json > $T/mus_$s.log 2>&1 &
done
for split in dev heldout; do
  for s in 0 20 40; do
    timeout $B $Q --data $FACT --split $split --passages 6 --policies $POLICIES --ratios $RATIOS \
      --start $s --questions 20 --out $T/fact_${split}_$s.json > $T/fact_${split}_$s.log 2>&1 &
  done
done
wait
for f in $T/*.json; do python3 -c "import json,sys; json.load(open(sys.argv[1]))" $f 2>/dev/null || mv $f $f.broken; done
M="timeout 60 python3 -m chunkcache.bench.quality --questions 1000 --merge"
{
  for c in $CODECS; do echo "== codec $c (MuSiQue, qfast 15%)"; $M $T/codec_${c}_*.json --out $O/quality_$c.json; done
  timeout 60 python3 bench_results/session7/gpu/codec_report.py $(for c in $CODECS; do echo $O/quality_$c.json; done)
  echo "== MuSiQue dev, all"; $M $T/mus_*.json --out $O/fidelity_musique_h200.json
  echo "== MuSiQue dev, questions 0-49"; $M $T/mus_*.json --start 0 --questions 50
  echo "== MuSiQue dev, questions 50-99"; $M $T/mus_*.json --start 50 --questions 50
  for split in dev heldout; do echo "== factual $split"; $M $T/fact_${split}_*.json --out $O/fidelity_factual_${split}_h200.json; done
} > $O/tables.txt 2>&1
for f in $T/*.log; do echo "== $f"; grep -v "GGUF\|Loading weights" $f | tail -n 3; done > $O/logs.txt
cp $T/*.json $O/ 2>/dev/null
grep -i md5 $O/setup.log; cat $O/tables.txt
tar czf $REAL/call_b.tgz -C $O .
