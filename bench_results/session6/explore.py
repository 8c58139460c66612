"""Selection variants at equal compute, scored by chunkcache.bench.quality's answer metrics.

Run from the repository root (SmolLM2-135M fp32, CPU):
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench_results/session6/explore.py \
        --data demos/data/musique_dev.json --questions 10 --out bench_results/session6/explore_musique_q0-9.json
Each variant selects before layer 0 from the question's probe (like qfast) and differs only in
how it ranks the chunk tokens; the probe and the recompute cost the same for all of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from chunkcache.bench import quality
from chunkcache.engine import ChunkCache


class Variant:
    probe = True
    before_layers = True

    def __init__(self, name, score):
        self.name, self.score = name, score

    def schedule(self, num_layers, ratio):
        return {0: ratio}

    def select(self, ctx, k):
        return ctx.positions[torch.topk(self.score(ctx, k), k).indices]


def total(ctx, k):
    return ctx.probe_attn.sum(0)


def layer_normed(ctx, k):
    a = ctx.probe_attn
    return (a / a.sum(1, keepdim=True).clamp_min(1e-12)).sum(0)


def layers(lo, hi):
    def f(ctx, k):
        n = ctx.probe_attn.shape[0]
        return ctx.probe_attn[int(lo * n) : max(int(hi * n), int(lo * n) + 1)].sum(0)

    return f


def dilated(gamma, base=total):
    """Each token also gets gamma x its predecessor's score (same chunk): the token after one the
    question reads is the one a copied answer reads next."""

    def f(ctx, k):
        s = base(ctx, k)
        prev = torch.zeros_like(s)
        same = ctx.chunk_of[1:] == ctx.chunk_of[:-1]
        prev[1:] = torch.where(same, s[:-1], torch.zeros_like(s[1:]))
        return torch.maximum(s, gamma * prev)

    return f


def with_starts(n_start, base=total):
    def f(ctx, k):
        s = base(ctx, k)
        return s + (ctx.within_chunk() < n_start).float() * (s.max() + 1)

    return f


def per_chunk(alpha, base=total):
    """Budget per chunk proportional to its probe mass ** alpha, top tokens within each chunk."""

    def f(ctx, k):
        s = base(ctx, k)
        chunks = int(ctx.chunk_offsets.numel())
        mass = torch.zeros(chunks).index_add_(0, ctx.chunk_of.cpu(), s.cpu().float()) ** alpha
        share = mass / mass.sum()
        quota = torch.floor(share * k).long()
        quota[torch.argsort(share * k - quota, descending=True)[: k - int(quota.sum())]] += 1
        out = torch.full_like(s, -1.0)
        for c in range(chunks):
            idx = (ctx.chunk_of == c).nonzero()[:, 0]
            q = min(int(quota[c]), idx.numel())
            if q:
                top = idx[torch.topk(s[idx], q).indices]
                out[top] = 1.0 + s[top]
        return out

    return f


VARIANTS = {
    "qfast": None,
    "lnorm": Variant("lnorm", layer_normed),
    "dil50": Variant("dil50", dilated(0.5)),
    "dil100": Variant("dil100", dilated(1.0)),
    "start4": Variant("start4", with_starts(4)),
    "chunk05": Variant("chunk05", per_chunk(0.5)),
    "L0-50": Variant("L0-50", layers(0.0, 0.5)),
    "L0-33": Variant("L0-33", layers(0.0, 0.34)),
    "L33-100": Variant("L33-100", layers(0.34, 1.0)),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="demos/data/musique_dev.json")
    p.add_argument("--split", default=None)
    p.add_argument("--ids", default=None, help="file of case ids to keep (factual set)")
    p.add_argument("--questions", type=int, default=10)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--passages", type=int, default=6)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--ratios", default="0.15")
    p.add_argument("--refine", default="")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    pol = tuple("qfast" if VARIANTS[v] is None else VARIANTS[v] for v in args.variants.split(","))
    refines = tuple((int(a), float(b)) for a, b in (x.split(":") for x in args.refine.split(",") if x))
    data = args.data
    if args.ids:
        keep = set(Path(args.ids).read_text().split())
        cases = [c for c in quality.load_cases(args.data, args.split) if c["id"] in keep]
        data = "/tmp/explore_cases.json"
        Path(data).write_text(json.dumps(cases))
    header = {"command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv)}
    engine = ChunkCache(model="smollm2-135m", store=None, dtype="float32", device="cpu")
    res = quality.run(
        engine, data_path=data, questions=args.questions, start=args.start, passages=args.passages,
        policies=pol, ratios=tuple(float(x) for x in args.ratios.split(",")), split=None if args.ids else args.split,
        partial=args.out, header=header, refines=refines,
    )
    print(quality.table(res["summary"]))
    Path(args.out).write_text(json.dumps({**header, **res}, indent=1))


if __name__ == "__main__":
    main()
