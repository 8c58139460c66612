#!/bin/bash
# GPU call of the fidelity engineer (issue 14, session 9): `chunkcache bench quality` with
# SmolLM2-135M in fp32 on the H200, 32 answer tokens, through the engine (its eager path, --eager:
# window 1 on the fast path spent ~4 s a fusion recording graphs and compiling kernels for each
# new prompt shape under 16 processes, so 31 of 100 questions finished): a context
# engine with exact_first (every chunk stored behind the prefix and behind its context; a prompt's
# first chunk fused from the former) against the shipped prefix sink, in ONE process per slice on
# the same questions and the same fp32 full prefill (`--plain-configs`: the prefix-sink engine's
# rows are the untagged ones). Configs (TCONFIGS, PCONFIGS): qfast and qvalue (qstale's budget, the
# first chunk's exact tokens skipped, ranked by attention x V norm: with the first chunk exact
# and a context sink it closed 94.5 / 84.5% against qfast's 87.9 / 76.8% on CPU factual dev 0-11)
# at 5% and 15%: equal compute.
# The context (FSINK for the factual set, MSINK for MuSiQue; the tag follows from it):
#   nn:2x (tag nn2x, factual default)  each chunk behind its 2 nearest passages of the data file
#       (TF-IDF, corpus.Neighbours over every passage of every case), none of a case the chunk
#       belongs to (so none of its own prompt): ChunkCache(sink="context",
#       sink_context=Neighbours(...), exact_first=True); bench_results/session9/fidelity/NOTES.md
#   nn:2 (tag nn2, MuSiQue default)  the same, passages of the chunk's own question's pool allowed
#       (what a real corpus holds: a passage's neighbours are the passages retrieved with it; on
#       MuSiQue's 100-question corpus the others are unrelated, nn2x there is a random context)
#   all:0:5,6 (tag ctxc1)  fixed corpus passages (session 8's corpus sink; window 1 ran it)
#   PART=musique (window 1): the 100 musique_dev questions, 5 passages, 16 processes (one a core)
#     of 6-7 questions: each engine naive reuse and its configs (window 1: qfast at 5% and 15% only);
#     the bf16 full prefill (noise floor) on the first 2 questions of 2 slices.
#   PART=fact (window 2): the factual set, dev (59) and heldout (56), 16 processes of 7-8 cases,
#     the same configs (FSINK: default nn:2x) and the bf16 floor on 4 cases per split.
#   PART=both (window 2, default): PART=fact cut at SLICE_FACT (110 s), then PART=musique cut at
#     SLICE_MUS (80 s): every factual case, then as many MuSiQue questions as fit (about 215 s).
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
PART=${PART:-both}
SLICE_S=${SLICE_S:-190}
if [ $PART = both ]; then SLICE_FACT=${SLICE_FACT:-110}; SLICE_MUS=${SLICE_MUS:-80}; else SLICE_FACT=$SLICE_S; SLICE_MUS=$SLICE_S; fi
TCONFIGS=${TCONFIGS:-qfast@0.05,qfast@0.15,qvalue@0.05,qvalue@0.15}  # the tagged (context) engine's
PCONFIGS=${PCONFIGS:-qfast@0.05,qfast@0.15,qvalue@0.15}                # the prefix-sink engine's
FSINK=${FSINK:-nn:2x}; MSINK=${MSINK:-nn:2}
tag_of() { case $1 in nn:*) echo nn${1#nn:} ;; corpus|*:*:*) echo ctxc1 ;; *) echo ctx ;; esac; }
Q="python3 -m chunkcache.bench.quality --device ${DEVICE:-cuda} --dtype float32 --answer-tokens 32 ${PATHFLAG---eager}"
TWO="--sink context --exact-first --configs $TCONFIGS --plain-configs $PCONFIGS"
python3 -c "import torch, chunkcache; print('torch', torch.__version__, torch.cuda.get_device_name(0))" > $T/env.log 2>&1
echo "PART=$PART SLICE_FACT=$SLICE_FACT SLICE_MUS=$SLICE_MUS TCONFIGS=$TCONFIGS PCONFIGS=$PCONFIGS FSINK=$FSINK MSINK=$MSINK" >> $T/env.log
t0=$SECONDS
run() {  # cut (s), name, then the bench's arguments
  local cut=$1 name=$2; shift 2
  timeout $cut $Q "$@" --out $T/$name.json > $T/$name.log 2>&1 &
}
SETS=""
if [ $PART = fact ] || [ $PART = both ]; then
  for split in dev heldout; do
    ctx=$FSINK; [ $FSINK = corpus ] && { ctx=heldout:0:0,1; [ $split = heldout ] && ctx=dev:0:0,1; }
    for s in 0 8 16 24 32 40 48 56; do          # 8 slices of 8 (dev 59, heldout 56: the last are short)
      nf=0; [ $s = 0 ] && nf=4
      run $SLICE_FACT fact_${split}_$s --data chunkcache/bench/data/factual.json --split $split --passages 6 \
        --start $s --questions 8 --noise-floor $nf $TWO --sink-context $ctx --tag $(tag_of $FSINK)
    done
  done
  SETS="factual_dev:fact_dev factual_heldout:fact_heldout"
  wait
  echo "factual slices done after $((SECONDS - t0)) s" >> $T/env.log
fi
if [ $PART = musique ] || [ $PART = both ]; then
  for i in $(seq 0 15); do                     # 16 slices: 6 or 7 questions (4 x 7 + 12 x 6 = 100)
    s=$(( i < 4 ? 7 * i : 28 + 6 * (i - 4) )); n=$(( i < 4 ? 7 : 6 )); nf=0; [ $i -lt 2 ] && [ $PART = musique ] && nf=2
    run $SLICE_MUS mus_$s --passages 5 --start $s --questions $n --noise-floor $nf $TWO --sink-context $MSINK --tag $(tag_of $MSINK)
  done
  SETS="$SETS musique:mus"
fi
wait
echo "slices done after $((SECONDS - t0)) s" >> $T/env.log
# a slice killed while rewriting its file leaves broken JSON: merge only whole files
for f in $T/*.json; do [ -f $f ] || continue; python3 -c "import json,sys; json.load(open(sys.argv[1]))" $f 2>/dev/null || mv $f $f.broken; done
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
  echo "== H200, SmolLM2-135M fp32, 32 answer tokens, PART=$PART; through the engine (eager path); no tag: prefix sink; tagged: sink_context $FSINK (factual) / $MSINK (MuSiQue), exact_first"
  echo "== every config on the questions all configs finished (n); gap against prefix-sink naive reuse"
  for x in musique "musique0:questions 0-49" "musique50:questions 50-99" factual_dev factual_heldout; do
    f=$T/m_${x%%:*}.txt; [ -f $f ] && { echo "== ${x#*:}"; cat $f; }
  done
} > $O/tables.txt 2>&1
echo "merged after $((SECONDS - t0)) s" >> $T/env.log
cp $T/*.json $O/ 2>/dev/null
{ cat $T/env.log; for f in $T/*.log; do echo "== $f"; grep -v "GGUF\|Loading weights" $f | tail -n 3; done; } > $O/logs.txt
cat $O/tables.txt
