"""Lead, session 14: host time of fuse_entries's read phase (before the fusion runs) on CPU,
SmolLM2, 16 chunks of ~512 tokens from the store, int8. cProfile of engine.fuse with run_job
replaced by a no-op so only the host-side preparation is profiled."""
import cProfile
import io
import json
import pstats
import tempfile
import time

from chunkcache import pipeline
from chunkcache.engine import ChunkCache

data = json.load(open("/work/shared/data/musique_dev.json"))
texts = []
for ex in data:
    for c in ex["ctxs"]:
        texts.append(f"{c['title']}\n{c['text']}")
eng = ChunkCache(model="smollm2-135m", store=tempfile.mkdtemp(), device="cpu", codec="int8")
tok = eng.tokenizer
# ~512-token chunks: join passages
chunks, cur = [], ""
for t in texts:
    cur += t + "\n"
    if len(tok(cur)["input_ids"]) > 480:
        chunks.append(cur)
        cur = ""
    if len(chunks) == 13:
        break
eng.precompute(chunks)
q = data[0]["question"]
for _ in range(2):
    eng.fuse(chunks, q)
res = eng.fuse(chunks, q)
print({k: round(v * 1e3, 2) for k, v in res.stats["seconds"].items()}, res.stats.get("fast_path"))

class Stop(Exception):
    pass
t_stop = []
def fake(lm, job):
    t_stop.append(time.perf_counter())
    raise Stop
orig = pipeline.run_job
pipeline.run_job = fake
times = []
for _ in range(20):
    t = time.perf_counter()
    try:
        cfg, keys, ids, suffix = eng._check_query(chunks, q, None, None)
        t1 = time.perf_counter()
        eng._fuse_stored(*eng._prompt_keys(keys, ids)[:1], ids, suffix, cfg, t1, None)
    except Stop:
        times.append((t1 - t, t_stop[-1] - t1))
print("check_query ms, stored-until-run ms:", [round(sum(x[i] for x in times) / len(times) * 1e3, 2) for i in range(2)])
pr = cProfile.Profile()
pr.enable()
for _ in range(20):
    try:
        cfg, keys, ids, suffix = eng._check_query(chunks, q, None, None)
        eng._fuse_stored(*eng._prompt_keys(keys, ids)[:1], ids, suffix, cfg, time.perf_counter(), None)
    except Stop:
        pass
pr.disable()
s = io.StringIO()
pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(45)
print(s.getvalue())
