"""Where the question's attention goes, per chunk: its probe mass (summed over layers, share of
all chunk mass; layers 15-29) over the full prefill's own K/V, the stale prefix-sink cache, every
chunk behind the generic context sink (the first too), and behind its predecessor (``prev``). Factual cases, SmolLM2-135M fp32, CPU:
    OMP_NUM_THREADS=1 .venv/bin/python bench_results/session8/fidelity/chunk_mass.py --split dev --questions 8
"""

import argparse
import sys
from pathlib import Path

import torch

import chunkcache.fuse as F
from chunkcache.bench import quality
from chunkcache.engine import ChunkCache
from chunkcache.precompute import encode_chunks
from chunkcache.template import CONTEXT_SINK_PASSAGES

sys.path.insert(0, str(Path(__file__).parent))
from diagnose import full_kv, probe_attention  # noqa: E402

torch.set_grad_enabled(False)
ap = argparse.ArgumentParser()
ap.add_argument("--split", default="dev")
ap.add_argument("--questions", type=int, default=8)
a = ap.parse_args()
e = ChunkCache(model="smollm2-135m", store=None, device="cpu")
tot: dict = {}
for ex in quality.load_cases("chunkcache/bench/data/factual.json", a.split)[: a.questions]:
    texts = [quality.passage_text(c) for c in ex["ctxs"][:6]]
    kvs = e.chunks(texts)
    ids = e.prompt_ids(texts, ex["question"])
    P = e.prefix_kv().shape[3]
    lengths = [c.num_tokens for c in kvs]
    S = P + sum(lengths)
    buf, chunk_of, offs = F.assemble(e.lm, e.prefix_kv(), kvs, ids.shape[1] - S)
    Fkv = full_kv(e, ids)
    co = chunk_of[P:S]
    pre = list(e._prefix_ids)
    cids = [c.token_ids.tolist() for c in kvs]
    gen = pre + [t for x in CONTEXT_SINK_PASSAGES for t in e.template.chunk_ids(x)]
    ctx_kvs = [encode_chunks(e.lm, [c], gen)[0] for c in cids]  # every chunk, the first too
    prev_kvs = [kvs[0]] + [encode_chunks(e.lm, [cids[i]], pre + cids[i - 1])[0] for i in range(1, len(cids))]
    ctx_buf = F.assemble(e.lm, e.prefix_kv(), ctx_kvs, ids.shape[1] - S)[0]
    prev_buf = F.assemble(e.lm, e.prefix_kv(), prev_kvs, ids.shape[1] - S)[0]
    out = []
    for name, b in (("full", Fkv), ("stale", buf), ("ctx", ctx_buf), ("prev", prev_buf)):
        at = probe_attention(e, b, ids, P, lengths)  # [L, C]
        deep = at[15:].sum(0)
        share = torch.stack([deep[co == c].sum() for c in range(len(kvs))])
        total = float(deep.sum())
        out.append((name, total, (share / share.sum()).tolist()))
        tot.setdefault(name, []).append(float((share / share.sum())[0]))
        tot.setdefault(name + "_last", []).append(float((share / share.sum())[-1]))
    g = ex["gold"]
    print(
        f"gold {g}: "
        + " | ".join(f"{n} mass {t:.2f} share " + " ".join(f"{x:.2f}" for x in s) for n, t, s in out),
        flush=True,
    )
print(
    "mean share of the first / last chunk: "
    + ", ".join(
        f"{n} {sum(tot[n]) / len(tot[n]):.2f} / {sum(tot[n + '_last']) / len(tot[n + '_last']):.2f}"
        for n in ("full", "stale", "ctx", "prev")
    )
)
