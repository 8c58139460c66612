"""The serving comparison of batched fusion in one process (one model build, one corpus):
``bench serve``'s load (8 clients, closed loop, 16 passages of about 512 tokens a query: 8K, int8,
qfast at 15%, one new token: TTFT load), hits only and with 5% misses, each side for --seconds:

  full            full prefill one request at a time (its best at 8 clients in session 6, both ways)
  fused           engine.fuse, each caller alone (batching off: session 6's engine)
  fused batched   engine.fuse with batching=BatchConfig(max_batch=8): one worker fuses the waiting
                  requests together, their loads streaming in while they wait (preload)
  fused batched lazy   (hits only) the same with preload=False
  fused batched prep   (hits only, --prep-stream) each caller prepares on its staging's own stream
  fused batched, max_wait_ms=--wait-ms   (hits only) the worker holds a batch that is not full

Ratios are against full prefill of the same run (``serve.cross_ratios``). Writes <out>.json/.md.

    python3 bench_results/session7/gpu/batch_serve.py --seconds 8 --out $OUT/batch/serve
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from chunkcache.batch import BatchConfig
from chunkcache.bench import serve
from chunkcache.devicecache import DeviceCache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--misses", default="0,0.05")
    ap.add_argument("--passages", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="serve_batch")
    ap.add_argument(
        "--device-cache", type=float, default=0.0, help="GiB: add 'fused batched + device cache' sides"
    )
    ap.add_argument("--prep-stream", action="store_true", help="add a 'fused batched prep' side (hits)")
    ap.add_argument(
        "--wait-ms", type=float, default=0.0, help="add a batched side with this max_wait_ms (hits)"
    )
    a = ap.parse_args()
    eng = serve._engine(a.model, "int8", tempfile.mkdtemp(prefix="serve-batch-"), a.device)
    results = []
    for miss in [float(x) for x in a.misses.split(",")]:
        w = serve.Workload(passages=a.passages, k=a.k, miss=miss, new_tokens=1)
        settings = [(None, 0), (BatchConfig(max_batch=a.clients), 0)]
        if a.device_cache and eng.fast_path:  # the lead's device cache of hot entries, behind batching
            settings.append((BatchConfig(max_batch=a.clients), a.device_cache))
        elif miss == 0 and eng.fast_path:  # (preload is a fast-path setting)
            settings.append((BatchConfig(max_batch=a.clients, preload=False), 0))
        if a.prep_stream and miss == 0 and eng.fast_path:  # callers prepare on their own streams
            settings.append((BatchConfig(max_batch=a.clients, prep_stream=True), 0))
        if a.wait_ms and miss == 0:  # the worker holds a batch that is not full (session 7: 1s and 7s)
            settings.append((BatchConfig(max_batch=a.clients, max_wait_ms=a.wait_ms), 0))
        for i, (b, gib) in enumerate(settings):
            eng.batching, eng._batcher, eng._pool = b, None, None
            eng.device_cache = DeviceCache(eng.lm.device, int(gib * 2**30)) if gib else None
            print(f"\n== miss {miss}, batching {b}, device cache {gib} GiB", flush=True)
            res = serve.run(
                eng, clients=a.clients, seconds=a.seconds, workload=w, full="sequential" if i == 0 else "none"
            )
            res.update(model=a.model, concurrent_fusions=1, device_cache_gib=gib)
            results.append(res)
            serve.cross_ratios(results)  # (after every side: a timeout keeps what finished)
            Path(a.out + ".json").write_text(json.dumps(results, indent=1))
            Path(a.out + ".md").write_text(serve.table(results) + "\n")
    serve.cross_ratios(results)
    Path(a.out + ".json").write_text(json.dumps(results, indent=1))
    Path(a.out + ".md").write_text(serve.table(results) + "\n")
    print(serve.table(results))
    print("device:", torch.cuda.get_device_name() if a.device == "cuda" else "cpu")


if __name__ == "__main__":
    main()
