"""Oracle: does the stale keys' missing depth signal (their norms do not grow with the chunk's
place as the full prefill's do) explain the attention skew? Each stale chunk's keys are scaled,
per layer and KV head, so their mean norm equals the full prefill's for that chunk (an oracle:
the target norms come from the full prefill); no recompute. Factual cases, SmolLM2-135M fp32, CPU:
    OMP_NUM_THREADS=1 .venv/bin/python bench_results/session8/fidelity/knorm_oracle.py --questions 6
"""

import argparse
import sys
from pathlib import Path

import torch

import chunkcache.fuse as F
from chunkcache.bench import quality
from chunkcache.engine import ChunkCache

sys.path.insert(0, str(Path(__file__).parent))
from diagnose import full_kv, probe_attention, score_cache, summarize  # noqa: E402

torch.set_grad_enabled(False)
ap = argparse.ArgumentParser()
ap.add_argument("--split", default="dev")
ap.add_argument("--questions", type=int, default=6)
a = ap.parse_args()
e = ChunkCache(model="smollm2-135m", store=None, device="cpu")
rows = []
for qi, ex in enumerate(quality.load_cases("chunkcache/bench/data/factual.json", a.split)[: a.questions]):
    texts = [quality.passage_text(c) for c in ex["ctxs"][:6]]
    kvs = e.chunks(texts)
    ids = e.prompt_ids(texts, ex["question"])
    first, fl, forced, plain = quality.full_reference(e, ids, 32, 32)
    full = {
        "first": first,
        "forced_logits": fl,
        "forced": forced,
        "text": e.tokenizer.decode(plain, skip_special_tokens=True).strip(),
    }
    P = e.prefix_kv().shape[3]
    lengths = [c.num_tokens for c in kvs]
    S = P + sum(lengths)
    buf, chunk_of, offs = F.assemble(e.lm, e.prefix_kv(), kvs, ids.shape[1] - S)
    Fkv = full_kv(e, ids)
    fixed = buf.clone()
    for o, n in zip(offs, lengths, strict=True):
        sl = slice(o, o + n)
        want = Fkv[:, 0, :, sl].norm(dim=-1).mean(-1, keepdim=True)  # [L, H, 1]
        have = buf[:, 0, :, sl].norm(dim=-1).mean(-1, keepdim=True)
        fixed[:, 0, :, sl] = buf[:, 0, :, sl] * (want / have)[..., None]
    co = chunk_of[P:S]
    shares = []
    for name, b in (("naive", buf), ("knorm-oracle", fixed)):
        r = score_cache(e, b, S, ids, full, ex["answers"])
        rows.append(
            {"q": qi, "config": name, "full_correct": quality.correct(full["text"], ex["answers"]), **r}
        )
        deep = probe_attention(e, b, ids, P, lengths)[15:].sum(0)
        s = torch.stack([deep[co == c].sum() for c in range(len(kvs))])
        shares.append(f"{name} " + " ".join(f"{x:.2f}" for x in (s / s.sum()).tolist()))
    print(f"[{qi}] gold {ex['gold']}: " + " | ".join(shares), flush=True)
summarize(rows)
