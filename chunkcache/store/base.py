"""The store interface: a small key -> bytes map with per-entry access facts, and its records.

A store maps a chunk key (``keys.chunk_key``) to one entry (``format.pack_chunk``) and keeps
access facts beside each entry (last access, hits, size, tokens) for eviction and ``ls``. It
knows nothing about models; of the entry format it reads only the token count at ``put``.
Backends: ``memory.MemoryStore`` (tests), ``lmdb_store.LMDBStore`` (the default),
``redis_store.RedisStore`` (shared), ``tiered.TieredStore`` (local in front of shared).

    class MyStore(Store): ...            # get/put/contains/delete/entries/evict_to/stats
    with MyStore() as s: s.put(k, v); s.get(k); s.get_many([k]); list(s.keys())
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["Clock", "EntryStats", "SpanReader", "Store", "StoreStats", "entry_tokens"]


@dataclass(frozen=True)
class StoreStats:
    """What a store holds, and what this handle has seen since it was opened."""

    hits: int
    """``get`` calls on this handle that found their key."""
    misses: int
    """``get`` calls on this handle that did not."""
    evictions: int
    """Entries this handle removed to stay under ``max_bytes`` (or by ``evict_to``)."""
    bytes: int
    """Sum of the stored value sizes (all processes), not counting the database's own overhead."""
    entries: int
    """Number of stored entries (all processes)."""
    max_bytes: int | None = None
    """The size cap eviction keeps ``bytes`` under, if any."""
    file_bytes: int | None = None
    """Size of the backing file on disk (LMDB only; allocated pages, including free ones)."""
    failed_writes: int = 0
    """``put``/``put_many`` calls on this handle that raised a ``StoreError`` (full disk, Redis
    down or out of memory, read-only): the engine serves the computed KV anyway."""


@dataclass(frozen=True)
class EntryStats:
    """Access facts of one entry, kept beside it for eviction and ``ls``."""

    nbytes: int
    """Size of the stored value in bytes."""
    tokens: int
    """Chunk length in tokens (from the entry header; 0 if the value is not a chunk entry)."""
    hits: int
    """How many times ``get`` returned it (flushed lazily by LMDBStore, see there)."""
    last_access: int
    """time.time_ns() of the last put or get (strictly increasing within one store handle)."""
    created: int
    """time.time_ns() of the first put."""


def entry_tokens(value: bytes | memoryview) -> int:
    """The token count in an entry's header, 0 if the value is not a readable chunk entry."""
    from chunkcache.errors import CorruptEntryError
    from chunkcache.format import read_header

    try:
        return read_header(value)["num_tokens"]
    except CorruptEntryError:
        return 0


class Clock:
    """time.time_ns(), made strictly increasing so that access order is never a tie."""

    def __init__(self) -> None:
        self._last = 0

    def __call__(self) -> int:
        self._last = max(time.time_ns(), self._last + 1)
        return self._last


class SpanReader:
    """Byte spans of a fixed list of entries, read in the order a streaming reader asks for them
    (``stream.LayerStream``: heads first, then layer by layer). This default reads each entry
    whole (``get_many``, counting hits) at its first span and slices it; a remote store overrides
    it to move only what each call asks for (``RedisStore``: one round trip per call, every piece
    once)."""

    def __init__(self, store: Store, keys: Sequence[str]) -> None:
        self.store, self.keys = store, list(keys)
        self._whole: dict[int, memoryview] = {}

    def read(self, spans: Sequence[tuple[int, int, int]]) -> list:
        """Per ``(entry index, start, stop)`` the bytes ``[start, stop)`` of that entry (bytes-like);
        KeyError naming the key of a missing entry."""
        need = sorted({i for i, _, _ in spans if i not in self._whole})
        if need:
            for i, v in zip(need, self.store.get_many([self.keys[i] for i in need]), strict=True):
                if v is None:
                    raise KeyError(f"chunk {self.keys[i]} is not in the store")
                self._whole[i] = memoryview(v).cast("B")
        return [self._whole[i][a:b] for i, a, b in spans]

    def close(self) -> None:
        self._whole.clear()


class Store(ABC):
    """A key -> bytes chunk store. Batch forms and iteration helpers are built on the abstract core."""

    failed_writes = 0  # per handle; backends count the writes that raised StoreError

    @abstractmethod
    def get(self, key: str, *, touch: bool = True) -> bytes | None:
        """The value, or None. ``touch=False`` reads without counting a hit/miss or updating access."""

    @abstractmethod
    def put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` (replacing it), evicting others if a size cap requires it."""

    @abstractmethod
    def contains(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it was there."""

    @abstractmethod
    def entries(self) -> Iterator[tuple[str, EntryStats]]:
        """Every (key, access facts), in key order."""

    @abstractmethod
    def evict_to(self, max_bytes: int) -> list[str]:
        """Evict by the store's policy until the stored bytes are <= ``max_bytes``; the removed keys."""

    @abstractmethod
    def stats(self) -> StoreStats: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; the store must not be used afterwards."""

    def items(self) -> Iterator[tuple[str, int]]:
        """Every (key, value size in bytes)."""
        for k, e in self.entries():
            yield k, e.nbytes

    def keys(self) -> Iterator[str]:
        for k, _ in self.entries():
            yield k

    def sample_keys(self, n: int) -> list[str]:
        """Up to ``n`` keys, cheaply (backends read only that many, not the whole index)."""
        out = []
        for k in self.keys():
            if len(out) >= n:
                break
            out.append(k)
        return out

    def read_prefix(self, key: str, nbytes: int) -> bytes | None:
        """The first ``nbytes`` bytes of the value (fewer if it is shorter), or None; no hit counted.
        Backends override it to move only those bytes (an entry's header, ``format.read_prefix_header``)."""
        v = self.get(key, touch=False)
        return None if v is None else bytes(v[:nbytes])

    def span_reader(self, keys: Sequence[str]) -> SpanReader:
        """Streaming reads of the entries under ``keys`` (``SpanReader``)."""
        return SpanReader(self, keys)

    @contextmanager
    def views(self, keys: Sequence[str]) -> Iterator[list]:
        """The values under ``keys`` (None for a missing one), valid inside the ``with`` block: the
        zero-copy reader's entry point (``pipeline.entry_views``). No hits are counted. The base
        form copies (``get``); ``LMDBStore`` yields views of its map, which no resize can move
        while the block runs."""
        yield [self.get(k, touch=False) for k in keys]

    def __iter__(self) -> Iterator[str]:
        return self.keys()

    def __contains__(self, key: str) -> bool:
        return self.contains(key)

    def __len__(self) -> int:
        return self.stats().entries

    def get_many(self, keys: Iterable[str]) -> list[bytes | None]:
        return [self.get(k) for k in keys]

    def put_many(self, items: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> None:
        for k, v in items.items() if isinstance(items, Mapping) else items:
            self.put(k, v)

    def contains_many(self, keys: Iterable[str]) -> list[bool]:
        return [self.contains(k) for k in keys]

    def get_record(self, name: str) -> dict | None:
        """A small JSON record kept beside the entries (never listed, evicted or verified as an
        entry), or None. This default keeps records in memory, for this handle's life."""
        value = getattr(self, "_records", {}).get(name)
        return None if value is None else json.loads(value)

    def put_record(self, name: str, record: dict) -> None:
        """Store ``record`` (JSON-serialisable) under ``name``, replacing it; see ``get_record``."""
        if not hasattr(self, "_records"):
            self._records: dict[str, str] = {}
        self._records[name] = json.dumps(record, sort_keys=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
