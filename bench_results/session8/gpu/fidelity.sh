#!/bin/bash
# GPU call of the fidelity engineer (issue 14, session 8): `chunkcache bench quality` with
# SmolLM2-135M in fp32 on the H200, 32 answer tokens, the context sink (`--sink context`: chunks
# encoded behind the prefix and two generic passages, bench_results/session8/fidelity/NOTES.md)
# against the shipped prefix sink, at equal compute (same policies, same ratios).
#   part "fact": the factual set, both splits, every case (dev 59, heldout 56):
#     prefix sink   naive, qfast@0.15, qvalue@0.15 (+ bf16 full prefill on 8 cases per split)
#     ctx:          context sink, naive, qfast@0.15, qvalue@0.15
#     ctx1:         context sink with the first chunk from its prefix-sink encoding (two stored
#                   variants per chunk; bench-side, fuse_kv eager path), naive, qfast@0.15
#   part "musique": the 100 musique_dev questions, 5 passages:
#     prefix sink   naive, qfast@0.05, qfast@0.15, qvalue@0.15 (+ bf16 full prefill on 4 questions)
#     ctx:          context sink, naive, $BEST@0.05, $BEST@0.15 (BEST=qfast unless set)
# PART=all (default) runs both at once: 34 processes on the 16 cores, every one cut at SLICE_S
# (200 s); about 240 s in all with the merges. Each slice writes its rows after every question,
# the merge pools what finished and, with --common, compares every config on the questions all
# of them finished (n in the tables). For full coverage run PART=fact and PART=musique in two
# windows (each about 240 s, 18 and 16 processes).
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
BEST=${BEST:-qfast}
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
    for s in 0 20 40; do
      nf=0; [ $s = 0 ] && nf=8
      run fact_${split}_std_$s $FACT --split $split --start $s --questions 20 --noise-floor $nf \
        --configs qfast@0.15,qvalue@0.15
      run fact_${split}_ctx_$s $FACT --split $split --start $s --questions 20 --sink context --tag ctx \
        --configs qfast@0.15,qvalue@0.15
      run fact_${split}_ctx1_$s $FACT --split $split --start $s --questions 20 --sink context --first-exact \
        --tag ctx1 --configs qfast@0.15
    done
  done
fi
if [ $PART = all ] || [ $PART = musique ]; then
  for s in 0 13 26 39 52 64 76 88; do          # 8 slices of 12-13 questions
    n=$(( s < 52 ? 13 : 12 )); nf=0; [ $s = 0 ] && nf=4
    run mus_std_$s --passages 5 --start $s --questions $n --noise-floor $nf \
      --configs qfast@0.05,qfast@0.15,qvalue@0.15
    run mus_ctx_$s --passages 5 --start $s --questions $n --sink context --tag ctx \
      --configs $BEST@0.05,$BEST@0.15
  done
fi
wait
echo "slices done after $((SECONDS - t0)) s" >> $T/env.log
# a slice killed while rewriting its file leaves broken JSON: merge only whole files
for f in $T/*.json; do python3 -c "import json,sys; json.load(open(sys.argv[1]))" $f 2>/dev/null || mv $f $f.broken; done
M="timeout 40 python3 -m chunkcache.bench.quality --questions 1000 --common --merge"
{
  echo "== H200, SmolLM2-135M fp32, 32 answer tokens; prefix sink (no tag) vs context sink (ctx:, ctx1: first chunk exact)"
  echo "== every config on the questions all configs finished (n); gap against prefix-sink naive reuse"
  if ls $T/fact_dev_*.json > /dev/null 2>&1; then
    for split in dev heldout; do
      echo "== factual $split"; $M $T/fact_${split}_*.json --out $O/fidelity8_factual_${split}_h200.json
    done
  fi
  if ls $T/mus_*.json > /dev/null 2>&1; then
    echo "== MuSiQue dev"; $M $T/mus_*.json --out $O/fidelity8_musique_h200.json
    echo "== MuSiQue dev, questions 0-49"; $M $T/mus_*.json --start 0 --questions 50
    echo "== MuSiQue dev, questions 50-99"; $M $T/mus_*.json --start 50 --questions 50
  fi
} > $O/tables.txt 2>&1
echo "merged after $((SECONDS - t0)) s" >> $T/env.log
cp $T/*.json $O/ 2>/dev/null
{ cat $T/env.log; for f in $T/*.log; do echo "== $f"; grep -v "GGUF\|Loading weights" $f | tail -n 2; done; } > $O/logs.txt
cat $O/tables.txt
