"""Helpers for the store tests: random chunks, and a worker run as a real separate process.

    python tests/store_worker.py write PATH N [--tokens T]   # put N entries, skipping present keys
    python tests/store_worker.py read PATH SECONDS           # read and verify every entry in a loop

The worker prints one line per event so the parent can follow it (``put KEY``, ``skip KEY``,
``done PUT SKIP`` / ``reads N``), and exits non-zero on any damage it sees.
"""

from __future__ import annotations

import sys
import time

import torch

from chunkcache.format import pack_chunk, unpack_chunk
from chunkcache.keys import KeyInputs
from chunkcache.layout import ChunkKV

KEY_INPUTS = KeyInputs("test-model@0", "bfloat16", "raw", {"sink": "bos"}, 1)


def random_chunk(
    layers: int = 2, heads: int = 2, tokens: int = 16, head_dim: int = 64, seed: int = 0, dtype=torch.bfloat16
) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    return ChunkKV(
        token_ids=torch.randint(0, 50_000, (tokens,), generator=g),
        kv=torch.randn(layers, 2, heads, tokens, head_dim, generator=g).to(dtype),  # [L, 2, H, T, D]
        base_pos=1,
        token_scores=torch.rand(tokens, generator=g),
        meta={"seed": seed},
    )


def entry(seed: int, codec: str = "raw", **shape) -> tuple[str, bytes]:
    """(key, packed entry) of the chunk made from ``seed``."""
    c = random_chunk(seed=seed, **shape)
    info = KeyInputs(KEY_INPUTS.model_fingerprint, KEY_INPUTS.dtype, codec, KEY_INPUTS.settings, 1)
    return info.key(c.token_ids), pack_chunk(c, codec, info.to_dict())


def _write(path: str, n: int, tokens: int) -> int:
    from chunkcache.store import LMDBStore

    put = skip = 0
    with LMDBStore(path, map_size=1 << 20) as store:  # tiny map: growth happens during the loop
        for i in range(n):
            key, value = entry(i, tokens=tokens, layers=4, heads=2)
            if store.contains(key):
                skip += 1
                print("skip", key, flush=True)
                continue
            store.put(key, value)
            put += 1
            print("put", key, flush=True)
    print("done", put, skip, flush=True)
    return 0


def _read(path: str, seconds: float) -> int:
    from chunkcache.store import LMDBStore

    reads = 0
    deadline = time.monotonic() + seconds
    with LMDBStore(path, readonly=True) as store:
        while time.monotonic() < deadline:
            for key in list(store.keys()):
                raw = store.get(key)
                if raw is None:  # deleted meanwhile: fine
                    continue
                unpack_chunk(raw)  # raises CorruptEntryError on any torn or damaged value
                reads += 1
    print("reads", reads, flush=True)
    return 0


if __name__ == "__main__":
    cmd, path = sys.argv[1], sys.argv[2]
    if cmd == "write":
        tokens = int(sys.argv[sys.argv.index("--tokens") + 1]) if "--tokens" in sys.argv else 64
        sys.exit(_write(path, int(sys.argv[3]), tokens))
    sys.exit(_read(path, float(sys.argv[3])))
