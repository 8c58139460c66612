"""Session 8 diagnosis (issue 14): what limits fusion fidelity. Oracles built from the full
prefill's own K/V (``F``) and the assembled stale cache (``S``), scored by the answer metrics of
``chunkcache.bench.quality`` (KL at the answer start, per token over the full prefill's 32-token
answer, teacher-forced; answer accuracy of a 32-token greedy answer).

A config is a cache for the prompt's prefix and chunks (positions 0..S-1, or 0..N-2 with the
question's K/V given too); the question and the answer run over it through the model. Configs:
  naive                 every chunk token stale
  fused:<p>@<r>         the engine's fusion (recompute, the question run by fusion)
  selKV:<p>@<r>         the same selection, the selected tokens given their exact K/V (no recompute)
  recKV:<p>@<r>         the fusion's K/V of the chunk tokens only (the question re-run over them)
  rank:<how>@<r>        exact K/V for the top r by an oracle ranking (true V deviation, full
                        prefill's question attention, their product)
  layers<a-b>           exact K/V of every chunk token in layers a..b only
  gold / notgold        exact K/V of the gold passage's tokens only / of every other passage's
  starts<k>             exact K/V of the first k tokens of each chunk
  qexact                every chunk token stale, the question's own K/V exact (from F)

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench_results/session8/fidelity/diagnose.py \
        --split dev --questions 16 --out /tmp/diag.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from transformers import DynamicCache

import chunkcache.fuse as F
from chunkcache.bench import quality
from chunkcache.engine import ChunkCache
from chunkcache.model import cache_kwarg

torch.set_grad_enabled(False)


def full_kv(e, ids):
    cache = DynamicCache()
    e.model(input_ids=ids, use_cache=True, **{cache_kwarg(e.model): cache})
    return torch.stack([torch.stack([lay.keys[0], lay.values[0]]) for lay in cache.layers])  # [L,2,H,N,D]


def score_cache(e, kv, upto, ids, full, answers, gen=32):
    """Cache = kv[:, :, :, :upto]; the rest of the prompt and the answer run over it."""
    cache = F.kv_to_cache(kv[:, :, :, :upto])
    x = torch.cat([ids[0, upto:], full["forced"][:-1]])[None]
    out = e.model(input_ids=x, use_cache=True, **{cache_kwarg(e.model): cache})
    nrest = ids.shape[1] - upto
    lg = out.logits[0, nrest - 1 :].float()
    k = quality.kl(full["forced_logits"], lg)
    cache = F.kv_to_cache(kv[:, :, :, :upto])
    text = e.tokenizer.decode(quality.greedy(e, ids, cache, gen), skip_special_tokens=True).strip()
    return {
        "kl_first": float(k[0]),
        "kl_answer": float(k.mean()),
        "correct": quality.correct(text, answers),
        "agree": text == full["text"],
        "answer": text,
    }


def probe_attention(e, buf, ids, n_prefix, lengths):
    """[C] the probe's attention (summed over layers) of the question over ``buf`` (a copy)."""
    p = F._Prompt.build(ids, n_prefix, lengths, buf.shape[3], buf.device)
    pr = F._Probe(e.lm, buf.clone(), p.ids, p.q_pos, p.ctx_pos, F._Eager())
    pr.run_rest()
    return pr.attention()  # [L, C]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="chunkcache/bench/data/factual.json")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--passages", type=int, default=6)
    ap.add_argument("--ratios", default="0.05,0.15,0.3,0.5")
    ap.add_argument("--groups", default="sweep,oracle,layers,chunks")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    groups = set(a.groups.split(","))
    ratios = [float(x) for x in a.ratios.split(",")]
    e = ChunkCache(model="smollm2-135m", store=None, device="cpu")
    L = e.lm.spec.num_layers
    cases = quality.load_cases(a.data, a.split if a.split != "all" else None)[a.start : a.start + a.questions]
    rows, devrows = [], []
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
            "text": e.tokenizer.decode(plain, skip_special_tokens=True).strip(),
        }
        Fkv = full_kv(e, ids)
        kvs = [e._load(k) for k in keys]
        P = e.prefix_kv().shape[3]
        lengths = [c.num_tokens for c in kvs]
        C = sum(lengths)
        S = P + C
        N = ids.shape[1]
        buf, chunk_of, offs = F.assemble(e.lm, e.prefix_kv(), kvs, N - S)
        gold = ex.get("gold")
        res = {}

        # (closures over this case's tensors, called within its iteration only)
        def add(name, kv, upto=S):
            res[name] = score_cache(e, kv, upto, ids, full, ex["answers"])  # noqa: B023

        def exact_at(pos, layers=None):
            b = buf.clone()  # noqa: B023
            ls = range(L) if layers is None else layers
            for li in ls:
                b[li, :, :, pos] = Fkv[li, :, :, pos]  # noqa: B023
            return b

        add("naive", buf)
        add("full(sanity)", Fkv)
        if "chunks" in groups:
            qb = buf.clone()
            qb[:, :, :, S:] = Fkv[:, :, :, S:]
            add("qexact", qb, N - 1)
        # deviation of the stale cache from the full prefill's, per layer: ||F - S|| / ||F|| (chunk tokens)
        dv = (Fkv[:, :, :, P:S] - buf[:, :, :, P:S]).float().norm(dim=-1).mean(2)  # [L,2,C]
        fn = Fkv[:, :, :, P:S].float().norm(dim=-1).mean(2)
        co = chunk_of[P:S]
        devrows.append(
            {
                "q": a.start + qi,
                "rel_dev_layer_K": (dv[:, 0].mean(1) / fn[:, 0].mean(1)).tolist(),
                "rel_dev_layer_V": (dv[:, 1].mean(1) / fn[:, 1].mean(1)).tolist(),
                "rel_dev_chunk_V": [
                    float(dv[:, 1][:, co == c].mean() / fn[:, 1][:, co == c].mean()) for c in range(len(kvs))
                ],
                "gold": gold,
            }
        )
        if "sweep" in groups or "oracle" in groups:
            for r in ratios:
                fused = e.fuse(texts, ex["question"], recompute_ratio=r, policy="qfast")
                sel = fused.selected
                res[f"fused:qfast@{r:g}"] = quality.score(
                    e, quality.FusedAnswer(e, fused), {**full, "plain": plain}, ex["answers"], 32
                )
                if "oracle" in groups:
                    add(f"selKV:qfast@{r:g}", exact_at(sel))
                    rk = buf.clone()
                    rk[:, :, :, P:S] = fused.kv[:, :, :, P:S]
                    add(f"recKV:qfast@{r:g}", rk)
                    # remaining deviation of the fused cache: selected vs unselected, per layer
                    fdv = (Fkv[:, :, :, P:S] - fused.kv[:, :, :, P:S]).float().norm(dim=-1).mean(2)
                    m = torch.zeros(C, dtype=torch.bool)
                    m[sel - P] = True
                    devrows[-1][f"fused{r:g}_sel_V"] = (
                        fdv[:, 1][:, m].mean(1) / fn[:, 1][:, m].mean(1)
                    ).tolist()
                    devrows[-1][f"fused{r:g}_unsel_V"] = (
                        fdv[:, 1][:, ~m].mean(1) / fn[:, 1][:, ~m].mean(1)
                    ).tolist()
                    devrows[-1][f"stale{r:g}_sel_V"] = (
                        dv[:, 1][:, m].mean(1) / fn[:, 1][:, m].mean(1)
                    ).tolist()
            if "oracle" in groups:
                true_attn = probe_attention(e, Fkv, ids, P, lengths).sum(
                    0
                )  # the question's attention in full prefill
                stale_attn = probe_attention(e, buf, ids, P, lengths).sum(0)
                vdev = dv[:, 1].sum(0)
                for r in ratios:
                    k = round(r * C)
                    for how, sc in [
                        ("truedev", vdev),
                        ("trueattn", true_attn),
                        ("trueattn*dev", true_attn * vdev),
                        ("staleattn*dev", stale_attn * vdev),
                    ]:
                        add(f"rank:{how}@{r:g}", exact_at(torch.topk(sc, k).indices + P))
        if "layers" in groups:
            allpos = torch.arange(P, S)
            for lo, hi in [(0, 9), (10, 19), (20, 29), (0, 14), (15, 29)]:
                add(f"layers{lo}-{hi}", exact_at(allpos, range(lo, hi + 1)))
        if "chunks" in groups:
            for k in (4, 16):
                pos = torch.cat([torch.arange(o, o + min(k, n)) for o, n in zip(offs, lengths, strict=True)])
                add(f"starts{k}", exact_at(pos))
            if gold is not None and gold < len(kvs):
                gpos = torch.arange(offs[gold], offs[gold] + lengths[gold])
                add("gold", exact_at(gpos))
                m = torch.ones(S, dtype=torch.bool)
                m[:P] = False
                m[gpos] = False
                add("notgold", exact_at(m.nonzero()[:, 0]))
                devrows[-1]["gold_pos"] = gold
            for c in range(len(kvs)):
                add(f"chunk{c}", exact_at(torch.arange(offs[c], offs[c] + lengths[c])))
        for name, r in res.items():
            rows.append(
                {
                    "q": a.start + qi,
                    "config": name,
                    "full_correct": quality.correct(full["text"], ex["answers"]),
                    **{
                        k: v
                        for k, v in r.items()
                        if k in ("kl_first", "kl_answer", "correct", "agree", "answer")
                    },
                }
            )
        json.dump({"rows": rows, "dev": devrows}, open(a.out, "w"))
        print(
            f"[{qi + 1}/{len(cases)}] {time.time() - t0:.0f}s C={C} gold={gold} "
            f"naive {res['naive']['kl_first']:.3f} full {full['text'][:50]!r}",
            flush=True,
        )
    summarize(rows)


def summarize(rows):
    g = defaultdict(list)
    for r in rows:
        g[r["config"]].append(r)
    naive = {r["q"]: r for r in g["naive"]}
    print(
        f"{'config':<24}{'n':>4}{'KL@start':>9}{'gap%':>7}{'KL/tok':>8}{'gap%':>7}{'acc/full':>9}{'agree':>6}"
    )
    for name, rs in g.items():
        n = len(rs)
        kf = sum(r["kl_first"] for r in rs) / n
        ka = sum(r["kl_answer"] for r in rs) / n
        nf = sum(naive[r["q"]]["kl_first"] for r in rs) / n
        na = sum(naive[r["q"]]["kl_answer"] for r in rs) / n
        fc = sum(r["full_correct"] for r in rs)
        acc = sum(r["correct"] and r["full_correct"] for r in rs) / max(fc, 1)
        ag = sum(r["agree"] for r in rs) / n
        print(
            f"{name:<24}{n:>4}{kf:>9.4f}{100 * (1 - kf / nf):>7.1f}{ka:>8.4f}{100 * (1 - ka / na):>7.1f}"
            f"{acc:>9.2f}{ag:>6.2f}"
        )


if __name__ == "__main__":
    main()
