"""Session 10 exploration (issue 14): where the factual answers are lost with the best method
(each chunk behind its 2 nearest corpus passages, first chunk exact, qvalue at 15%) and
selections at equal compute that might keep them. Through the engine (``quality.run``), CPU.

Policies (all take the same k tokens as qvalue at the ratio: equal compute):
  focus<S>   qvalue, but S of the budget goes first to the stale chunk with the most
             probe-attention x V-norm mass (the passage the question reads), its best tokens
  gold<S>    the same with the answer's own passage (oracle: ``gold`` of the case)
  qvalue@R+rpA:E  fuse.refine: R up front, E more after A answer tokens (A=0: a second stage
             before the first token), the second probe seeing the question and those tokens

    python bench_results/session10/fidelity/explore.py --split dev --cases 9,10,16 --out x.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from chunkcache.bench import quality
from chunkcache.select import QValue, _top


class Focus(QValue):
    def __init__(self, share: float, chunk: int | None = None, name: str | None = None) -> None:
        self.share, self.chunk = share, chunk
        self.name = name or f"focus{share:g}"

    def select(self, ctx, k: int) -> torch.Tensor:
        score = self.score(ctx).float()
        stale = torch.ones_like(score, dtype=torch.bool) if ctx.exact is None else ~ctx.exact
        n_chunks = int(ctx.chunk_offsets.numel())
        mass = torch.zeros(n_chunks, dtype=score.dtype, device=score.device)
        mass.index_add_(0, ctx.chunk_of, torch.where(stale, score, torch.zeros_like(score)))
        top = int(mass.argmax()) if self.chunk is None else self.chunk
        mine = (ctx.chunk_of == top) & stale
        m = min(int(round(self.share * k)), int(mine.sum()))
        big = score.abs().max() + 1
        ranked = torch.where(mine, score, score - 3 * big)
        first = torch.topk(ranked, m).indices if m else ranked.new_zeros(0, dtype=torch.long)
        out = torch.where(stale, score, score - big)  # exact ones last (qstale)
        out[first] += 3 * big
        return _top(ctx, out, k)


class ChunkNorm(QValue):
    """qvalue with each stale chunk's scores divided by that chunk's total (every chunk's mass
    sums to one): the probe's mass favours the chunks nearest the question (recency), this ranks
    tokens by their share of their own chunk."""

    name = "chunknorm"

    def score(self, ctx):
        s = super().score(ctx).float()
        n = int(ctx.chunk_offsets.numel())
        tot = torch.zeros(n, dtype=s.dtype).index_add_(0, ctx.chunk_of, s)
        return s / tot[ctx.chunk_of].clamp_min(1e-12)


def lexical_top(texts: list[str], question: str) -> int:
    """The stale chunk (not the first: it is exact) whose text is nearest the question by TF-IDF
    cosine over the prompt's passages: the retriever's view, no model."""
    import re
    from collections import Counter

    from chunkcache.corpus import Neighbours

    nb = Neighbours(texts, k=1)
    q = nb._vector(Counter(re.findall(r"\w+", question.lower())))
    sims = [sum(x * v.get(w, 0.0) for w, x in q.items()) for v in nb._vecs]
    return max(range(1, len(texts)), key=lambda i: (sims[i], -i))


def make(name: str, gold: int, lex: int = -1):
    """qvalue | focus<S> | gold<S> | lex<S> | chunknorm"""
    if name.startswith("lex"):
        return Focus(float(name[3:]), lex, name)
    if name.startswith("focus"):
        return Focus(float(name[5:]))
    if name.startswith("gold"):
        return Focus(float(name[4:]), gold, name)
    if name == "chunknorm":
        return ChunkNorm()
    return name


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--split", default="dev")
    p.add_argument("--cases", default="0-11", help="A-B or comma list")
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--shares", default="1,0.5")
    p.add_argument("--refine", default="0:0.05,8:0.05", help="AFTER:EXTRA, the up-front ratio is --ratio minus EXTRA")
    p.add_argument("--no-gold", action="store_true")
    p.add_argument("--configs", default="", help="NAME@RATIO,... instead of the default set (no refines)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    data = "chunkcache/bench/data/factual.json"
    cases = quality.load_cases(data, a.split)
    if "-" in a.cases:
        lo, hi = map(int, a.cases.split("-"))
        idx = list(range(lo, hi + 1))
    else:
        idx = [int(x) for x in a.cases.split(",")]
    from chunkcache.engine import ChunkCache

    eng = ChunkCache(
        model="smollm2-135m", store=None, dtype="float32", device="cpu", sink="context",
        sink_context=quality.sink_context(data, "nn:2x"), exact_first=True, fast_path=False,
    )  # fmt: skip
    refines = [(int(x.split(":")[0]), float(x.split(":")[1])) for x in a.refine.split(",") if x]
    rows = []
    for q in idx:
        gold = cases[q]["gold"]
        if a.configs:
            texts = [quality.passage_text(c) for c in cases[q]["ctxs"][:6]]
            lex = lexical_top(texts, cases[q]["question"])
            configs = [(make(c.split("@")[0], gold, lex), float(c.split("@")[1])) for c in a.configs.split(",")]
            refines = []
        configs = configs if a.configs else [("qvalue", a.ratio)]
        configs += [] if a.configs else [(Focus(float(s)), a.ratio) for s in a.shares.split(",") if s]
        if not a.configs:
            if not a.no_gold:
                configs += [(Focus(1.0, gold, "gold1"), a.ratio)]
            extras = sorted({e for _, e in refines})
            configs += [("qvalue", round(a.ratio - e, 4)) for e in extras]
        res = quality.run(
            eng, data, questions=1, start=q, passages=6, split=a.split, configs=tuple(configs),
            answer_tokens=32, gen_tokens=32, log=None, tag="nn2x",
            refines=tuple(refines),
        )  # fmt: skip
        # refines run at every ratio: keep the ones that sum to the budget
        for r in res["rows"]:
            if "+rp" in r["policy"] and abs(r["ratio"] + float(r["policy"].split(":")[-1]) - a.ratio) > 1e-6:
                continue
            r["gold"] = gold
            rows.append(r)
        Path(a.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=0))
        ok = {f"{r['policy']}@{r['ratio']:g}": int(r["correct"]) for r in res["rows"] if r["q"] == q}
        print(q, "full", res["rows"][0]["full_correct"], ok, flush=True)
    print(quality.table(quality.summarize(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
