"""Precompute benchmark: tokens per second for encoding chunks, and for encoding plus storing them.

Takes MuSiQue passages (about 500-600 tokens each), encodes them with the model behind the sink at
several batch sizes (``encode`` = forward passes only), then runs ``ChunkCache.precompute`` into a
fresh LMDB store (``precompute+store`` = encode, codec, checksum, LMDB write) in the same run, so
the cost of persisting is the ratio of the two.

    python -m chunkcache.bench.precompute --chunks 16 --batch-sizes 1,4,8
    chunkcache bench precompute --codec int4
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from chunkcache.bench import standalone
from chunkcache.bench import sync as _sync
from chunkcache.bench.quality import DEFAULT_DATA


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model name, HF id or path")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="MuSiQue-style JSON")
    p.add_argument("--chunks", type=int, default=16, help="passages to encode")
    p.add_argument("--batch-sizes", default="1,4,8", help="comma-separated batch sizes")
    p.add_argument("--codec", default="raw", help="codec for the store pass")
    p.add_argument("--out", default=None, help="write JSON results here")


def run_cli(args: argparse.Namespace) -> int:
    from chunkcache.engine import ChunkCache
    from chunkcache.precompute import encode_chunks

    data = json.loads(Path(args.data).read_text())
    texts = []
    for ex in data:
        texts += [f"{c['title']}\n{c['text']}" for c in ex["ctxs"]]
        if len(texts) >= args.chunks:
            break
    texts = texts[: args.chunks]
    folder = tempfile.mkdtemp(prefix="cc-bench-precompute-")
    try:
        eng = ChunkCache(
            model=args.model,
            store=str(Path(folder) / "store"),
            dtype=args.dtype,
            device=args.device,
            codec=args.codec,
        )
        ids = [eng.template.chunk_ids(t) for t in texts]
        tokens = sum(len(i) for i in ids)
        sink = eng.template.sink_ids(eng.settings.sink)
        encode_chunks(eng.lm, ids[:2], sink, batch_size=2)  # warm-up
        rows = []
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            _sync()
            t = time.perf_counter()
            encode_chunks(eng.lm, ids, sink, batch_size=bs)
            _sync()
            rows.append({"stage": "encode", "batch_size": bs, "seconds": time.perf_counter() - t})
        best = min(rows, key=lambda r: r["seconds"])
        t = time.perf_counter()
        eng.precompute(texts, batch_size=best["batch_size"], progress=False)
        _sync()
        rows.append(
            {
                "stage": f"precompute+store ({args.codec})",
                "batch_size": best["batch_size"],
                "seconds": time.perf_counter() - t,
            }
        )
        stats = eng.store.stats()
        eng.store.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(
        f"{eng.lm.name} on {eng.lm.device} ({str(eng.lm.dtype).removeprefix('torch.')}), "
        f"{len(texts)} chunks, {tokens} tokens (mean {tokens / len(texts):.0f}), sink={eng.settings.sink}"
    )
    print(f"{'stage':<28}{'batch':>6}{'seconds':>9}{'tokens/s':>10}{'vs encode':>11}")
    for r in rows:
        r["tokens_per_s"] = tokens / r["seconds"]
        print(
            f"{r['stage']:<28}{r['batch_size']:>6}{r['seconds']:>9.2f}{r['tokens_per_s']:>10.0f}"
            f"{best['seconds'] / r['seconds']:>11.2f}"
        )
    print(
        f"store: {stats.entries} entries, {stats.bytes / 1e6:.1f} MB ({stats.bytes / tokens / 1e3:.1f} KB/token)"
    )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"rows": rows, "tokens": tokens, "chunks": len(texts)}, indent=1)
        )
    return 0


main = standalone("chunkcache bench precompute", __doc__, add_arguments, run_cli)


if __name__ == "__main__":
    raise SystemExit(main())
