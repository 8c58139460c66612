"""Lead, session 10, last GPU call: the serving load test with 5% misses (8 clients, 16 of 64
passages, one new token, int8, device cache, graph warm-up) on three forms of the miss path, one
model, each form a fresh engine and store, the full-prefill side once: A/B of what call A changed.
  both        misses encoded and packed on a stream of their own, written behind (main)
  no-stream   written behind, encoded on the caller's default stream
  neither     encoded on the default stream and written before the fusion (call 1's code)
    python3 bench_results/session10/gpu/ab_serve.py OUTDIR
"""

import json
import sys
import tempfile
from contextlib import nullcontext

import torch

from chunkcache.bench.serve import Workload, run
from chunkcache.bench.ttft import _tokenizer, build_model, speed_engine
from chunkcache.devicecache import DeviceCache
from chunkcache.engine import ChunkCache

out = sys.argv[1]
lm = build_model("llama3-8b", torch.bfloat16, "cuda")
tok = _tokenizer()
w = Workload(passages=64, k=16, miss=0.05, new_tokens=1)
real_stream, real_behind = ChunkCache._miss_stream, ChunkCache._write_behind
forms = {
    "both": (real_stream, real_behind),
    "no-stream": (lambda self: nullcontext(), real_behind),
    "neither": (lambda self: nullcontext(), lambda self, *a: False),
}
results = []
for i, (name, (stream, behind)) in enumerate(forms.items()):
    ChunkCache._miss_stream, ChunkCache._write_behind = stream, behind
    eng = speed_engine(lm.model, tok, tempfile.mkdtemp(prefix=f"ab-{name}-"), "int8", concurrent_fusions=1)
    eng.device_cache = DeviceCache(eng.lm.device, 24 << 30)
    print(f"\n== {name}", flush=True)
    res = run(eng, clients=8, seconds=8, workload=w, full="sequential" if i == 0 else "none", warmup_s=2)
    res["form"] = name
    results.append(res)
    eng.flush()
    eng.store.close()
    del eng
    torch.cuda.empty_cache()
    with open(f"{out}/ab_serve.json", "w") as f:
        json.dump(results, f, indent=1)
