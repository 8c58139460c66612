"""Session 9 exploration (issue 14): a better context for later passages, at equal compute.

The session-8 oracle (each chunk encoded behind the passage that precedes it in the prompt)
meets the targets, but the predecessor depends on the prompt. A chunk's *nearest neighbour in
the corpus* does not: it is known at precompute time, and retrieval puts similar passages side
by side, so it may stand in for the real predecessor. Every context keeps the prompt's first
chunk exact (its prefix-sink encoding, the two-variant store) and encodes every later chunk
behind the prefix plus:
  std              nothing (the shipped prefix sink; the first chunk exact anyway)
  ctxc1:<SPLIT:CASE:I,J>  fixed corpus passages (the engine's exact_first with sink_context)
  nn<k>            its k nearest corpus neighbours by TF-IDF cosine (the nearest last, next to
                   the chunk); the corpus is every passage of every case of the data file, the
                   chunk itself excluded
  nn<k>x           the same, the passages of the chunk's own case excluded too (no neighbour
                   can be a passage of the same prompt)
  nn<k>[x]t<T>     the same, the context cut to its last T tokens (the part next to the chunk)
  prev             the passage before it in this prompt (the oracle, not precomputable)
Each context is fused by qfast at the ratios (and naive reuse), so every config has qfast's
compute; rows in ``bench quality``'s form (policy ``<ctx>:qfast``, plain ``qfast`` for std),
so ``chunkcache bench quality --merge FILE`` prints their table, gap against std's naive reuse.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench_results/session9/fidelity/explore.py \
        --split dev --questions 12 --contexts std,ctxc1:heldout:0:0,1,nn1,nn1x --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections import Counter

import torch

import chunkcache.fuse as F
from chunkcache.bench import quality
from chunkcache.engine import ChunkCache
from chunkcache.precompute import encode_chunks

torch.set_grad_enabled(False)


class Neighbours:
    """TF-IDF (sublinear tf, smooth idf) cosine over lower-case word tokens of a corpus."""

    def __init__(self, texts: list[str], owner: list[int]):
        self.texts, self.owner = texts, owner
        docs = [Counter(re.findall(r"\w+", t.lower())) for t in texts]
        df = Counter(w for d in docs for w in d)
        n = len(docs)
        self.idf = {w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()}
        self.vecs = [self._vec(d) for d in docs]

    def _vec(self, d: Counter) -> dict:
        v = {w: (1 + math.log(c)) * self.idf.get(w, 0.0) for w, c in d.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    def nearest(self, text: str, k: int, exclude_owner: int | None = None) -> list[str]:
        q = self._vec(Counter(re.findall(r"\w+", text.lower())))
        scored = []
        for i, v in enumerate(self.vecs):
            if self.texts[i] == text or (exclude_owner is not None and self.owner[i] == exclude_owner):
                continue
            scored.append((sum(x * v.get(w, 0.0) for w, x in q.items()), i))
        scored.sort(reverse=True)
        return [self.texts[i] for _, i in scored[:k]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(quality.DEFAULT_DATA))
    ap.add_argument("--split", default=None)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--questions", type=int, default=12)
    ap.add_argument("--passages", type=int, default=5)
    ap.add_argument("--ratios", default="0.05,0.15")
    ap.add_argument("--contexts", default="std,nn1,nn1x")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    ratios = [float(x) for x in a.ratios.split(",")]
    contexts = re.findall(r"ctxc1:[^:,]+:\d+:\d+(?:,\d+)*|[^,]+", a.contexts)
    e = ChunkCache(model="smollm2-135m", store=None, device=a.device, dtype=a.dtype)
    every = quality.load_cases(a.data, None)
    corpus, owner = [], []
    for ci, ex in enumerate(every):
        for c in ex["ctxs"]:
            corpus.append(quality.passage_text(c))
            owner.append(ci)
    nbrs = Neighbours(corpus, owner)
    cases = quality.load_cases(a.data, a.split)[a.start : a.start + a.questions]
    pre = list(e._prefix_ids)
    rows, t0 = [], time.time()
    for qi, ex in enumerate(cases):
        own = next(i for i, x in enumerate(every) if x is ex or x == ex)
        texts = [quality.passage_text(c) for c in ex["ctxs"][: a.passages]]
        keys = e.precompute(texts)
        ids = e.prompt_ids(texts, ex["question"]).to(e.lm.device)
        first, fl, forced, plain = quality.full_reference(e, ids, 32, 32)
        full = {"first": first, "forced_logits": fl, "forced": forced, "plain": plain,
                "text": e.tokenizer.decode(plain, skip_special_tokens=True).strip()}  # fmt: skip
        std = [e._load(k).to(e.lm.device) for k in keys]
        cids = [c.token_ids.tolist() for c in std]
        suffix = ids[0, len(pre) + sum(len(c) for c in cids) :].tolist()
        for ctx in contexts:
            if ctx == "std":
                sinks = [None] * len(cids)
            elif ctx == "prev":
                sinks = [None] + [pre + cids[i - 1] for i in range(1, len(cids))]
            elif ctx.startswith("ctxc1:"):
                extra = [t for p in quality.sink_context(a.data, ctx[6:]) for t in e._chunk_ids(p)]
                sinks = [None] + [pre + extra] * (len(cids) - 1)
            elif m := re.fullmatch(r"nn(\d+)(x?)(?:t(\d+))?", ctx):
                k, excl = int(m.group(1)), own if m.group(2) else None
                cut = int(m.group(3)) if m.group(3) else None
                sinks = [None]
                for t in texts[1:]:
                    near = nbrs.nearest(t, k, excl)[::-1]  # the nearest last, next to the chunk
                    extra = [x for p in near for x in e._chunk_ids(p)]
                    sinks.append(pre + (extra[-cut:] if cut else extra))
            else:
                raise SystemExit(f"unknown context {ctx!r}")
            chunks = [
                std[i] if s is None else encode_chunks(e.lm, [cids[i]], s)[0].to(e.lm.device)
                for i, s in enumerate(sinks)
            ]
            tag = "" if ctx == "std" else ctx.split(":")[0] + ":"
            for r in [0.0] + ratios:
                cfg = F.FuseConfig(recompute_ratio=r, policy="cacheblend" if r == 0 else "qfast")
                fused = F.fuse_kv(e.lm, e.prefix_kv(), chunks, pre, suffix, cfg)
                row = quality.score(e, quality.FusedAnswer(e, fused), full, ex["answers"], 32)
                name = tag + ("naive" if r == 0 else "qfast")
                rows.append({"q": a.start + qi, "policy": name, "ratio": r, **row})
        json.dump({"command": "explore.py " + " ".join(f"{k}={v}" for k, v in vars(a).items()), "rows": rows},
                  open(a.out, "w"))  # fmt: skip
        print(f"[{qi + 1}/{len(cases)}] {time.time() - t0:.0f}s", flush=True)
    print(quality.table(quality.summarize(rows)))


if __name__ == "__main__":
    main()
