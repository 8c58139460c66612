"""Session 8, lead: where the time of fused serving goes on the H200 (8B shape, int8, 8K, qfast 15%,
device cache). One engine, one corpus; prints JSON lines and a profiler summary.

  1. one request at a time: TTFT and the fusion's stage seconds, 10 reps
  2. back to back from one thread (30 requests): the serial ceiling in q/s
  3. 8 client threads, closed loop, 6 s each: concurrent_fusions 1 and 2, switch interval 5 ms
     and 0.5 ms, batching off / packed / each
  4. torch.profiler over 8 threads (2 s): GPU busy share (union of kernel intervals over wall),
     top kernels and top CPU ops

    python3 bench_results/session8/gpu/profile_serve.py --out $OUT/profile
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

from chunkcache.batch import BatchConfig
from chunkcache.bench import serve
from chunkcache.bench.texts import passages, questions
from chunkcache.devicecache import DeviceCache


def emit(f, **row):
    line = json.dumps(row)
    print(line, flush=True)
    f.write(line + "\n")
    f.flush()


def busy_share(prof) -> tuple[float, float]:
    iv = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0:
            iv.append((e.time_range.start, e.time_range.end))
    if not iv:
        return 0.0, 0.0
    iv.sort()
    busy, cs, ce = 0, iv[0][0], iv[0][1]
    for s, e in iv[1:]:
        if s > ce:
            busy += ce - cs
            cs, ce = s, e
        else:
            ce = max(ce, e)
    busy += ce - cs
    span = max(e for _, e in iv) - min(s for s, _ in iv)
    return busy / 1e6, span / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/profile")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    f = open(a.out + ".jsonl", "w")
    eng = serve._engine(a.model, "int8", tempfile.mkdtemp(prefix="prof-"), a.device)
    if a.device == "cuda":
        eng.device_cache = DeviceCache(eng.lm.device, 24 * 2**30)
    w = serve.Workload(passages=64, k=16, miss=0.0, new_tokens=1)
    texts = passages(eng.tokenizer, w.passages + 64)
    corpus, fresh = texts[: w.passages], texts[w.passages :]
    qs = questions()
    eng.precompute(corpus, batch_size=4)

    def streams(n):
        return [serve._queries(w, corpus, fresh, qs, seed=c) for c in range(n)]

    one = streams(1)[0]
    for _ in range(40):  # warm: graphs, and every corpus entry admitted to the device cache
        serve.fused_request(eng, *next(one), w)
    serve._sync()
    ttft, stages = [], []
    for _ in range(10):
        t, q = next(one)
        t0 = time.perf_counter()
        res = eng.fuse(t, q)
        res.logits.cpu()
        ttft.append(time.perf_counter() - t0)
        stages.append({k: round(v * 1e3, 2) for k, v in res.stats["seconds"].items()})
    emit(f, step="single", ttft_ms=[round(x * 1e3, 1) for x in ttft], stages=stages,
         device_cache=res.stats.get("device_cache"))
    t0 = time.perf_counter()
    for _ in range(30):
        serve.fused_request(eng, *next(one), w)
    emit(f, step="serial_30", qps=30 / (time.perf_counter() - t0))
    t0 = time.perf_counter()
    for _ in range(8):
        full = serve.full_request(eng, *next(one), w)
    emit(f, step="full_serial_8", qps=8 / (time.perf_counter() - t0), last_ttft_ms=full[0] * 1e3)

    def load(label, fusions=1, switch=0.005, batching=None):
        sys.setswitchinterval(switch)
        eng.concurrent_fusions, eng._pool = fusions, None
        eng.batching, eng._batcher = batching, None
        for _ in range(3):
            serve.fused_request(eng, *next(one), w)
        ttfts, _, wall = serve._threads(lambda t, q: serve.fused_request(eng, t, q, w), streams(8), a.seconds)
        ttfts.sort()
        emit(f, step="load8", label=label, qps=len(ttfts) / wall, p50_ms=ttfts[len(ttfts) // 2] * 1e3,
             p99_ms=ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] * 1e3, n=len(ttfts))

    load("alone f1 sw5ms")
    load("alone f2 sw5ms", fusions=2)
    load("alone f1 sw0.5ms", switch=0.0005)
    load("alone f2 sw0.5ms", fusions=2, switch=0.0005)
    if not a.skip_batch:
        load("packed sw5ms", batching=BatchConfig(max_batch=8))
        load("each sw5ms", batching=BatchConfig(max_batch=8, recompute="each"))
        load("each sw0.5ms", switch=0.0005, batching=BatchConfig(max_batch=8, recompute="each"))
    sys.setswitchinterval(0.005)
    eng.concurrent_fusions, eng._pool, eng.batching, eng._batcher = 1, None, None, None
    from torch.profiler import ProfilerActivity, profile

    for label, nthreads in (("single", 1), ("load8", 8)):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            ttfts, _, wall = serve._threads(lambda t, q: serve.fused_request(eng, t, q, w), streams(nthreads), 2.0)
            serve._sync()
        busy, span = busy_share(prof)
        emit(f, step="profile", label=label, wall_s=wall, n=len(ttfts), gpu_busy_s=busy, gpu_span_s=span,
             busy_share=busy / wall)
        ka = prof.key_averages()
        print(ka.table(sort_by="self_cuda_time_total", row_limit=25), flush=True)
        print(ka.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
        if label == "single":
            prof.export_chrome_trace(a.out + "_single_trace.json")
    f.close()


if __name__ == "__main__":
    main()
