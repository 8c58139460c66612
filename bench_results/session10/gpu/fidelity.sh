#!/bin/bash
# GPU call of the fidelity engineer (issue 14, session 10), call B (SmolLM2-135M GGUF), H200, one
# window, ENDS within WALL (default 490 s from its start; the lead's callB.sh cuts it at 530 s). `chunkcache bench quality`, SmolLM2-135M
# fp32, 32 answer tokens, through the engine's eager path (--eager: no graph recording per new
# prompt shape), each slice one process with two engines on the same questions and the same fp32
# full prefill:
#   untagged: the shipped prefix sink (PCONFIGS; qfast@0.15 is the default), and its naive reuse;
#   tagged nn2x / nn2: each chunk stored behind its 2 nearest corpus passages (corpus.Neighbours),
#     the first chunk exact (exact_first), TCONFIGS (qvalue@0.05/0.15: the best method), its naive
#     reuse. Factual: nn:2x (none of the chunk's own case); MuSiQue: nn:2 (the whole corpus).
#   lex (both engines, 15%): select.ChunkFirst, the whole budget first on the stale passage nearest
#     the question by TF-IDF (corpus.nearest), the rest by qvalue: equal compute. On CPU factual
#     dev 0-11 the answer's own passage first (the oracle; TF-IDF finds it in every case where it
#     is stale) answered 9 of 12 against qvalue's 6, heldout 0-11 8 against 9 (session 10 NOTES).
#   full-bfloat16: a bf16 full prefill (the noise floor) on NF_FACT cases of each factual slice
#     (16 a split) and NF_MUS questions of each MuSiQue slice.
# Session 9's script finished 23 + 21 factual cases and 12 MuSiQue questions in ~200 s of slices.
# Where its time went (its rows and logs, bench_results/session9/h200_callC2/fidelity): a factual
# case took ~15 s a process, of which the 9 fusions ~2.7 s; the rest was one forward a step,
# batch 1: the fp32 reference (33 steps) and, per config, a teacher-forced pass and (for the
# configs that disagree, most) a 32-step `model.generate`: ~240 forwards a case. Now
# (`quality.score_many`) a question's configs are teacher-forced in one forward and decoded side
# by side (~33 forwards for all of them, rows equal to one-by-one scoring: tests/test_quality.py),
# and the prefix-sink engine shares the context engine's store (its entries are the exact_first
# prefix variants: not encoded twice). Two phases (factual, then MuSiQue), 16 processes each (one a
# core, OMP_NUM_THREADS=1); the MuSiQue phase is cut to what WALL leaves.
# Every slice writes its rows after every question; the merge compares configs on the questions
# all of them finished (--common; n in the tables).
#
#   bash bench_results/session10/gpu/fidelity.sh        # tables.txt, JSON, logs.txt in $OUT/fidelity
#   DEVICE=cpu QMAX=1 FSLICES=1 MSLICES=1 WALL=900 PY=.venv/bin/python bash bench_results/session10/gpu/fidelity.sh   # CPU check
# Re-run (second window): PART=musique runs the MuSiQue phase alone (WALL from the script's start).
# Call B (bench_results/session10/h200_callB) lost 5 of 16 MuSiQue slices to CUDA out-of-memory
# (16 processes x 8-15 GB: every config's ~3,000-token KV stacked for the side-by-side scoring,
# and the caching allocators' reserve): now MBATCH (4) configs at a time on MuSiQue, each
# question's memory handed back (torch.cuda.empty_cache), expandable segments.
#   PART=musique bash bench_results/session10/gpu/fidelity.sh
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
PART=${PART:-both}                # both | fact | musique
MBATCH=${MBATCH:-4}; FBATCH=${FBATCH:-16}
case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) [ "${DEVICE:-cuda}" = cpu ] || source bench_results/session7/gpu/setup.sh > /dev/null 2>&1 ;; esac
PY=${PY:-python3}
OUT=${OUT:-/tmp/out}
O=$OUT/fidelity
T=/tmp/fidelity10; rm -rf $T; mkdir -p $T $O
WALL=${WALL:-490}                 # this script, setup included (SECONDS counts from its start); the lead cuts it at 530
FACT_CUT=${FACT_CUT:-240}         # the factual phase (estimate ~100 s)
MERGE_S=${MERGE_S:-45}            # kept for the merges and copies at the end
QMAX=${QMAX:-100}                 # cases per slice at most (CPU check: 1)
FSLICES=${FSLICES:-8}             # factual slices a split (of 8; CPU check: 1)
MSLICES=${MSLICES:-16}            # MuSiQue slices (of 16; CPU check: 1)
NF_FACT=${NF_FACT:-2}; NF_MUS=${NF_MUS:-1}
TCONFIGS=${TCONFIGS:-qfast@0.05,qfast@0.15,qvalue@0.05,qvalue@0.15,lex@0.15}  # the tagged (context) engine's
PCONFIGS=${PCONFIGS:-qfast@0.05,qfast@0.15,qvalue@0.15,lex@0.15}              # the prefix-sink engine's
FSINK=${FSINK:-nn:2x}; MSINK=${MSINK:-nn:2}
tag_of() { echo nn${1#nn:}; }
Q="$PY -m chunkcache.bench.quality --device ${DEVICE:-cuda} --dtype float32 --answer-tokens 32 --eager"
TWO="--sink context --exact-first --configs $TCONFIGS --plain-configs $PCONFIGS"
$PY -c "import torch, chunkcache; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" > $T/env.log 2>&1
echo "PART=$PART MBATCH=$MBATCH WALL=$WALL FACT_CUT=$FACT_CUT TCONFIGS=$TCONFIGS PCONFIGS=$PCONFIGS FSINK=$FSINK MSINK=$MSINK NF_FACT=$NF_FACT NF_MUS=$NF_MUS; setup done after $SECONDS s" >> $T/env.log
run() {  # cut (s), name, then the bench's arguments
  local cut=$1 name=$2; shift 2
  timeout $cut $Q "$@" --out $T/$name.json > $T/$name.log 2>&1 &
}
# factual: dev 59 = 5 x 7 + 3 x 8, heldout 56 = 8 x 7: 16 slices (FSLICES a split)
[ $PART = musique ] && FSLICES=0
for split in dev heldout; do
  s=0
  for j in 0 1 2 3 4 5 6 7; do
    n=7; [ $split = dev ] && [ $j -ge 5 ] && n=8
    [ $j -lt $FSLICES ] && run $FACT_CUT fact_${split}_$s --data chunkcache/bench/data/factual.json --split $split \
      --passages 6 --start $s --questions $((n < QMAX ? n : QMAX)) --noise-floor $NF_FACT $TWO --score-batch $FBATCH \
      --sink-context $FSINK --tag $(tag_of $FSINK)
    s=$((s + n))
  done
done
wait
echo "factual slices done after $SECONDS s" >> $T/env.log
MUS_CUT=$((WALL - SECONDS - MERGE_S))
if [ $MUS_CUT -gt 30 ] && [ $PART != fact ]; then
  for i in $(seq 0 $((MSLICES - 1))); do       # 16 slices: 6 or 7 questions (4 x 7 + 12 x 6 = 100)
    s=$(( i < 4 ? 7 * i : 28 + 6 * (i - 4) )); n=$(( i < 4 ? 7 : 6 ))
    run $MUS_CUT mus_$s --passages 5 --start $s --questions $((n < QMAX ? n : QMAX)) --noise-floor $NF_MUS --score-batch $MBATCH \
      $TWO --sink-context $MSINK --tag $(tag_of $MSINK)
  done
  wait
fi
echo "MuSiQue slices (cut at $MUS_CUT s) done after $SECONDS s" >> $T/env.log
# a slice killed while rewriting its file leaves broken JSON: merge only whole files
for f in $T/*.json; do [ -f $f ] || continue; $PY -c "import json,sys; json.load(open(sys.argv[1]))" $f 2>/dev/null || mv $f $f.broken; done
M="timeout 30 $PY -m chunkcache.bench.quality --questions 1000 --common --merge"
for x in factual_dev:fact_dev factual_heldout:fact_heldout musique:mus; do   # the merges side by side
  set -- $T/${x##*:}_*.json; [ -f $1 ] || continue
  $M "$@" --out $O/fidelity10_${x%%:*}_h200.json > $T/m_${x%%:*}.txt 2>&1 &
  if [ ${x%%:*} = musique ]; then
    $M "$@" --start 0 --questions 50 > $T/m_musique0.txt 2>&1 &
    $M "$@" --start 50 --questions 50 > $T/m_musique50.txt 2>&1 &
  fi
done
wait
{
  echo "== H200, SmolLM2-135M fp32, 32 answer tokens; through the engine (eager path); no tag: prefix sink; tagged: sink_context $FSINK (factual) / $MSINK (MuSiQue), exact_first"
  echo "== every config on the questions all configs finished (n); gap against prefix-sink naive reuse; full-bfloat16: the noise floor (its own n)"
  for x in factual_dev factual_heldout musique "musique0:questions 0-49" "musique50:questions 50-99"; do
    f=$T/m_${x%%:*}.txt; [ -f $f ] && { echo "== ${x#*:}"; cat $f; }
  done
} > $O/tables.txt 2>&1
echo "merged after $SECONDS s" >> $T/env.log
cp $T/*.json $O/ 2>/dev/null
{ cat $T/env.log; for f in $T/*.log; do echo "== $f"; grep -v "GGUF\|Loading weights\|clean_up_tokenization" $f | tail -n 4; done; } > $O/logs.txt
cat $T/env.log
cat $O/tables.txt
