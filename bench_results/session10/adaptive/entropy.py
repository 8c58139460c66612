"""Entropy coding of the quantised symbols (issue 16, requirement 1's last item), measured on the
CPU: SmolLM2-135M chunk caches of --passages MuSiQue passages of 512 tokens, encoded by each
codec; per part and layer, the stored bytes against (a) the order-0 entropy of its bytes (the
size a static per-(part, layer) byte model reaches; a packed byte holds 2 int4 or 4 int2 codes,
so it also models their joint statistics), (b) ``constriction``'s range coder with that model
(real encoded size, plus the model: 256 counts of 2 bytes per part and layer), (c) zlib -9.
Lossless: decoding gives the same symbols, so fusion quality is the codec's own.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench_results/session10/adaptive/entropy.py --passages 8
(constriction installed apart: pip install --target /tmp/cx constriction)
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib

import numpy as np
import torch

sys.path.append("/tmp/cx")  # (after numpy: the venv's numpy stays)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passages", type=int, default=8)
    ap.add_argument("--codecs", default="int8,int4,int2m")
    ap.add_argument("--out", default="bench_results/session10/adaptive/entropy_cpu.json")
    args = ap.parse_args()
    import constriction

    from chunkcache.bench.texts import passages
    from chunkcache.codec import get_codec
    from chunkcache.engine import ChunkCache
    from chunkcache.store import MemoryStore

    eng = ChunkCache(store=MemoryStore(), codec="raw")
    texts = passages(eng.tokenizer, args.passages, tokens=512)
    chunks = eng.chunks(texts)
    tokens = sum(c.num_tokens for c in chunks)
    L = chunks[0].kv.shape[0]
    bf16_bytes = sum(c.kv.numel() for c in chunks) * 2
    out = {"model": eng.lm.name, "passages": len(chunks), "tokens": tokens, "layers": L,
           "bf16_bytes_per_token": bf16_bytes / tokens, "codecs": {}}  # fmt: skip
    print(f"{eng.lm.name}: {len(chunks)} chunks, {tokens} tokens, bf16 {bf16_bytes / tokens:.0f} B/token")
    for name in args.codecs.split(","):
        codec = get_codec(name)
        stored = ent = coded = zl = 0
        per_layer = np.zeros((L, 3))  # stored, entropy, coded
        for c in chunks:
            parts = codec.encode(c.kv.float().to(torch.bfloat16))
            for pname, t in parts.items():
                raw = t.contiguous().view(torch.uint8).reshape(L, -1).numpy()
                for li in range(L):
                    b = raw[li]
                    counts = np.bincount(b, minlength=256).astype(np.float64)
                    p = counts / counts.sum()
                    h = -(p[p > 0] * np.log2(p[p > 0])).sum() * b.size / 8
                    enc = constriction.stream.queue.RangeEncoder()
                    model = constriction.stream.model.Categorical(np.maximum(p, 1e-9), perfect=False)
                    enc.encode(b.astype(np.int32), model)
                    nb = enc.get_compressed().nbytes + 2 * int((counts > 0).sum())  # + the model
                    stored += b.size
                    ent += h
                    coded += nb
                    per_layer[li] += (b.size, h, nb)
                zl += len(zlib.compress(raw.tobytes(), 9))
        row = {"stored_B_per_token": stored / tokens, "entropy_B_per_token": ent / tokens,
               "range_coded_B_per_token": coded / tokens, "zlib_B_per_token": zl / tokens,
               "x_smaller_than_bf16_stored": bf16_bytes / stored, "x_smaller_than_bf16_coded": bf16_bytes / coded,
               "per_layer_coded_over_stored": (per_layer[:, 2] / per_layer[:, 0]).round(4).tolist()}  # fmt: skip
        out["codecs"][name] = row
        pl = row["per_layer_coded_over_stored"]
        print(f"  {name:6s} stored {row['stored_B_per_token']:7.1f} B/token ({row['x_smaller_than_bf16_stored']:.2f}x < bf16); "
              f"order-0 entropy {row['entropy_B_per_token']:7.1f}; range-coded {row['range_coded_B_per_token']:7.1f} "
              f"({coded / stored:.3f} of stored, {row['x_smaller_than_bf16_coded']:.2f}x < bf16); zlib -9 {row['zlib_B_per_token']:7.1f}; "
              f"per layer coded/stored first {pl[0]:.3f} .. last {pl[-1]:.3f}, min {min(pl):.3f} max {max(pl):.3f}")  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
