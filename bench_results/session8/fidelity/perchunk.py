"""Per-chunk budgets against the stale attention's recency skew (chunk_mass_dev0-7_cpu.txt: over
the stale cache the question gives the last chunk 0.48 of its deep attention, the full prefill
0.23; the first chunk 0.08 against 0.31). ``PerChunk``: qfast's ranking inside each chunk, the
budget split over the chunks by their length (``equal``) or by the probe mass share flattened
by a power (``pow``). Scored by ``chunkcache.bench.quality.run`` (SmolLM2-135M fp32, CPU):
    OMP_NUM_THREADS=1 .venv/bin/python bench_results/session8/fidelity/perchunk.py --split dev --questions 12 --out x.json
"""

import argparse
import json

import torch

from chunkcache.bench import quality
from chunkcache.engine import ChunkCache
from chunkcache.select import QFast


class PerChunk(QFast):
    def __init__(self, name, power=0.0):
        self.name, self.power = name, power  # power 0: budget by chunk length alone

    def select(self, ctx, k):
        score = ctx.probe_attn.sum(0)
        n_chunks = int(ctx.chunk_offsets.numel())
        lens = torch.bincount(ctx.chunk_of, minlength=n_chunks).float()
        mass = torch.zeros(n_chunks).index_add_(0, ctx.chunk_of, score.float())
        w = lens * (mass / lens).pow(self.power)
        quota = torch.floor(w / w.sum() * k).long().clamp(max=lens.long())
        picks = []
        for c in range(n_chunks):
            idx = (ctx.chunk_of == c).nonzero()[:, 0]
            picks.append(idx[torch.topk(score[idx], int(quota[c])).indices])
        chosen = torch.cat(picks)
        rest = torch.ones_like(score, dtype=torch.bool)
        rest[chosen] = False
        left = k - chosen.numel()  # the rounding's leftover: qfast's best of the rest
        if left > 0:
            r = rest.nonzero()[:, 0]
            chosen = torch.cat([chosen, r[torch.topk(score[r], left).indices]])
        return ctx.positions[chosen]


ap = argparse.ArgumentParser()
ap.add_argument("--split", default="dev")
ap.add_argument("--questions", type=int, default=12)
ap.add_argument("--out", required=True)
a = ap.parse_args()
e = ChunkCache(model="smollm2-135m", store=None, device="cpu")
pols = ("qfast", PerChunk("equal", 0.0), PerChunk("pow0.5", 0.5))
res = quality.run(
    e,
    "chunkcache/bench/data/factual.json",
    questions=a.questions,
    passages=6,
    policies=pols,
    ratios=(0.15,),
    split=a.split,
)
json.dump(res, open(a.out, "w"))
print(quality.table(res["summary"]))
