#!/bin/bash
# GPU call of the fidelity engineer (issue 14, session 9): SmolLM2-135M in fp32 on the H200, 32
# answer tokens; every context keeps the prompt's first chunk exact and is fused by qfast, so every
# config has qfast's compute. Gap against prefix-sink naive reuse (bench_results/session9/fidelity/NOTES.md).
#   PART=musique (window 1): the 100 musique_dev questions, 5 passages, 16 processes (one a core)
#     of 6-7 questions, bench_results/session9/fidelity/explore.py (one process: one full prefill
#     per question, every context fused through fuse.fuse_kv), naive reuse, qfast@0.05, qfast@0.15 of:
#       std     the shipped prefix sink (rows "naive", "qfast")
#       nn2x    every later chunk encoded behind its 2 nearest corpus passages (TF-IDF; the
#               passages of the chunk's own question excluded: none can be in its prompt)
#       ctxc1   every later chunk behind question 0's passages 5-6 (the session-8 corpus sink;
#               the engine's exact_first)
#   PART=fact (window 2): the factual set, dev (59) and heldout (56), 16 processes of 7-8 cases:
#     `chunkcache bench quality` through the engine: ChunkCache(sink="context", sink_context=the
#     other split's case 0 passages 0-1, exact_first=True) tagged ctxc1, and in the same process
#     (--plain-configs) the prefix-sink engine (untagged); bf16 full prefill on 4 cases per split.
# Every slice is cut at SLICE_S (190 s) and writes its rows after every question; the merge
# compares configs on the questions all of them finished (--common; n in the tables).
# OMP_NUM_THREADS=1: one process a core (session 8 ran 34 processes with torch's default threads).
#
#   PART=musique bash bench_results/session9/gpu/fidelity.sh   # tables.txt, JSON, logs.txt in $OUT/fidelity
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) source bench_results/session7/gpu/setup.sh > /dev/null 2>&1 ;; esac
OUT=${OUT:-/tmp/out}
O=$OUT/fidelity
T=/tmp/fidelity9; rm -rf $T; mkdir -p $T $O
PART=${PART:-musique}
SLICE_S=${SLICE_S:-190}
CONFIGS=${CONFIGS:-qfast@0.05,qfast@0.15}
Q="python3 -m chunkcache.bench.quality --device ${DEVICE:-cuda} --dtype float32 --answer-tokens 32"
TWO="--sink context --exact-first --tag ctxc1 --configs $CONFIGS --plain-configs $CONFIGS"
X="python3 bench_results/session9/fidelity/explore.py --device ${DEVICE:-cuda} --ratios ${RATIOS:-0.05,0.15}"
CONTEXTS=${CONTEXTS:-std,nn2x,ctxc1:all:0:5,6}
python3 -c "import torch, chunkcache; print('torch', torch.__version__, torch.cuda.get_device_name(0))" > $T/env.log 2>&1
echo "PART=$PART SLICE_S=$SLICE_S CONFIGS=$CONFIGS CONTEXTS=$CONTEXTS" >> $T/env.log
t0=$SECONDS
run() {  # name, then the command ($Q or $X) and its arguments
  local name=$1; shift
  timeout $SLICE_S "$@" --out $T/$name.json > $T/$name.log 2>&1 &
}
if [ $PART = musique ]; then
  for i in $(seq 0 15); do                     # 16 slices: 6 or 7 questions (4 x 7 + 12 x 6 = 100)
    s=$(( i < 4 ? 7 * i : 28 + 6 * (i - 4) )); n=$(( i < 4 ? 7 : 6 ))
    run mus_$s $X --passages 5 --start $s --questions $n --contexts $CONTEXTS
  done
  SETS="musique:mus"
fi
if [ $PART = fact ]; then
  for split in dev heldout; do
    other=heldout; [ $split = heldout ] && other=dev
    for s in 0 8 16 24 32 40 48 56; do          # 8 slices of 8 (dev 59, heldout 56: the last are short)
      nf=0; [ $s = 0 ] && nf=4
      run fact_${split}_$s $Q --data chunkcache/bench/data/factual.json --split $split --passages 6 \
        --start $s --questions 8 --noise-floor $nf $TWO --sink-context $other:0:0,1
    done
  done
  SETS="factual_dev:fact_dev factual_heldout:fact_heldout"
fi
wait
echo "slices done after $((SECONDS - t0)) s" >> $T/env.log
# a slice killed while rewriting its file leaves broken JSON: merge only whole files
for f in $T/*.json; do python3 -c "import json,sys; json.load(open(sys.argv[1]))" $f 2>/dev/null || mv $f $f.broken; done
M="timeout 40 python3 -m chunkcache.bench.quality --questions 1000 --common --merge"
for x in $SETS; do                             # the merges side by side
  set -- $T/${x##*:}_*.json; [ -f $1 ] || continue
  $M "$@" --out $O/fidelity9_${x%%:*}_h200.json > $T/m_${x%%:*}.txt 2>&1 &
  if [ ${x%%:*} = musique ]; then
    $M "$@" --start 0 --questions 50 > $T/m_musique0.txt 2>&1 &
    $M "$@" --start 50 --questions 50 > $T/m_musique50.txt 2>&1 &
  fi
done
wait
{
  echo "== H200, SmolLM2-135M fp32, 32 answer tokens, PART=$PART; first chunk exact in every context; no tag: prefix sink; nn2x: 2 nearest corpus passages (own question's excluded); ctxc1: fixed corpus passages (engine exact_first in PART=fact)"
  echo "== every config on the questions all configs finished (n); gap against prefix-sink naive reuse"
  for x in musique "musique0:questions 0-49" "musique50:questions 50-99" factual_dev factual_heldout; do
    f=$T/m_${x%%:*}.txt; [ -f $f ] && { echo "== ${x#*:}"; cat $f; }
  done
} > $O/tables.txt 2>&1
echo "merged after $((SECONDS - t0)) s" >> $T/env.log
cp $T/*.json $O/ 2>/dev/null
{ cat $T/env.log; for f in $T/*.log; do echo "== $f"; grep -v "GGUF\|Loading weights" $f | tail -n 3; done; } > $O/logs.txt
cat $O/tables.txt
