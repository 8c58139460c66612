"""The adaptive fallback against a plain full prefill on this CPU (issue 16, item 1 of session 8):
SmolLM2-135M fp32, 2 MuSiQue passages of question 0 (1,248 prompt tokens), an int8 engine with
int2 stored beside it, its rates fixed so that the plan falls back (link 1 B/s); both run
interleaved (rotating order) for N rounds after a warm-up; medians, their ratio, the planning
seconds, then a profile of one fallback (the top 12 by own time).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench_results/session8/adaptive/fallback_cpu.py 9
"""
import time, json, cProfile, pstats, torch, statistics, sys
from chunkcache.adaptive import AdaptiveConfig
from chunkcache.engine import ChunkCache
from chunkcache.store import MemoryStore
from chunkcache.bench.quality import DEFAULT_DATA
from pathlib import Path
torch.set_num_threads(1)
ex = json.loads(Path(DEFAULT_DATA).read_text())[0]
texts = [f"{c['title']}\n{c['text']}" for c in ex["ctxs"][:2]]
q = ex["question"]
store = MemoryStore()
plain = ChunkCache(model="smollm2-135m", store=store, codec="int8", device="cpu", dtype="float32")
lm = plain.lm
fb = ChunkCache(model=lm.model, tokenizer=lm.tokenizer, store=store, codec="int8", device="cpu",
                adaptive=AdaptiveConfig(precisions=("int2",), link_bytes_per_s=1.0, recompute_tokens_per_s=400.0))
fb.precompute(texts)
ids = plain.prompt_ids(texts, q)
def full():
    with torch.no_grad():
        return plain.model(input_ids=plain.prompt_ids(texts, q), use_cache=True, logits_to_keep=1).logits[0,-1].float()
def fall():
    return fb.fuse(texts, q).logits
for f in (full, fall): f()
ts = {"full": [], "fall": []}
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
    for name, f in (("full", full), ("fall", fall)) if r % 2 == 0 else (("fall", fall), ("full", full)):
        t = time.perf_counter(); f(); ts[name].append(time.perf_counter() - t)
m = {k: statistics.median(v) for k, v in ts.items()}
print({k: f"{v*1e3:.1f} ms" for k, v in m.items()}, "ratio", m["fall"] / m["full"], "tokens", ids.shape[1])
r = fb.fuse(texts, q)
print(r.stats["adaptive"]["seconds"])
pr = cProfile.Profile(); pr.enable(); fall(); pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(12)
