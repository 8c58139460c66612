"""A store in this process's memory (a dict): for tests and runs that need no persistence.

store = MemoryStore(max_bytes=10**9, eviction="cost")
store.put(key, entry); store.get(key)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Literal

from chunkcache.errors import StoreFullError

from .base import Clock, EntryStats, Store, StoreStats, entry_tokens
from .eviction import get_policy, pick_victims

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    """A dict in this process. For tests and for runs that need no persistence."""

    def __init__(self, max_bytes: int | None = None, eviction: Literal["lru", "cost"] = "lru") -> None:
        self.max_bytes = max_bytes
        self.policy = get_policy(eviction)
        self._data: dict[str, bytes] = {}
        self._meta: dict[str, EntryStats] = {}
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self.failed_writes = 0
        self._clock = Clock()
        self._lock = threading.RLock()

    def get(self, key: str, *, touch: bool = True) -> bytes | None:
        with self._lock:
            value = self._data.get(key)
            if touch:
                if value is None:
                    self._misses += 1
                else:
                    self._hits += 1
                    e = self._meta[key]
                    self._meta[key] = EntryStats(e.nbytes, e.tokens, e.hits + 1, self._clock(), e.created)
            return value

    def put(self, key: str, value: bytes) -> None:
        value = bytes(value)
        with self._lock:
            if self.max_bytes is not None and len(value) > self.max_bytes:
                self.failed_writes += 1
                raise StoreFullError(f"a {len(value)}-byte value cannot fit under max_bytes={self.max_bytes}")
            old = self._meta.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
                del self._data[key]
            if self.max_bytes is not None:
                self._evict(self._bytes + len(value) - self.max_bytes)
            now = self._clock()
            hits, created = (old.hits, old.created) if old else (0, now)
            self._data[key] = value
            self._meta[key] = EntryStats(len(value), entry_tokens(value), hits, now, created)
            self._bytes += len(value)

    def _evict(self, free_bytes: int) -> list[str]:
        victims = pick_victims(list(self._meta.items()), free_bytes, self.policy)
        for k in victims:
            self._remove(k)
        self._evictions += len(victims)
        return victims

    def _remove(self, key: str) -> bool:
        e = self._meta.pop(key, None)
        if e is None:
            return False
        del self._data[key]
        self._bytes -= e.nbytes
        return True

    def contains(self, key: str) -> bool:
        return key in self._data

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._remove(key)

    def entries(self) -> Iterator[tuple[str, EntryStats]]:
        with self._lock:
            snapshot = sorted(self._meta.items())
        yield from snapshot

    def evict_to(self, max_bytes: int) -> list[str]:
        with self._lock:
            return self._evict(self._bytes - max_bytes)

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                self._hits, self._misses, self._evictions, self._bytes, len(self._data), self.max_bytes,
                failed_writes=self.failed_writes,
            )  # fmt: skip
