"""Which passage does the probe read? For each factual case, fuse once (nn2x contexts, first chunk
exact) with a policy that records the selection context, and rank the stale chunks by several
chunk-level signals against the answer's passage (``gold``): probe attention summed (qvalue's
score), its max, its mean per token, per-layer-band sums, and the TF-IDF cosine of the question
to the chunk text (no model). Prints the gold chunk's rank under each (0 = top)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from chunkcache.bench import quality
from chunkcache.corpus import Neighbours
from chunkcache.select import QValue


class Record(QValue):
    name = "record"

    def select(self, ctx, k):
        self.ctx = ctx
        return super().select(ctx, k)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--split", default="dev")
    p.add_argument("--cases", default="0-11")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    data = "chunkcache/bench/data/factual.json"
    cases = quality.load_cases(data, a.split)
    lo, hi = (map(int, a.cases.split("-")) if "-" in a.cases else (None, None))
    idx = list(range(lo, hi + 1)) if lo is not None else [int(x) for x in a.cases.split(",")]
    from chunkcache.engine import ChunkCache

    eng = ChunkCache(model="smollm2-135m", store=None, dtype="float32", device="cpu", sink="context",
                     sink_context=quality.sink_context(data, "nn:2x"), exact_first=True, fast_path=False)  # fmt: skip
    out = []
    for q in idx:
        ex = cases[q]
        texts = [quality.passage_text(c) for c in ex["ctxs"][:6]]
        pol = Record()
        eng.fuse(texts, ex["question"], recompute_ratio=0.15, policy=pol)
        ctx = pol.ctx
        L = ctx.probe_attn.shape[0]
        stale = ~ctx.exact if ctx.exact is not None else torch.ones(ctx.chunk_of.numel(), dtype=torch.bool)
        n = int(ctx.chunk_offsets.numel())
        sig = {}

        def per_chunk(vals, red):
            r = torch.full((n,), float("-inf"))
            for c in range(n):
                m = (ctx.chunk_of == c) & stale
                if m.any():
                    v = vals[m]
                    r[c] = {"sum": v.sum(), "max": v.max(), "mean": v.mean()}[red]
            return r

        pa = ctx.probe_attn.float()
        vn = ctx.value_norms.float() if ctx.value_norms is not None else torch.ones_like(pa)
        sig["qvalue_sum"] = per_chunk((pa * vn).sum(0), "sum")
        sig["attn_sum"] = per_chunk(pa.sum(0), "sum")
        sig["attn_max"] = per_chunk(pa.sum(0), "max")
        sig["attn_mean"] = per_chunk(pa.sum(0), "mean")
        for b in range(3):
            band = pa[b * L // 3 : (b + 1) * L // 3].sum(0)
            sig[f"band{b}_sum"] = per_chunk(band, "sum")
            sig[f"band{b}_max"] = per_chunk(band, "max")
        # skipping each chunk's first 4 tokens (attention sinks)
        within = ctx.positions - ctx.chunk_offsets[ctx.chunk_of]
        sig["attn_sum_nosink"] = per_chunk(torch.where(within >= 4, pa.sum(0), torch.zeros(())), "sum")
        nb = Neighbours(texts, k=len(texts) - 1)
        qv = nb._vector(__import__("collections").Counter(__import__("re").findall(r"\w+", ex["question"].lower())))
        tf = torch.tensor([sum(x * v.get(w, 0.0) for w, x in qv.items()) for v in nb._vecs])
        tf[0] = float("-inf")  # the exact first chunk is no candidate
        sig["tfidf"] = tf
        gold = ex["gold"]
        ranks = {k: int((v > v[gold]).sum()) for k, v in sig.items()}
        out.append({"q": q, "gold": gold, "ranks": ranks})
        print(q, "gold", gold, " ".join(f"{k}:{r}" for k, r in ranks.items()), flush=True)
    if out:
        keys = out[0]["ranks"]
        stale_cases = [o for o in out if o["gold"] != 0]
        print(f"gold ranked top (of {len(stale_cases)} cases whose gold chunk is stale):")
        for k in keys:
            print(f"  {k:<16} {sum(o['ranks'][k] == 0 for o in stale_cases)}")
    if a.out:
        json.dump(out, open(a.out, "w"), indent=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
