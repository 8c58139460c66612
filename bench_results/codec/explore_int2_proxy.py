"""Exploration proxy (seconds, not a fusion KL): relative reconstruction error of real SmolLM2 chunk
caches (question 0's first 2 passages) per int2 variant, beside int4 and int8, with bits/element.
Error is reported overall and on the chunk's first 4 tokens (where attention sinks form).

    python bench_results/codec/explore_int2_proxy.py
"""

import json

import torch

import chunkcache.codec as C
from chunkcache.engine import ChunkCache

eng = ChunkCache(device="cpu", dtype="float32")
ex = json.load(open("/work/shared/data/musique_dev.json"))[0]
texts = [f"{c['title']}\n{c['text']}" for c in ex["ctxs"][:2]]
chunks = eng.chunks(texts)


def measure(name, base, **consts):
    old = {k: getattr(C, k) for k in consts}
    for k, v in consts.items():
        setattr(C, k, v)
    try:
        err = err4 = ref = ref4 = 0.0
        nbytes = numel = 0
        for ch in chunks:
            kv = ch.kv
            parts = C.CODECS[base].encode(kv)
            out = C.CODECS[base].decode(parts, torch.float32)
            err += float(((out - kv) ** 2).sum()); ref += float((kv**2).sum())
            err4 += float(((out - kv)[:, :, :, :4] ** 2).sum()); ref4 += float((kv[:, :, :, :4] ** 2).sum())
            nbytes += sum(p.numel() * p.element_size() for p in parts.values()); numel += kv.numel()
        print(f"{name:34s} {8 * nbytes / numel:5.2f} bits/elem  {16 * numel / (8 * nbytes):5.2f}x<bf16  "
              f"rel err {err / ref:.4f}  first-4 rel err {err4 / ref4:.4f}", flush=True)
    finally:
        for k, v in old.items():
            setattr(C, k, v)


print(f"chunks: {[c.kv.shape[3] for c in chunks]} tokens")
measure("int8", "int8")
measure("int4", "int4")
measure("int2 (default: first 4 + 2% kept, clip)", "int2")
measure("int2, nothing kept", "int2", INT2_KEEP_FIRST=0, INT2_KEEP_FRAC=0.0)
measure("int2, first 4 kept only", "int2", INT2_KEEP_FRAC=0.0)
measure("int2, first 4 + 5% kept", "int2", INT2_KEEP_FRAC=0.05)
measure("int2, no clipping search", "int2", INT2_CLIPS=(1.0,))
measure("int2, groups of >= 64 tokens", "int2", INT2_GROUP=64)
