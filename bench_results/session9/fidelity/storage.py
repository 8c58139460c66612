"""Storage cost of the two-variant store (session 9, issue 14): entries and bytes of the 19
distinct passages of factual dev cases 0-3, SmolLM2-135M fp32, raw codec, for the prefix sink, a
fixed corpus context sink, the same with exact_first, and each chunk behind its 2 nearest passages.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench_results/session9/fidelity/storage.py
"""

from chunkcache.bench import quality
from chunkcache.engine import ChunkCache

DATA = "chunkcache/bench/data/factual.json"
cases = quality.load_cases(DATA, "dev")[:4]
texts = list(dict.fromkeys(quality.passage_text(c) for ex in cases for c in ex["ctxs"][:6]))
ctx = quality.sink_context(DATA, "heldout:0:0,1")
configs = {
    "prefix": {},
    "ctxc": dict(sink="context", sink_context=ctx),
    "ctxc1": dict(sink="context", sink_context=ctx, exact_first=True),
    "nn2x1": dict(sink="context", sink_context=quality.sink_context(DATA, "nn:2x"), exact_first=True),
}
for name, kw in configs.items():
    e = ChunkCache(model="smollm2-135m", store=None, device="cpu", dtype="float32", **kw)
    e.precompute(texts)
    total = sum(n for _, n in e.store.items())
    tokens = sum(len(e.template.chunk_ids(t)) for t in texts)
    print(f"{name:8} {len(texts)} passages, {tokens} tokens: {len(e.store)} entries, {total} bytes")
