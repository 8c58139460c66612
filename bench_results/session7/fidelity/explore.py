"""Session 7 selection variants (issue 14), scored by chunkcache.bench.quality's answer metrics.

Every variant selects before layer 0 from a probe over the stale cache, like qfast, and differs in
how it turns the probe's attention into a ranking. The probe here records the full attention
(per layer, head, question row and key) and each key's stale V norm, so that one harness can
try every reduction; the variants that win become ``chunkcache.select`` policies.

Run from the repository root (SmolLM2-135M fp32, CPU):
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench_results/session7/fidelity/explore.py \
        --data chunkcache/bench/data/factual.json --split dev --questions 20 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from pathlib import Path

import torch

import chunkcache.fuse as F
from chunkcache.bench import quality
from chunkcache.engine import ChunkCache
from kernels.reference import position_mask

REC: deque = deque(maxlen=64)  # the last probe layers recorded (a fusion reads its own L)
_orig = F.kernels.probe_attention


def recording_probe(q, q_pos, k, v, scale=None, window=None):
    out, mass = _orig(q, q_pos, k, v, scale=scale, window=window)
    hq, n, d = q.shape
    hkv, big_n, _ = k.shape
    group = hq // hkv
    mask = position_mask(q_pos.to(q.device), big_n, window)
    scale = d**-0.5 if scale is None else scale
    s = torch.einsum("hnd,hmd->hnm", q.float(), k.float().repeat_interleave(group, 0)) * scale
    p = s.masked_fill(~mask[None], float("-inf")).softmax(-1)  # [Hq, n, N]
    REC.append({"p": p, "vnorm": v.float().norm(dim=-1).repeat_interleave(group, 0)})  # [Hq, N]
    return out, mass


F.kernels.probe_attention = recording_probe

LAST_PROBE: list = []  # the last _Probe built (the draft reads its buffer and hidden state)
_probe_init = F._Probe.__init__


def _stash_init(self, *a, **kw):
    _probe_init(self, *a, **kw)
    LAST_PROBE[:] = [self]


F._Probe.__init__ = _stash_init
DRAFT_EXTRA: dict[int, int] = {}  # id(policy) -> extra token-layers of its last fusion


class Draft:
    """Speculative draft probe: after the question's probe, ``g`` greedy tokens over the stale
    cache (each one probe step through every layer, g x L token-layers more), then rank by the
    attention of the question rows and the draft rows (``w``: the draft rows' share)."""

    probe = True
    before_layers = True

    def __init__(self, name, g, w=0.5, layers_from=0.0):
        self.name, self.g, self.w, self.layers_from = name, g, w, layers_from

    def schedule(self, num_layers, ratio):
        return {0: ratio}

    def select(self, ctx, k):
        pr = LAST_PROBE[0]
        lm, L = pr.lm, pr.lm.spec.num_layers
        buf = pr.buf
        n = buf.shape[3]
        big = torch.cat([buf, buf.new_zeros(*buf.shape[:3], self.g, buf.shape[4])], 3)
        h = pr.h[0, -1]
        ids = torch.zeros(n + self.g, dtype=torch.long, device=buf.device)
        rows = []
        for i in range(self.g):
            tok = int(F.M.final_logits(lm.model, h).argmax())
            ids[n + i] = tok
            step = F._Probe(lm, big, ids, torch.tensor([n + i], device=buf.device), ctx.positions, F._Eager())
            step.run_until(L)
            rows.append(step.attention())  # [L, c]
            h = step.h[0, -1]
        LAST_PROBE[:] = [pr]
        lo = int(self.layers_from * L)
        q = ctx.probe_attn[lo:].sum(0)
        d = torch.stack(rows).mean(0)[lo:].sum(0)
        DRAFT_EXTRA[id(self)] = self.g * L
        score = (1 - self.w) * q + self.w * d
        return ctx.positions[torch.topk(score, k).indices]


_fa_init = quality.FusedAnswer.__init__


def _fa_with_draft(self, engine, fused):
    _fa_init(self, engine, fused)
    extra = fused.stats.get("draft_extra")
    if extra:
        L = engine.lm.spec.num_layers
        self.compute_fraction += extra / (L * (fused.stats["prompt_tokens"] - fused.stats["prefix_tokens"]))


quality.FusedAnswer.__init__ = _fa_with_draft
_fuse_assembled = F.fuse_assembled


def _fuse_counting(lm, buf, ids, n_prefix, chunk_lengths, token_scores, config, *a, **kw):
    res = _fuse_assembled(lm, buf, ids, n_prefix, chunk_lengths, token_scores, config, *a, **kw)
    pol = config.selector
    if isinstance(pol, Draft) and id(pol) in DRAFT_EXTRA:
        res.stats["draft_extra"] = DRAFT_EXTRA.pop(id(pol))
    return res


F.fuse_assembled = _fuse_counting


class Variant:
    """A before-layer-0 probe policy whose ranking is ``score(probs [L, Hq, n, c], ctx)``."""

    probe = True
    before_layers = True

    def __init__(self, name, score):
        self.name, self.score = name, score

    def schedule(self, num_layers, ratio):
        return {0: ratio}

    def select(self, ctx, k):
        L = len(ctx.probe_attn)
        recs = list(REC)[-L:]
        p = torch.stack([r["p"][:, :, ctx.positions] for r in recs])  # [L, Hq, n, c]
        vn = torch.stack([r["vnorm"][:, ctx.positions] for r in recs])  # [L, Hq, c]
        return ctx.positions[torch.topk(self.score(p, vn, ctx), k).indices]


def mean_rows(p, vn, ctx):
    return p.mean(dim=(1, 2)).sum(0)


def last_rows(m):
    def f(p, vn, ctx):
        return p[:, :, -m:].mean(dim=(1, 2)).sum(0)

    return f


def mix_last(m, w):
    """(1-w) x mean over all rows + w x mean over the last m rows."""

    def f(p, vn, ctx):
        return (1 - w) * p.mean(dim=(1, 2)).sum(0) + w * p[:, :, -m:].mean(dim=(1, 2)).sum(0)

    return f


def max_rows(p, vn, ctx):
    return p.mean(1).amax(1).sum(0)


def max_heads(p, vn, ctx):
    return p.mean(2).amax(1).sum(0)


def value_aware(p, vn, ctx):
    return (p.mean(2) * vn).mean(1).sum(0)


def value_aware_mean(p, vn, ctx):
    """The head-mean mass times the head-mean V norm (what the probe kernel's mass allows)."""
    return (p.mean(dim=(1, 2)) * vn.mean(1)).sum(0)


def chunk_normed(p, vn, ctx):
    """Each row's attention renormalised over the chunk tokens (sink, prefix and question out)."""
    q = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    return q.mean(dim=(1, 2)).sum(0)


def layers(lo, hi):
    def f(p, vn, ctx):
        n = p.shape[0]
        return p[int(lo * n) : int(hi * n)].mean(dim=(1, 2)).sum(0)

    return f


def chunk_boost(beta, base=mean_rows):
    """Each token's attention times (its chunk's share of the probe mass / the mean share) ** beta:
    tokens of the chunks the question reads most come first (A^3's chunk relevance, softly)."""

    def f(p, vn, ctx):
        s = base(p, vn, ctx)
        chunks = int(ctx.chunk_offsets.numel())
        mass = torch.zeros(chunks, dtype=s.dtype).index_add_(0, ctx.chunk_of.cpu(), s.cpu())
        rel = (mass / mass.mean().clamp_min(1e-12)).clamp_min(1e-6) ** beta
        return s * rel.to(s.device)[ctx.chunk_of]

    return f


def chunk_density(beta, base=mean_rows):
    """Like chunk_boost, with a chunk's mass per token (long chunks are not favoured)."""

    def f(p, vn, ctx):
        s = base(p, vn, ctx)
        chunks = int(ctx.chunk_offsets.numel())
        mass = torch.zeros(chunks, dtype=s.dtype).index_add_(0, ctx.chunk_of.cpu(), s.cpu())
        size = torch.bincount(ctx.chunk_of.cpu(), minlength=chunks).to(s.dtype)
        dens = mass / size
        rel = (dens / dens.mean().clamp_min(1e-12)).clamp_min(1e-6) ** beta
        return s * rel.to(s.device)[ctx.chunk_of]

    return f


SHARE: list[float] = []  # qfast's share of the budget spent on the first chunk, per fusion


def skip_first(base=mean_rows):
    """The first chunk's reused K/V are exact (encoded behind the same prefix it sits behind):
    rank only the other chunks' tokens."""

    def f(p, vn, ctx):
        s = base(p, vn, ctx)
        k = max(1, round(0.15 * s.numel()))
        SHARE.append(float((ctx.chunk_of[torch.topk(s, k).indices] == 0).float().mean()))
        return torch.where(ctx.chunk_of == 0, torch.full_like(s, -1.0), s)

    return f


VARIANTS = {
    "qfast": None,
    "mean": Variant("mean", mean_rows),
    "last1": Variant("last1", last_rows(1)),
    "last6": Variant("last6", last_rows(6)),
    "mix6": Variant("mix6", mix_last(6, 0.5)),
    "rowmax": Variant("rowmax", max_rows),
    "headmax": Variant("headmax", max_heads),
    "vaware": Variant("vaware", value_aware),
    "vawarem": Variant("vawarem", value_aware_mean),
    "cnorm": Variant("cnorm", chunk_normed),
    "L50-100": Variant("L50-100", layers(0.5, 1.0)),
    "skip0": Variant("skip0", skip_first()),
    "cboost1": Variant("cboost1", chunk_boost(1.0)),
    "cboost2": Variant("cboost2", chunk_boost(2.0)),
    "cdens1": Variant("cdens1", chunk_density(1.0)),
    "draft4": Draft("draft4", 4),
    "draft8": Draft("draft8", 8),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="demos/data/musique_dev.json")
    p.add_argument("--split", default=None)
    p.add_argument("--questions", type=int, default=10)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--passages", type=int, default=6)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--ratios", default="0.15")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    pol = tuple("qfast" if VARIANTS[v] is None else VARIANTS[v] for v in args.variants.split(","))
    header = {"command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv)}
    engine = ChunkCache(model="smollm2-135m", store=None, dtype="float32", device="cpu")
    res = quality.run(
        engine,
        data_path=args.data,
        questions=args.questions,
        start=args.start,
        passages=args.passages,
        policies=pol,
        ratios=tuple(float(x) for x in args.ratios.split(",")),
        split=args.split,
        partial=args.out,
        header=header,
    )
    print(quality.table(res["summary"]))
    if SHARE:
        print(
            f"qfast's top 15% in the first chunk: {sum(SHARE) / len(SHARE):.3f} of the budget (mean of {len(SHARE)})"
        )
    Path(args.out).write_text(json.dumps({**header, **res}, indent=1))


if __name__ == "__main__":
    main()
