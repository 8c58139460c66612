"""Batched fusion against one request at a time, the fusion alone (no serving, no decoding):
J requests of 16 passages (about 8K tokens) with the 8B shape (bf16, random weights), int8
store, qfast at 15%. For J = 1, 2, 4, 8 (distinct chunk sets and questions):

  alone    each request through ``fuse.run_job`` in turn (eager layers: no graphs)
  graphs   each through the engine's fast path alone (``engine.fuse``: loader + CUDA graphs)
  batched  all J through ``batch.fuse_many`` at once (eager, packed)
  engine   J threads calling ``engine.fuse`` on an engine with batching (loads in the callers)

and, for the batched pass, the probe and recompute stage times (GPU-timeline spans). Median of
3 after a warm-up. Prints one JSON line per J and writes them to --out.

    python3 bench_results/session7/gpu/batch_micro.py --out $OUT/batch_micro.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from chunkcache import fuse as F
from chunkcache.batch import BatchConfig, fuse_many
from chunkcache.bench.texts import passages, questions
from chunkcache.bench.ttft import _tokenizer, build_model, speed_engine


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps=3):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def measure(eng, reqs: list, cfg) -> dict:
    """One row: the J = len(reqs) requests each way."""
    J, prefix = len(reqs), eng.prefix_kv()
    chunks = [eng.chunks(c) for c, _ in reqs]
    suffixes = [eng._suffix_ids(q) for _, q in reqs]

    def jobs():
        return [
            F.assembled_job(eng.lm, prefix, c, eng._prefix_ids, s, cfg)
            for c, s in zip(chunks, suffixes, strict=True)
        ]

    def once(run):
        js = jobs()  # (a fusion writes into its buffer: a fresh assembly per run, not timed)
        sync()
        t = time.perf_counter()
        out = run(js)
        sync()
        return time.perf_counter() - t, out

    t_alone = statistics.median(
        [once(lambda js: [F.run_job(eng.lm, j) for j in js])[0] for _ in range(4)][1:]
    )
    runs = [once(lambda js: fuse_many(eng.lm, js)) for _ in range(4)][1:]
    t_batched = statistics.median(r[0] for r in runs)
    res = runs[-1][1]
    eng.batching, eng._batcher = None, None
    t_graphs, _ = timed(lambda: [eng.fuse(c, q) for c, q in reqs])
    eng.batching, eng._batcher, eng._pool = BatchConfig(max_batch=J, max_wait_ms=20), None, None
    with ThreadPoolExecutor(J) as ex:
        t_engine, got = timed(lambda: list(ex.map(lambda r: eng.fuse(*r), reqs)))
    sizes = eng.batcher().stats()["sizes"]
    eng.batching, eng._batcher, eng._pool = None, None, None
    ref = [eng.fuse(c, q) for c, q in reqs]
    pairs = list(zip(ref, got, strict=True))
    return {
        "J": J,
        "tokens": res[0].stats["prompt_tokens"],
        "alone_eager_ms": t_alone * 1e3,
        "alone_graphs_engine_ms": t_graphs * 1e3,
        "batched_eager_ms": t_batched * 1e3,
        "engine_batched_threads_ms": t_engine * 1e3,
        "batched_per_request_ms": t_batched * 1e3 / J,
        "speedup_vs_alone_eager": t_alone / t_batched,
        "speedup_engine_vs_graphs": t_graphs / t_engine,
        "batched_probe_ms": res[0].stats["seconds"]["probe"] * 1e3,
        "batched_recompute_ms": res[0].stats["seconds"]["recompute"] * 1e3,
        "engine_batch_sizes": sizes,
        "engine_selected_equal_alone": all(torch.equal(x.selected, y.selected) for x, y in pairs),
        "engine_logits_max_rel_diff": max(
            float((x.logits - y.logits).abs().max() / x.logits.abs().max()) for x, y in pairs
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--passages", type=int, default=64, help="the corpus the requests draw from")
    ap.add_argument("--out", default="batch_micro.json")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test (with --shape tiny)")
    a = ap.parse_args()
    lm = build_model(a.shape, torch.bfloat16 if a.device == "cuda" else torch.float32, a.device)
    tok = _tokenizer()
    eng = speed_engine(lm.model, tok, tempfile.mkdtemp(prefix="batch-micro-"), "int8")
    texts, qs = passages(tok, a.passages), questions()
    eng.precompute(texts, batch_size=4)
    cfg = F.FuseConfig(recompute_ratio=0.15, policy="qfast")
    sizes = [int(x) for x in a.sizes.split(",")]
    reqs = [([texts[(7 * j + i) % len(texts)] for i in range(a.k)], qs[j]) for j in range(max(sizes))]
    rows = []
    for J in sizes:
        rows.append(measure(eng, reqs[:J], cfg))
        print(json.dumps(rows[-1]), flush=True)
        with open(a.out, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                    "shape": a.shape,
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
