"""Session 8 diagnosis, part 2 (issue 14): is the deep-layer staleness of every reused token a
*systematic* "I am the first passage" state that a different precompute context removes?

Each chunk but the first (exact behind the prefix) is encoded behind the prefix plus a context
other than nothing, then fused as usual (naive reuse, qfast at the ratios). Contexts:
  std        the prefix alone (what ships)
  filler     the prefix and one generic made-up passage (same text for every chunk and case)
  filler2    the prefix and two generic passages
  prev       the prefix and the passage that precedes it in this prompt (order-dependent: an
             upper bound for one passage of real context, not precomputable in general)
  fill:<ij..>[:all]  the prefix and fillers i, j, ..; with :all the first chunk too
  corpus:<split>:<i>[:j+k][:all]  the prefix and passages j, k (default 0, 1) of case i of that split (a fixed
             pair from the same corpus for every chunk: a corpus-chosen sink, not the prompt's)
  ktemp<a>   std, the reused chunk keys scaled by a (attention temperature on stale tokens, APE)

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench_results/session8/fidelity/diagnose2.py \
        --split dev --questions 12 --out /tmp/diag2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import chunkcache.fuse as F
from chunkcache.bench import quality
from chunkcache.engine import ChunkCache
from chunkcache.precompute import encode_chunks

sys.path.insert(0, str(Path(__file__).parent))
from diagnose import summarize  # noqa: E402

torch.set_grad_enabled(False)
FILLERS = [
    "Reference\nThis passage is one of several reference passages. It describes a single subject and gives "
    "its names, places and dates as they are recorded.",
    "Notes\nThe records below were collected from several sources. Each entry is kept as it was written, "
    "with the names and numbers that the sources give.",
    "Archive\nThis entry comes from a local archive. It lists what is known about its subject: when it began, "
    "who was involved and where it took place.",
    "Summary\nA short account of one subject follows. The account was checked against older records and "
    "keeps their spelling of names.",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="chunkcache/bench/data/factual.json")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--questions", type=int, default=12)
    ap.add_argument("--passages", type=int, default=6)
    ap.add_argument("--ratios", default="0.15")
    ap.add_argument("--contexts", default="std,filler,filler2,prev,ktemp0.9,ktemp1.1")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    ratios = [float(x) for x in a.ratios.split(",")]
    e = ChunkCache(model="smollm2-135m", store=None, device="cpu")
    cases = quality.load_cases(a.data, a.split if a.split != "all" else None)[a.start : a.start + a.questions]
    pre = list(e._prefix_ids)
    fill_ids = [e._chunk_ids(t) for t in FILLERS]
    rows = []
    t0 = time.time()
    for qi, ex in enumerate(cases):
        texts = [f"{c['title']}\n{c['text']}" for c in ex["ctxs"][: a.passages]]
        keys = e.precompute(texts)
        ids = e.prompt_ids(texts, ex["question"])
        first, fl, forced, plain = quality.full_reference(e, ids, 32, 32)
        full = {
            "first": first,
            "forced_logits": fl,
            "forced": forced,
            "plain": plain,
            "text": e.tokenizer.decode(plain, skip_special_tokens=True).strip(),
        }
        std = [e._load(k) for k in keys]
        cids = [c.token_ids.tolist() for c in std]
        suffix = ids[0, len(pre) + sum(len(c) for c in cids) :].tolist()
        for ctx in a.contexts.split(","):
            if ctx == "std" or ctx.startswith("ktemp"):
                chunks = std
                if ctx.startswith("ktemp"):
                    s = float(ctx[5:])
                    chunks = [std[0]] + [
                        replace(c, kv=torch.stack([c.kv[:, 0] * s, c.kv[:, 1]], 1)) for c in std[1:]
                    ]
            else:
                if ctx == "prev":
                    sinks = [None] + [pre + cids[i - 1] for i in range(1, len(cids))]
                elif ctx.startswith("corpus:"):  # corpus:<split>:<case>[:i,j]: that case's passages i, j
                    split, idx, *which = ctx.split(":")[1:]
                    other = quality.load_cases(a.data, None if split == "all" else split)[int(idx)]
                    first_too = bool(which) and which[-1] == "all"
                    which = which[:-1] if first_too else which
                    pick = [int(x) for x in which[0].split("+")] if which else [0, 1]
                    extra = [t for i in pick for t in e._chunk_ids(quality.passage_text(other["ctxs"][i]))]
                    sinks = [pre + extra if first_too else None] + [pre + extra] * (len(cids) - 1)
                elif ctx.startswith("fill:"):  # fill:<filler indices>[:all] (all: the first chunk too)
                    parts = ctx.split(":")
                    extra = [t for d in parts[1] for t in fill_ids[int(d)]]
                    sinks = [pre + extra] * len(cids)
                    if parts[-1] != "all":
                        sinks[0] = None
                else:
                    extra = fill_ids[0] if ctx == "filler" else fill_ids[0] + fill_ids[1]
                    sinks = [None] + [pre + extra] * (len(cids) - 1)
                chunks = [
                    std[i] if sinks[i] is None else encode_chunks(e.lm, [cids[i]], sinks[i])[0]
                    for i in range(len(cids))
                ]
            for r in [0.0] + ratios:
                fused = F.fuse_kv(e.lm, e.prefix_kv(), chunks, pre, suffix, F.FuseConfig(recompute_ratio=r))
                row = quality.score(e, quality.FusedAnswer(e, fused), full, ex["answers"], 32)
                name = "naive" if (ctx == "std" and r == 0) else f"{ctx}@{r:g}"
                rows.append(
                    {
                        "q": a.start + qi,
                        "config": name,
                        "full_correct": row["full_correct"],
                        **{k: row[k] for k in ("kl_first", "kl_answer", "correct", "agree", "answer")},
                    }
                )
        json.dump({"rows": rows}, open(a.out, "w"))
        print(f"[{qi + 1}/{len(cases)}] {time.time() - t0:.0f}s", flush=True)
    summarize(rows)


if __name__ == "__main__":
    main()
