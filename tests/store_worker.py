"""Helpers for the store tests: random chunks, and a worker run as a real separate process.

    python tests/store_worker.py write PATH N [--tokens T]   # put N entries, skipping present keys
    python tests/store_worker.py read PATH SECONDS           # read and verify every entry in a loop
    python tests/store_worker.py threads PATH SECONDS        # one handle: zero-copy readers vs a growing writer

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


def _threads(path: str, seconds: float, readers: int = 3) -> int:
    """One LMDBStore handle shared by ``readers`` threads on the zero-copy path
    (``pipeline.entry_views``, the fast path's reader: header and every section read from views of
    the map) and one writer whose puts keep growing the map (a 64 KiB map doubling dozens of
    times). Before the map lock this died with SIGSEGV within seconds (views of an unmapped map)."""
    import threading

    from chunkcache.format import read_header, unpack_parts
    from chunkcache.pipeline import entry_views
    from chunkcache.store import LMDBStore

    store = LMDBStore(path, map_size=1 << 16)
    first = [entry(i, tokens=8) for i in range(4)]
    store.put_many(first)
    keys = [k for k, _ in first]
    stop = time.monotonic() + seconds
    errors: list[BaseException] = []
    counts = [0] * readers

    def read(r: int) -> None:
        try:
            while time.monotonic() < stop:
                with entry_views(store, keys) as views:
                    for v in views:
                        read_header(v)
                        _, parts = unpack_parts(v, verify=True)  # crc32 over every byte of the view
                        float(parts["kv"].float().sum())
                counts[r] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def write() -> None:
        i = 100
        try:
            while time.monotonic() < stop:
                store.put(*entry(i, tokens=64 + (i % 7) * 64, layers=2))  # 32-230 KB each: the map grows
                i += 1
                if i % 40 == 0:  # keep the file bounded: drop old ones (free pages are reused)
                    for k in list(store.keys())[4:30]:
                        if k not in keys:
                            store.delete(k)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=read, args=(r,)) for r in range(readers)]
    threads.append(threading.Thread(target=write))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    size = store._env.info()["map_size"]
    store.close()
    if errors:
        print("error", repr(errors[0]), flush=True)
        return 1
    print("reads", sum(counts), "map_size", size, flush=True)
    return 0


if __name__ == "__main__":
    cmd, path = sys.argv[1], sys.argv[2]
    if cmd == "threads":
        sys.exit(_threads(path, float(sys.argv[3])))
    if cmd == "write":
        tokens = int(sys.argv[sys.argv.index("--tokens") + 1]) if "--tokens" in sys.argv else 64
        sys.exit(_write(path, int(sys.argv[3]), tokens))
    sys.exit(_read(path, float(sys.argv[3])))


def craft(raw: bytes, edit=None, payload: bytes | None = None, header_bytes: bytes | None = None) -> bytes:
    """A new entry from ``raw`` with its header edited by ``edit(header) -> header`` (or replaced
    by ``header_bytes``) and valid checksums for that header: what a hostile or buggy writer can
    produce, which the header crc32 cannot catch. ``payload`` replaces the payload bytes (the
    header's ``checksum`` is then recomputed too)."""
    import json
    import struct
    import zlib

    from chunkcache.format import ALIGN, FORMAT_VERSION, MAGIC, read_header

    h = read_header(raw)
    body = raw[h.pop("payload_offset") :] if payload is None else payload
    if payload is not None:
        h["checksum"] = f"crc32:{zlib.crc32(body):08x}"
    if header_bytes is None:
        h = edit(h) if edit is not None else h
        header_bytes = json.dumps(h, separators=(",", ":")).encode()
    head = struct.pack("<8sIIII", MAGIC, FORMAT_VERSION, len(header_bytes), zlib.crc32(header_bytes), 0)
    head += header_bytes
    head += bytes(-len(head) % ALIGN)
    return head + body
