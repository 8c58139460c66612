"""Quickstart: the main job on the embedded defaults (LMDB store + SmolLM2-135M, CPU).

1. Precomputes the chunk caches of a few MuSiQue questions' passages into ./chunkcache.lmdb
   (a second run finds them there and skips the work).
2. For each question, answers it twice from the same prompt: full prefill, and fused from the
   stored caches at 15% recompute; prints both answers, the time to first token (TTFT) of each,
   and the KL divergence of the fused next-token distribution from the full prefill's.

    .venv/bin/python demos/quickstart.py [--questions 3] [--store chunkcache.lmdb] [--ratio 0.15]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from chunkcache import gate
from chunkcache.engine import ChunkCache

DATA = Path(__file__).resolve().parent / "data" / "musique_dev.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=3)
    p.add_argument("--passages", type=int, default=5)
    p.add_argument("--store", default="chunkcache.lmdb")
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--data", default=str(DATA))
    args = p.parse_args()

    torch.manual_seed(0)
    t = time.perf_counter()
    engine = ChunkCache(model="smollm2-135m", store=args.store)
    print(f"loaded {engine.lm.name} in {time.perf_counter() - t:.1f}s; store at {args.store}")
    data = json.loads(Path(args.data).read_text())[: args.questions]
    all_texts = [f"{c['title']}\n{c['text']}" for ex in data for c in ex["ctxs"][: args.passages]]
    t = time.perf_counter()
    engine.precompute(all_texts, progress=True)
    print(
        f"precompute: {len(all_texts)} chunks ready in {time.perf_counter() - t:.1f}s (stored ones are skipped)"
    )
    engine.prefix_kv()  # the template prefix is computed once per engine
    check = gate.ensure(engine)  # once per model and store (recorded); the first fuse would run it
    print(f"correctness gate: ok (logits within {check.logits_diff:.1e} of a full prefill, {check.seconds:.1f}s "
          "when it ran)")  # fmt: skip

    for ex in data:
        texts = [f"{c['title']}\n{c['text']}" for c in ex["ctxs"][: args.passages]]
        ids = engine.prompt_ids(texts, ex["question"])
        with torch.no_grad():
            t = time.perf_counter()
            # The baseline computes only the last position's logits, as fusion does (logits_to_keep=1).
            full_logits = engine.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
            ttft_full = time.perf_counter() - t
        t = time.perf_counter()
        fused = engine.fuse(texts, ex["question"], recompute_ratio=args.ratio)
        ttft_fused = time.perf_counter() - t
        ref = full_logits.log_softmax(-1)
        kl = float((ref.exp() * (ref - fused.logits.log_softmax(-1))).sum())
        with torch.no_grad():
            out = engine.model.generate(input_ids=ids, max_new_tokens=24, do_sample=False)
        full_answer = engine.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        fused_answer = engine.generate_from(fused, max_new_tokens=24)
        print(f"\nQ: {ex['question']}\n   gold: {ex['answers'][0]}")
        print(f"   full prefill  ({ids.shape[1]} tokens) TTFT {ttft_full:6.2f}s: {full_answer}")
        print(
            f"   fused @ {args.ratio:.0%}  TTFT {ttft_fused:6.2f}s ({ttft_full / ttft_fused:.1f}x): {fused_answer}"
            f"   [KL {kl:.4f}]"
        )
    print("\nstore:", engine.store.stats())


if __name__ == "__main__":
    main()
