"""Lead, session 11 (issue 13): what bounds the serving load test with misses, profiled.

H200, Llama-3-8B shape (random bf16 weights), int8, device cache, qfast 15%, 16 of 64 passages a
query (8K tokens), one new token. In one process, one model:
  1. alone (one caller, CUDA synchronised, medians): a full prefill of the prompt; a fused call
     whose chunks are all stored; a fused call with one chunk never seen (its stats["misses"]);
     the miss's parts apart: encode_chunks of one chunk, then the engine's _pack of it.
  2. under load (8 closed-loop clients, 8 s after 2 s of warm load), hits only and 5% misses:
     queries/s and TTFT as `bench serve` reports, and the GPU's busy share over a 2.5 s window in
     the middle of the measured seconds (torch.profiler's CUDA kernel and copy time, merged
     intervals, over the window's wall time), its top kernels, and nvidia-smi's utilisation;
     with misses, both forms of the write-behind: parts admitted from the device (main) and
     session 10's entry packed on the caller's thread (``ChunkCache._pack_on_device = False``);
     the full-prefill side, one request at a time, once, under the same load.
    python3 bench_results/session11/gpu/miss_profile.py OUTDIR [--shape tiny --device cpu]
"""

import argparse
import json
import statistics
import subprocess
import tempfile
import threading
import time

import torch

from chunkcache.bench.serve import Workload, full_request, fused_request, run
from chunkcache.bench.texts import passages, questions
from chunkcache.bench.ttft import _tokenizer, build_model, speed_engine
from chunkcache.devicecache import DeviceCache
from chunkcache.engine import _id_lists
from chunkcache.precompute import encode_chunks

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--shape", default="llama3-8b")
ap.add_argument("--device", default="cuda")
ap.add_argument("--seconds", type=float, default=8.0)
ap.add_argument("--reps", type=int, default=5)
args = ap.parse_args()
cuda = args.device == "cuda"
report: dict = {"shape": args.shape}


def sync():
    if cuda:
        torch.cuda.synchronize()


def timed(fn, reps=args.reps):
    out = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3, [round(x * 1e3, 1) for x in out]


lm = build_model(args.shape, torch.bfloat16 if cuda else torch.float32, args.device)
tok = _tokenizer()
eng = speed_engine(lm.model, tok, tempfile.mkdtemp(prefix="missprof-"), "int8", concurrent_fusions=1)
if cuda:
    eng.device_cache = DeviceCache(eng.lm.device, 24 << 30)
w = Workload(passages=64, k=16, miss=0.05, new_tokens=1)
texts = passages(tok, w.passages + 64)
corpus, fresh = texts[:64], texts[64:]
q = questions()[0]
eng.precompute(corpus, batch_size=4)
prompt = corpus[:16]
for _ in range(2):  # warm: graphs of this shape, device cache filled
    fused_request(eng, prompt, q, w)
    full_request(eng, prompt, q, w)

alone = {}
alone["full_prefill_ms"] = timed(lambda: full_request(eng, prompt, q, w))
alone["fused_hits_ms"] = timed(lambda: fused_request(eng, prompt, q, w))
n = [0]
stats = []


def one_miss():
    n[0] += 1
    texts_ = list(prompt)
    texts_[7] = f"[alone miss {n[0]}] {fresh[n[0] % len(fresh)]}"
    fused_request(eng, texts_, q, w, stats)


one_miss()  # its first time (the miss stream, the write-behind thread)
alone["fused_one_miss_ms"] = timed(one_miss)
alone["one_miss_stats"] = stats[-args.reps:]
eng.flush()
ids = [eng.resolve([f"[parts {i}] {fresh[i]}"])[1][0] for i in range(args.reps + 1)]
ids = [list(x) for x in _id_lists(ids)]
sink = list(eng.variants()[0].sink_ids)
chunks = []
alone["encode_one_chunk_ms"] = timed(lambda: chunks.append(encode_chunks(eng.lm, [ids[len(chunks) % len(ids)]], sink)[0]))
alone["pack_one_chunk_ms"] = timed(lambda: eng._pack(chunks[0]))
alone["chunk_tokens"] = len(ids[0])
report["alone"] = alone
print(json.dumps(alone, indent=1), flush=True)


def gpu_window(seconds: float, into: dict) -> None:
    """The GPU's busy share over ``seconds`` of whatever runs meanwhile."""
    acts = [torch.profiler.ProfilerActivity.CUDA] if cuda else [torch.profiler.ProfilerActivity.CPU]
    util = []
    stop = threading.Event()

    def smi():
        while not stop.is_set() and cuda:
            try:
                r = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                   capture_output=True, text=True, timeout=2)
                util.append(float(r.stdout.strip().splitlines()[0]))
            except Exception:
                pass
            time.sleep(0.1)

    th = threading.Thread(target=smi, daemon=True)
    th.start()
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        time.sleep(seconds)
        wall = time.perf_counter() - t0
    stop.set()
    spans, by_name = [], {}
    for e in prof.events():
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        start, dur = e.time_range.start, e.time_range.elapsed_us()
        spans.append((start, start + dur))
        by_name[e.name] = by_name.get(e.name, 0.0) + dur
    spans.sort()
    busy, end = 0.0, None
    for s, e in spans:
        if end is None or s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    into["window_s"] = wall
    into["gpu_busy_share"] = busy / 1e6 / wall
    into["kernel_time_share"] = sum(by_name.values()) / 1e6 / wall
    into["top_kernels_ms"] = {k[:90]: round(v / 1e3, 1) for k, v in sorted(by_name.items(), key=lambda x: -x[1])[:25]}
    into["nvidia_smi_util"] = util


from chunkcache.engine import ChunkCache

# Session 13: the 5% misses against full prefill first (the load), then hits only, then the
# A/B; graph_warmup on (session 12's call recorded graphs of new prompt sizes inside the measured
# seconds: p99 6.9 s, hits only 6.1 q/s against session 10's 16.9).
for miss, on_device, full in ((0.05, True, "sequential"), (0.0, True, "none"), (0.05, False, "none")):
    ChunkCache._pack_on_device = on_device  # (False: session 10's form, packed on the caller's thread)
    prof: dict = {}
    t = threading.Timer(2.0 + args.seconds / 2 - 1.25, gpu_window, args=(2.5, prof))  # (after the 2 s warm load)
    t.start()
    print(f"\n== miss {miss}, parts from the device {on_device}", flush=True)
    res = run(eng, clients=8, seconds=args.seconds, workload=Workload(passages=64, k=16, miss=miss, new_tokens=1),
              full=full, warmup_s=2.0, warmup=1, graph_warmup=True)
    t.join()
    res["gpu"] = prof
    report[f"load_miss{miss}_dev{int(on_device)}"] = res
    print(f"miss {miss}: busy {prof.get('gpu_busy_share', float('nan')):.3f} kernels "
          f"{prof.get('kernel_time_share', float('nan')):.3f} smi {statistics.mean(prof['nvidia_smi_util']) if prof.get('nvidia_smi_util') else 'n/a'}",
          flush=True)
    print(json.dumps(prof.get("top_kernels_ms", {}), indent=1), flush=True)
    with open(f"{args.out}/miss_profile.json", "w") as f:
        json.dump(report, f, indent=1, default=str)
eng.flush()
