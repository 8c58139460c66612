"""Quality of the in-place mixed fusion (issue 16): SmolLM2-135M on CPU, MuSiQue questions, 5
passages, int8, qfast 15% of the fetched chunks: KL of the next-token distribution against a full
prefill's when the first k passages are recomputed in place (``AdaptiveConfig(recompute_chunks=k)``)
and the rest fetched and fused, k = 0 (plain fusion) .. 5 (everything recomputed), with the
compute fraction (every token-layer counted) beside it. A few questions only (CPU).

    python bench_results/session7/adaptive/split_quality.py --questions 0,1,2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from chunkcache.adaptive import AdaptiveConfig
from chunkcache.bench.quality import DEFAULT_DATA
from chunkcache.engine import ChunkCache
from chunkcache.store import MemoryStore


def kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    p, q = ref.float().log_softmax(-1), got.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", default="0,1,2")
    ap.add_argument("--passages", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).with_name("split_quality.json")))
    args = ap.parse_args()
    data = json.loads(Path(DEFAULT_DATA).read_text())
    store = MemoryStore()
    base = ChunkCache(model="smollm2-135m", store=store, codec="int8", device="cpu")
    lm = base.lm
    engines = {
        k: ChunkCache(
            model=lm.model,
            tokenizer=lm.tokenizer,
            store=store,
            codec="int8",
            device="cpu",
            adaptive=AdaptiveConfig(recompute_chunks=k),
        )  # fmt: skip
        for k in range(args.passages + 1)
    }
    rows = []
    for qi in (int(x) for x in args.questions.split(",")):
        ex = data[qi]
        texts = [f"{c['title']}\n{c['text']}" for c in ex["ctxs"][: args.passages]]
        base.precompute(texts)
        ids = base.prompt_ids(texts, ex["question"])
        with torch.no_grad():
            ref = lm.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
        naive = base.fuse(texts, ex["question"], recompute_ratio=0.0)
        row = {
            "question": qi,
            "prompt_tokens": int(ids.shape[1]),
            "naive_kl": kl(ref, naive.logits),
            "splits": [],
        }
        for k, eng in engines.items():
            res = eng.fuse(texts, ex["question"], recompute_ratio=0.15)
            row["splits"].append(
                {"k": k, "kl": kl(ref, res.logits), "compute_fraction": res.stats["compute_fraction"]}
            )
        rows.append(row)
        print(f"q{qi} ({row['prompt_tokens']} tokens) naive KL {row['naive_kl']:.4f} | "
              + " | ".join(f"k={s['k']}: KL {s['kl']:.4f} @ {s['compute_fraction']:.2f}" for s in row["splits"]),
              flush=True)  # fmt: skip
    n = len(rows)
    mean = [sum(r["splits"][k]["kl"] for r in rows) / n for k in range(args.passages + 1)]
    frac = [sum(r["splits"][k]["compute_fraction"] for r in rows) / n for k in range(args.passages + 1)]
    print("mean over questions: naive KL %.4f | " % (sum(r["naive_kl"] for r in rows) / n)
          + " | ".join(f"k={k}: KL {m:.4f} @ {f:.2f}" for k, (m, f) in enumerate(zip(mean, frac, strict=True))))  # fmt: skip
    Path(args.out).write_text(
        json.dumps({"rows": rows, "mean_kl": mean, "mean_compute_fraction": frac}, indent=1)
    )


if __name__ == "__main__":
    main()
