#!/bin/bash
# GPU call of the fidelity engineer (issue 14, session 8): `chunkcache bench quality` with
# SmolLM2-135M in fp32 on the H200, 32 answer tokens: the context sink (`--sink context`: every
# chunk encoded behind the prefix and two passages, bench_results/session8/fidelity/NOTES.md)
# against the shipped prefix sink, at equal compute (same policies, same ratios, one stored
# variant per chunk). Tags: none = prefix sink; ctx = the two generic CONTEXT_SINK_PASSAGES;
# ctxc = two passages of the same corpus that no prompt of the run holds (factual dev: case 0 of
# heldout, passages 0-1; heldout: case 0 of dev; MuSiQue: question 0's passages 5-6).
#   part "fact": the factual set, both splits, every case (dev 59, heldout 56), 16 processes:
#     prefix sink  naive, qfast@0.15, qvalue@0.15 (+ bf16 full prefill on 8 cases per split)
#     ctx          naive, qfast@0.15
#     ctxc         naive, qfast@0.15
#     ctxc1        ctxc with the first chunk from its prefix-sink encoding (exact: two stored
#                  variants per chunk, bench-side through fuse_kv), naive, qfast@0.15, qvalue@0.15
#                  (the best on the CPU: NOTES.md section 2)
#   part "musique": the 100 musique_dev questions, 5 passages, 12 processes:
#     prefix sink  naive, qfast@0.05, qfast@0.15, qvalue@0.15 (+ bf16 full prefill on 4 questions)
#     ctxc1        naive, qfast@0.05, qfast@0.15
# PART=all (default) runs both at once (28 processes on the 16 cores), every slice cut at SLICE_S
# (200 s); about 240 s in all with the merges. Each slice writes its rows after every question;
# the merge pools what finished and (--common) compares every config on the questions all of
# them finished (n in the tables): at ~3 question-configs/s (session 7's call B) one window
# covers about half; PART=fact and PART=musique in two windows cover about all.
#
#   bash bench_results/session8/gpu/fidelity.sh     # tables.txt, merged JSON, logs.txt in $OUT/fidelity
set -u
export PYTHONUNBUFFERED=1
case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) source bench_results/session7/gpu/setup.sh > /dev/null 2>&1 ;; esac
OUT=${OUT:-/tmp/out}
O=$OUT/fidelity
T=/tmp/fidelity8; rm -rf $T; mkdir -p $T $O
PART=${PART:-all}
SLICE_S=${SLICE_S:-200}
Q="python3 -m chunkcache.bench.quality --device ${DEVICE:-cuda} --dtype float32 --answer-tokens 32"
FACT="--data chunkcache/bench/data/factual.json --passages 6"
python3 -c "import torch, chunkcache; from chunkcache.engine import SINKS; \
print('torch', torch.__version__, torch.cuda.get_device_name(0), '| sinks', SINKS)" > $T/env.log 2>&1
t0=$SECONDS
run() {  # name, then the bench's arguments
  local name=$1; shift
  timeout $SLICE_S $Q "$@" --out $T/$name.json > $T/$name.log 2>&1 &
}
if [ $PART = all ] || [ $PART = fact ]; then
  for split in dev heldout; do
    other=heldout; [ $split = heldout ] && other=dev
    for s in 0 30; do
      nf=0; [ $s = 0 ] && nf=8
      run fact_${split}_std_$s $FACT --split $split --start $s --questions 30 --noise-floor $nf \
        --configs qfast@0.15,qvalue@0.15
      run fact_${split}_ctx_$s $FACT --split $split --start $s --questions 30 --sink context --tag ctx \
        --configs qfast@0.15
      run fact_${split}_ctxc_$s $FACT --split $split --start $s --questions 30 --sink context \
        --sink-context $other:0:0,1 --tag ctxc --configs qfast@0.15
      run fact_${split}_ctxc1_$s $FACT --split $split --start $s --questions 30 --sink context \
        --sink-context $other:0:0,1 --first-exact --tag ctxc1 --configs qfast@0.15,qvalue@0.15
    done
  done
fi
if [ $PART = all ] || [ $PART = musique ]; then
  for s in 0 17 34 51 68 84; do                # 6 slices of 16-17 questions
    n=$(( s < 68 ? 17 : 16 )); nf=0; [ $s = 0 ] && nf=4
    run mus_std_$s --passages 5 --start $s --questions $n --noise-floor $nf \
      --configs qfast@0.05,qfast@0.15,qvalue@0.15
    run mus_ctxc1_$s --passages 5 --start $s --questions $n --sink context --sink-context all:0:5,6 \
      --first-exact --tag ctxc1 --configs qfast@0.05,qfast@0.15
  done
fi
wait
echo "slices done after $((SECONDS - t0)) s" >> $T/env.log
# a slice killed while rewriting its file leaves broken JSON: merge only whole files
for f in $T/*.json; do python3 -c "import json,sys; json.load(open(sys.argv[1]))" $f 2>/dev/null || mv $f $f.broken; done
M="timeout 40 python3 -m chunkcache.bench.quality --questions 1000 --common --merge"
# the merges run side by side (each a python start-up), then their tables are put in order
if ls $T/fact_dev_*.json > /dev/null 2>&1; then
  for split in dev heldout; do
    $M $T/fact_${split}_*.json --out $O/fidelity8_factual_${split}_h200.json > $T/m_fact_$split.txt 2>&1 &
  done
fi
if ls $T/mus_*.json > /dev/null 2>&1; then
  $M $T/mus_*.json --out $O/fidelity8_musique_h200.json > $T/m_mus.txt 2>&1 &
  $M $T/mus_*.json --start 0 --questions 50 > $T/m_mus0.txt 2>&1 &
  $M $T/mus_*.json --start 50 --questions 50 > $T/m_mus50.txt 2>&1 &
fi
wait
{
  echo "== H200, SmolLM2-135M fp32, 32 answer tokens; prefix sink (no tag) vs context sink (ctx: generic passages, ctxc: corpus passages, ctxc1: and the first chunk exact)"
  echo "== every config on the questions all configs finished (n); gap against prefix-sink naive reuse"
  for x in "factual dev:m_fact_dev" "factual heldout:m_fact_heldout" "MuSiQue dev:m_mus" \
           "MuSiQue dev, questions 0-49:m_mus0" "MuSiQue dev, questions 50-99:m_mus50"; do
    f=$T/${x##*:}.txt; [ -f $f ] && { echo "== ${x%%:*}"; cat $f; }
  done
} > $O/tables.txt 2>&1
echo "merged after $((SECONDS - t0)) s" >> $T/env.log
cp $T/*.json $O/ 2>/dev/null
{ cat $T/env.log; for f in $T/*.log; do echo "== $f"; grep -v "GGUF\|Loading weights" $f | tail -n 2; done; } > $O/logs.txt
cat $O/tables.txt
