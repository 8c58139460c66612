"""Oracle check (issue 14, session 7): add each chunk's true mean K/V deviation (full prefill minus
reused, per layer, head and dim) to its reused K/V, no recompute, and score KL at the answer start and
per token (32 teacher-forced tokens) on the first 4 factual dev cases. CPU, SmolLM2-135M fp32:
    OMP_NUM_THREADS=1 .venv/bin/python bench_results/session7/fidelity/oracle_drift.py
Output (start/per token): oracle_drift.txt."""

import torch
from transformers import DynamicCache

from chunkcache.bench import quality
from chunkcache.engine import ChunkCache
from chunkcache.fuse import assemble, kv_to_cache
from chunkcache.model import cache_kwarg

torch.set_grad_enabled(False)
e = ChunkCache(model="smollm2-135m", store=None, device="cpu")
cases = quality.load_cases("chunkcache/bench/data/factual.json", "dev")[:4]


def run_suffix(kvctx, ids, S, answer):
    cache = kv_to_cache(kvctx[:, :, :, :S])
    x = torch.cat([ids[0, S:], answer[:-1]])[None]
    out = e.model(input_ids=x, use_cache=True, **{cache_kwarg(e.model): cache})
    nq = ids.shape[1] - S
    return out.logits[0, nq - 1 :].float()  # [len(answer), V]


for ex in cases:
    texts = [f"{c['title']}\n{c['text']}" for c in ex["ctxs"][:6]]
    keys = e.precompute(texts)
    ids = e.prompt_ids(texts, ex["question"])
    first, forced_logits, forced, plain = quality.full_reference(e, ids, 32, 32)
    cache = DynamicCache()
    e.model(input_ids=ids, use_cache=True, **{cache_kwarg(e.model): cache})
    full = torch.stack([torch.stack([lay.keys[0], lay.values[0]]) for lay in cache.layers])
    kvs = [e._load(k) for k in keys]
    P = e.prefix_kv().shape[3]
    C = sum(c.num_tokens for c in kvs)
    S = P + C
    buf, chunk_of, offs = assemble(e.lm, e.prefix_kv(), kvs, ids.shape[1] - S)
    dev = full[:, :, :, P:S] - buf[:, :, :, P:S]
    co = chunk_of[P:S]
    out = {}
    for name, which in [("naive", ()), ("K", (0,)), ("V", (1,)), ("KV", (0, 1))]:
        b = buf.clone()
        for w in which:
            for c in range(len(kvs)):
                m = (co == c).nonzero()[:, 0] + P
                b[:, w][:, :, m] += dev[:, w][:, :, (co == c)].mean(2, keepdim=True)
        lg = run_suffix(b, ids, S, forced)
        k = quality.kl(forced_logits, lg)
        out[name] = (float(k[0]), float(k.mean()))
    print(ex["id"], {n: f"{a:.3f}/{b:.3f}" for n, (a, b) in out.items()}, flush=True)
