"""Lead, session 13 (issue 16 groundwork): how adaptive loading's recompute budget should be
counted when the first k chunks are recomputed in place (exact). CPU, SmolLM2-135M fp32, MuSiQue
questions (title + text passages), qfast. KL of the first answer token's distribution against a
full prefill, and the share of naive reuse's KL closed (pooled over the questions):
  plain      no front, ratio r over every chunk token (what a user asks for)
  all        front k exact, r x (all chunk tokens) spent on the fetched ones (main's rule)
  fetched    front k exact, r x (fetched tokens) spent on them (fewer rows: a shorter tail)
    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench_results/session13/frontbudget/front_budget.py \
        --start 40 --questions 20 --passages 6 --front 2 --ratio 0.15
"""

import argparse
import dataclasses
import json
import tempfile

import torch

from chunkcache.adaptive import AdaptiveConfig
from chunkcache.engine import ChunkCache

ap = argparse.ArgumentParser()
ap.add_argument("--data", default="/work/shared/data/musique_dev.json")
ap.add_argument("--start", type=int, default=40)
ap.add_argument("--questions", type=int, default=20)
ap.add_argument("--passages", type=int, default=6)
ap.add_argument("--front", type=int, default=2)
ap.add_argument("--ratio", type=float, default=0.15)
ap.add_argument("--out", default=None)
args = ap.parse_args()


def kl(ref, got):
    p, q = ref.float().log_softmax(-1), got.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


data = json.load(open(args.data))[args.start : args.start + args.questions]
cfg = AdaptiveConfig(recompute_chunks=args.front, fallback=False)
eng = ChunkCache(model="smollm2-135m", store=tempfile.mkdtemp(prefix="frontbudget-"), dtype=torch.float32,
                 device="cpu", codec="int8", adaptive=cfg)  # fmt: skip
rows = []
for qi, ex in enumerate(data):
    texts = [f"{c['title']}\n{c['text']}" for c in ex["ctxs"][: args.passages]]
    q = ex["question"]
    eng.precompute(texts)
    eng.adaptive = dataclasses.replace(cfg, enabled=False)
    full = eng.fuse(texts, q, recompute_ratio=1.0).logits
    naive = eng.fuse(texts, q, recompute_ratio=0.0).logits
    plain = eng.fuse(texts, q, recompute_ratio=args.ratio)
    eng.adaptive = cfg
    lens = [len(x) for x in eng.resolve(texts)[1]]
    allr = eng.fuse(texts, q, recompute_ratio=args.ratio)
    n_ctx = sum(len(t) for t in eng.resolve(texts)[1])
    n_back = sum(len(t) for t in eng.resolve(texts)[1][args.front :])
    fetched = eng.fuse(texts, q, recompute_ratio=args.ratio * n_back / n_ctx)
    row = {"q": args.start + qi, "naive": kl(full, naive)}
    for name, r in (("plain", plain), ("all", allr), ("fetched", fetched)):
        row[name] = kl(full, r.logits)
        row[name + "_recomputed"] = int(r.stats["recomputed_tokens"])
        row[name + "_compute"] = float(r.stats.get("compute_fraction", float("nan")))
    row["n_ctx"], row["n_back"] = n_ctx, n_back
    rows.append(row)
    print(json.dumps(row), flush=True)

summary = {"args": vars(args), "questions": len(rows)}
naive = sum(r["naive"] for r in rows)
for name in ("plain", "all", "fetched"):
    tot = sum(r[name] for r in rows)
    summary[name] = {
        "mean_kl": tot / len(rows),
        "gap_closed_pooled": 1 - tot / naive,
        "mean_recomputed_rows": sum(r[name + "_recomputed"] for r in rows) / len(rows),
        "mean_compute": sum(r[name + "_compute"] for r in rows) / len(rows),
        "better_than_plain": sum(r[name] < r["plain"] for r in rows),
    }
print(json.dumps(summary, indent=1))
if args.out:
    json.dump({"summary": summary, "rows": rows}, open(args.out, "w"), indent=1)
