"""The text index: a chunk text seen before costs a lookup, not a tokeniser call.

A memo ``digest(namespace, text) -> (key, token ids)``. The namespace is everything the token ids
and the key depend on besides the text (the tokenizer's own serialisation, the template's chunk
format, the engine's key inputs), so another tokenizer, template or model never shares a record.
A record is a hint, never trusted alone: the engine compares every entry's stored token ids with
the record's before it uses the entry (``ChunkCache._check_entry``), and a changed text has another
digest, so it is tokenised afresh.

Where it lives: in memory for any store (bounded, oldest records dropped first), and for an LMDB
store also in a small LMDB environment beside it (``<store>/text_index``), so a restarted server
skips the tokeniser for its whole corpus. Records are plain bytes (``b"CCTI1"``, the 64-character
key, the ids as little-endian int64): no pickle.

What it does not know: stores' entries, models, fusion.

    index = TextIndex(namespace=b"...", path=None)       # path: a directory for the LMDB sidecar
    index.put_many([(text, key, ids_bytes)])
    key, ids_bytes = index.get_many([text])[0]            # or None
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

__all__ = ["TextIndex", "tokenizer_fingerprint"]

_MAGIC = b"CCTI1"
_KEY_LEN = 64  # chunk keys are 64 hex chars (keys.chunk_key)
_DOMAIN = b"chunkcache/text-index/v1\x00"


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of what decides a tokenizer's ids: its class and its full serialisation (fast
    tokenizers: vocabulary, merges, normaliser, pre-tokeniser, added tokens), else its vocabulary."""
    h = hashlib.blake2b(digest_size=32)
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        for tok, i in sorted(tokenizer.get_vocab().items()):
            h.update(f"{i}\x00{tok}\x01".encode())
    return h.hexdigest()


class TextIndex:
    """``text -> (key, token id bytes)`` for one namespace; thread-safe."""

    MAX_MEMORY = 200_000
    """Records kept in memory (each about the chunk's ids: 8 bytes a token); the oldest go first."""
    MAP_SIZE = 64 << 20
    """Initial LMDB map of the sidecar (grows by doubling when full)."""

    def __init__(
        self, namespace: bytes, path: str | os.PathLike | None = None, readonly: bool = False
    ) -> None:
        self._prefix = _DOMAIN + len(namespace).to_bytes(4, "little") + namespace
        self._memory: OrderedDict[bytes, tuple[str, bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self._side = _sidecar(os.fspath(path), readonly) if path is not None else None

    def digest(self, text: str) -> bytes:
        h = hashlib.blake2b(self._prefix, digest_size=32)
        h.update(text.encode("utf-8", "surrogatepass"))
        return h.digest()

    def get_many(self, texts: Sequence[str]) -> list[tuple[str, bytes] | None]:
        """The record of each text, or None where there is none (or it is malformed)."""
        digests = [self.digest(t) for t in texts]
        out: list[tuple[str, bytes] | None] = []
        with self._lock:
            for d in digests:
                out.append(self._memory.get(d))
        todo = [i for i, r in enumerate(out) if r is None]
        if todo and self._side is not None:
            found = {}
            for i, rec in zip(todo, self._side.get_many([digests[i] for i in todo]), strict=True):
                if rec is not None:
                    out[i] = found[digests[i]] = rec
            if found:
                with self._lock:
                    self._remember(found.items())
        return out

    def put_many(self, items: Sequence[tuple[str, str, bytes]]) -> None:
        """Record ``(text, key, ids_bytes)`` triples (memory, and the sidecar where there is one)."""
        recs = [(self.digest(t), (k, ids)) for t, k, ids in items]
        if not recs:
            return
        with self._lock:
            self._remember(recs)
        if self._side is not None:
            self._side.put_many([(d, _MAGIC + k.encode("ascii") + ids) for d, (k, ids) in recs])

    def __len__(self) -> int:
        return len(self._memory)

    def _remember(self, recs) -> None:
        for d, rec in recs:
            self._memory[d] = rec
            self._memory.move_to_end(d)
        while len(self._memory) > self.MAX_MEMORY:
            self._memory.popitem(last=False)


def _unpack(value: bytes | None) -> tuple[str, bytes] | None:
    if value is None or not value.startswith(_MAGIC):
        return None
    key, ids = value[len(_MAGIC) : len(_MAGIC) + _KEY_LEN], value[len(_MAGIC) + _KEY_LEN :]
    if len(key) != _KEY_LEN or len(ids) % 8:
        return None
    try:
        return key.decode("ascii"), bytes(ids)
    except UnicodeDecodeError:
        return None


class _Sidecar:
    """The LMDB environment of one store's index. One lock for reads and writes: growing the map
    needs no transaction open in the process, and every transaction here lasts microseconds."""

    def __init__(self, env, readonly: bool) -> None:
        self.env, self.readonly, self.pid = env, readonly, os.getpid()
        self.lock = threading.Lock()

    def get_many(self, digests: Sequence[bytes]) -> list[tuple[str, bytes] | None]:
        with self.lock, self.env.begin() as txn:
            return [_unpack(txn.get(d)) for d in digests]

    def put_many(self, records: Sequence[tuple[bytes, bytes]]) -> None:
        import lmdb

        if self.readonly:
            return
        with self.lock:
            while True:
                try:
                    with self.env.begin(write=True) as txn:
                        for d, v in records:
                            txn.put(d, v)
                    return
                except lmdb.MapFullError:  # aborted, nothing written: grow and redo
                    self.env.set_mapsize(self.env.info()["map_size"] * 2)


# One environment per sidecar path per process (LMDB must not open one path twice in a process).
_SIDECARS: dict[str, _Sidecar] = {}
_SIDECARS_GUARD = threading.Lock()


def _sidecar(store_path: str, readonly: bool) -> _Sidecar | None:
    import lmdb

    path = os.path.join(store_path, "text_index")
    real = os.path.realpath(path)
    with _SIDECARS_GUARD:
        side = _SIDECARS.get(real)
        if side is not None and side.pid == os.getpid() and (readonly or not side.readonly):
            return side
        if readonly and not os.path.isfile(os.path.join(path, "data.mdb")):
            return None
        from chunkcache.errors import StoreError
        from chunkcache.store.lmdb_store import preflight

        try:
            preflight(path, create=not readonly)  # a full disk or a truncated file: SIGBUS in lmdb.open
            env = lmdb.open(path, map_size=TextIndex.MAP_SIZE, readonly=readonly, max_readers=512)
        except (lmdb.Error, StoreError):  # read-only media, no permission, full: the index stays in memory
            return None
        side = _SIDECARS[real] = _Sidecar(env, readonly)
        return side
