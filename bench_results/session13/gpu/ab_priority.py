"""Lead, session 13 (issue 13): the serving load test with 5% misses (8 clients, 16 of 64
passages, one new token, int8, device cache, graph warm-up), the miss stream at the default
priority (main) and at high priority (its encode kernels scheduled ahead of the fusions'), each a
fresh engine and store on one model, 10 s measured after 6 s of load; full prefill once.
    python3 bench_results/session13/gpu/ab_priority.py OUTDIR
"""

import json
import sys
import tempfile

import torch

from chunkcache.bench.serve import Workload, run
from chunkcache.bench.ttft import _tokenizer, build_model, speed_engine
from chunkcache.devicecache import DeviceCache
from chunkcache.engine import ChunkCache

out = sys.argv[1]
lm = build_model("llama3-8b", torch.bfloat16, "cuda")
tok = _tokenizer()
w = Workload(passages=64, k=16, miss=0.05, new_tokens=1)
results = []
for i, (name, prio) in enumerate((("default priority", 0), ("high priority", -1))):
    ChunkCache._miss_stream_priority = prio
    eng = speed_engine(lm.model, tok, tempfile.mkdtemp(prefix=f"ab-{prio}-"), "int8", concurrent_fusions=1)
    eng.device_cache = DeviceCache(eng.lm.device, 24 << 30)
    print(f"\n== {name}", flush=True)
    res = run(eng, clients=8, seconds=10, workload=w, full="sequential" if i == 0 else "none", warmup_s=6,
              stream_base=100_000 * i)
    res["form"] = name
    results.append(res)
    eng.flush()
    eng.store.close()
    del eng
    torch.cuda.empty_cache()
    with open(f"{out}/ab_priority.json", "w") as f:
        json.dump(results, f, indent=1)
