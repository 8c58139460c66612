#!/bin/bash
# GPU call of the fidelity engineer (issue 14): `chunkcache bench quality` with SmolLM2-135M in fp32
# on the H200 over all 100 musique_dev questions and the whole factual set (dev 59, heldout 56),
# 32 answer tokens. Defaults (second window; the first, the lead's call_b.sh, ran qfast and qstale
# at 5/15% with the bf16 floor): naive reuse, qfast and qvalue at 15% and 20%, and each of those
# refined after 4 answer tokens with 5% more (`--refine 4:0.05`, fuse.refine), to compare the
# refinement with plain selection at equal compute (the compute column counts every token-layer).
# 16 slices run as parallel processes (one GPU, 16 CPU cores), each writing its rows after every
# question; the merge pools what finished, so a slice cut by its timeout still counts the
# questions it did. Then TTFT of qfast, qstale and qvalue on the Llama-3-8B shape at 8K and 32K (the
# probe's cost). About 8.5 minutes in all (SLICE_S=330, the merge, TTFT_S=150).
#
#   source bench_results/session7/gpu/setup.sh      # the lead's set-up (skipped here if done)
#   bash bench_results/session7/gpu/fidelity.sh     # writes tables.txt, 3 merged JSON, logs.txt to $OUT
set -u
export PYTHONUNBUFFERED=1
case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) source bench_results/session7/gpu/setup.sh ;; esac
OUT=${OUT:-/tmp/out}
T=/tmp/fidelity; rm -rf $T; mkdir -p $T $OUT
POLICIES=${POLICIES:-qfast,qvalue}
SLICE_S=${SLICE_S:-330}
RATIOS=${RATIOS:-0.15,0.2}
NOISE=${NOISE:-0}                              # bf16 full prefill on the first N questions of each slice
EXTRA=${EXTRA---refine 4:0.05}                 # EXTRA="" for none
Q="python3 -m chunkcache.bench.quality --device cuda --dtype float32 --policies $POLICIES --ratios $RATIOS \
  --answer-tokens 32 --noise-floor $NOISE $EXTRA"
FACT=chunkcache/bench/data/factual.json

python3 -c "import torch, chunkcache; from chunkcache.select import POLICIES; \
print('torch', torch.__version__, torch.cuda.get_device_name(0), '| policies', sorted(POLICIES))" > $T/env.log 2>&1
pids=()
for s in 0 13 26 39 52 64 76 88; do            # MuSiQue: 8 slices of 12-13 questions
  n=$(( s < 52 ? 13 : 12 ))
  timeout $SLICE_S $Q --passages 5 --start $s --questions $n --out $T/musique_$s.json > $T/musique_$s.log 2>&1 &
  pids+=($!)
done
for split in dev heldout; do                   # factual: 4 slices of 14-15 cases per split
  for s in 0 15 30 45; do
    timeout $SLICE_S $Q --data $FACT --split $split --passages 6 --start $s --questions 15 \
      --out $T/factual_${split}_$s.json > $T/factual_${split}_$s.log 2>&1 &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait $p; echo "pid $p rc=$?" >> $T/env.log; done

# a slice killed by its timeout while rewriting its file leaves broken JSON: merge only whole files
for f in $T/*.json; do python3 -c "import json,sys; json.load(open(sys.argv[1]))" $f 2>/dev/null || mv $f $f.broken; done
M="python3 -m chunkcache.bench.quality --questions 1000 --merge"
{
  echo "== H200, SmolLM2-135M fp32, policies $POLICIES at $RATIOS $EXTRA; noise floor: bf16 full prefill"
  echo "== MuSiQue dev (all 100 questions unless a slice timed out: see n)"
  timeout 60 $M $T/musique_*.json --out $OUT/fidelity_musique_h200.json
  echo "== MuSiQue dev, questions 0-49"
  timeout 60 $M $T/musique_*.json --start 0 --questions 50
  echo "== MuSiQue dev, questions 50-99"
  timeout 60 $M $T/musique_*.json --start 50 --questions 50
  for split in dev heldout; do
    echo "== factual $split"
    timeout 60 $M $T/factual_${split}_*.json --out $OUT/fidelity_factual_${split}_h200.json
  done
} > $OUT/tables.txt 2>&1
# the probe's cost: TTFT of qfast, qstale and qvalue at 15% on the Llama-3-8B shape (random
# weights, int8 entries, warm page cache), after the quality slices so they do not share the GPU
timeout ${TTFT_S:-150} python3 -m chunkcache.bench.ttft --model llama3-8b --contexts 8192,32768 --codecs int8 \
  --policies qfast,qstale,qvalue --reps 5 --warmup 2 --no-cold --batch 0 --out $T/ttft_policies > $T/ttft.log 2>&1
echo "ttft rc=$?" >> $T/env.log
cp $T/ttft_policies.md $OUT/ 2>/dev/null || tail -n 20 $T/ttft.log > $OUT/ttft_policies.md
cat $T/env.log > $OUT/logs.txt
for f in $T/*.log; do echo "== $f"; grep -v "GGUF\|Loading weights" $f | tail -n 4; done >> $OUT/logs.txt
cat $OUT/tables.txt
