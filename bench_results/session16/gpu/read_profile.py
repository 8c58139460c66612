"""Lead, session 16 (a copy of session 15's, with the session 16 loader's functions; issue 13 req. 5): where the host time of one ``engine.fuse`` on texts goes
before the fusion's compute starts (the "read" stage), from the int8 LMDB store. Wraps the
functions of the read phase with accumulating timers (inclusive times; nested ones overlap), then
a cProfile of a few calls sorted by own time.
    python3 bench_results/session16/gpu/read_profile.py OUTDIR [CONTEXT]
env SHAPE (llama3-8b; kv8b = the 8B's KV geometry with tiny weights, for the CPU), DEV (cuda|cpu)."""

import cProfile
import functools
import importlib
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time

import torch

from chunkcache.bench import ttft as T
from chunkcache.bench.texts import passages, questions

out = sys.argv[1]
n_ctx = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
SHAPE, DEV = os.environ.get("SHAPE", "llama3-8b"), os.environ.get("DEV", "cuda")
T.SHAPES["kv8b"] = dict(vocab_size=49152, hidden_size=256, intermediate_size=256, num_hidden_layers=32,
                        num_attention_heads=8, num_key_value_heads=8, head_dim=128, rope_theta=500000.0)  # fmt: skip
lm = T.build_model(SHAPE, torch.bfloat16 if DEV == "cuda" else torch.float32, DEV)
tok = T._tokenizer()
texts = passages(tok, n_ctx // 512, tokens=512)
question = questions()[0]
eng = T.speed_engine(lm.model, tok, tempfile.mkdtemp(prefix="read-prof-"), "int8", fast_path=True)
eng.precompute(texts, batch_size=4)
sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)

acc: dict[str, list] = {}


def wrap(modname, qual):
    mod = importlib.import_module(modname)
    owner, name = mod, qual
    if "." in qual:
        cls, name = qual.split(".")
        owner = getattr(mod, cls)
    fn = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    is_cm = isinstance(fn, classmethod)
    f = fn.__func__ if is_cm else fn
    key = f"{modname.split('.')[-1]}.{qual}"

    @functools.wraps(f)
    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            acc.setdefault(key, []).append(time.perf_counter() - t)

    setattr(owner, name, classmethod(timed) if is_cm else timed)


for m, q in [
    ("chunkcache.engine", "ChunkCache._check_query"), ("chunkcache.engine", "ChunkCache.resolve"),
    ("chunkcache.engine", "ChunkCache._prompt_keys"), ("chunkcache.engine", "ChunkCache._fuse_stored"),
    ("chunkcache.engine", "ChunkCache._check_entry"), ("chunkcache.engine", "ChunkCache._suffix_ids"),
    ("chunkcache.pipeline", "fuse_entries"), ("chunkcache.pipeline", "LoadPlan.build"),
    ("chunkcache.pipeline", "LayerLoader.start"), ("chunkcache.pipeline", "LayerLoader._stage_direct"),
    ("chunkcache.pipeline", "LayerLoader._batch_copy"), ("chunkcache.pipeline", "LayerLoader._copied"),
    ("chunkcache.pipeline", "LayerLoader.close"), ("chunkcache.pipeline", "LayerLoader.check"),
    ("chunkcache.pipeline", "unpack_parts"), ("chunkcache.pipeline", "verify_small_sections"),
    ("chunkcache.pipeline", "entry_views"), ("chunkcache.fuse", "FuseJob.place"),
    ("chunkcache.pipeline", "run_job"), ("chunkcache.format", "check_identity"),
    ("chunkcache.kernels", "rerotate_scatter_layers"), ("chunkcache.kernels", "checksum_partials"),
    ("chunkcache.kernels", "PackedLayout.series"), ("chunkcache.model", "rotations"),
    ("chunkcache.pipeline", "LoadPlan._tables"), ("chunkcache.pipeline", "LayerLoader._laid_out"),
    ("chunkcache.pipeline", "LayerLoader._copy"), ("chunkcache.kernels", "to_device"),
    ("chunkcache.pipeline", "LayerLoader.__init__"),
]:  # fmt: skip
    try:
        wrap(m, q)
    except (AttributeError, KeyError) as e:
        print("not wrapped:", m, q, repr(e))

for _ in range(4):
    sync()
    eng.fuse(texts, question, recompute_ratio=0.15)
    sync()
acc.clear()
calls, walls = 10, []
for _ in range(calls):
    sync()
    t = time.perf_counter()
    r = eng.fuse(texts, question, recompute_ratio=0.15)
    r.logits.cpu()
    sync()
    walls.append(time.perf_counter() - t)
rows = {k: (len(v) / calls, sum(v) / calls * 1e3) for k, v in acc.items()}
print(f"{SHAPE} {DEV} {n_ctx}: engine.fuse median {statistics.median(walls) * 1e3:.2f} ms;", {
    k: round(v * 1e3, 2) for k, v in r.stats["seconds"].items()})
for k, (n, ms) in sorted(rows.items(), key=lambda x: -x[1][1]):
    print(f"  {k:40s} {n:5.1f} calls/fuse  {ms:8.3f} ms/fuse")
pr = cProfile.Profile()
pr.enable()
for _ in range(3):
    eng.fuse(texts, question, recompute_ratio=0.15).logits.cpu()
pr.disable()
s = io.StringIO()
pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(40)
print(s.getvalue())
json.dump({"walls": walls, "rows": rows, "stats": r.stats["seconds"]}, open(f"{out}/read_profile_{SHAPE}_{n_ctx}.json", "w"))
