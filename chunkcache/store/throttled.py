"""A store behind a link of fixed bandwidth: every byte read from it is delivered no faster than
``bytes_per_s`` (one shared link: concurrent reads queue behind each other), plus ``latency``
seconds per request. A stand-in for a remote tier in tests and emulations (a real shaped link
is ``chunkcache bench adaptive``); writes and lookups pass straight through.

    slow = ThrottledStore(LMDBStore(path), bytes_per_s=1.25e9)    # 10 Gb/s
    slow.get(key)                     # the entry, after len(entry) / 1.25e9 s of link time
    reader = slow.span_reader(keys)   # streamed reads: each call waits only for its own bytes
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from .base import EntryStats, SpanReader, Store, StoreStats

__all__ = ["ThrottledStore"]


class ThrottledStore(Store):
    """``inner`` behind a link of ``bytes_per_s`` (see the module docstring)."""

    def __init__(self, inner: Store, bytes_per_s: float, latency: float = 0.0) -> None:
        if not bytes_per_s > 0 or latency < 0:
            raise ValueError(f"bytes_per_s must be > 0 and latency >= 0, got {bytes_per_s}, {latency}")
        self.inner, self.bytes_per_s, self.latency = inner, float(bytes_per_s), float(latency)
        self.sent = 0
        """Bytes delivered so far."""
        self._free_at = 0.0  # perf_counter time at which the link is idle again
        self._lock = threading.Lock()

    def deliver(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more have crossed the link (after what is queued on it)."""
        with self._lock:
            start = max(time.perf_counter(), self._free_at) + self.latency
            self._free_at = start + nbytes / self.bytes_per_s
            self.sent += nbytes
            done = self._free_at
        delay = done - time.perf_counter()
        if delay > 0:
            time.sleep(delay)

    # -- reads: throttled -----------------------------------------------------------------------
    def get(self, key: str, *, touch: bool = True) -> bytes | None:
        value = self.inner.get(key, touch=touch)
        self.deliver(0 if value is None else len(value))
        return value

    def get_many(self, keys: Iterable[str]) -> list[bytes | None]:
        values = self.inner.get_many(list(keys))
        self.deliver(sum(len(v) for v in values if v is not None))
        return values

    @contextmanager
    def views(self, keys: Sequence[str]) -> Iterator[list]:
        with self.inner.views(keys) as values:
            self.deliver(sum(len(v) for v in values if v is not None))
            yield values

    def span_reader(self, keys: Sequence[str]) -> SpanReader:
        return _ThrottledSpans(self, keys)

    def read_prefix(self, key: str, nbytes: int) -> bytes | None:
        value = self.inner.read_prefix(key, nbytes)
        self.deliver(0 if value is None else len(value))
        return value

    # -- everything else: straight through ------------------------------------------------------
    def put(self, key: str, value: bytes) -> None:
        self.inner.put(key, value)

    def put_many(self, items: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> None:
        self.inner.put_many(items)

    def contains(self, key: str) -> bool:
        return self.inner.contains(key)

    def contains_many(self, keys: Iterable[str]) -> list[bool]:
        return self.inner.contains_many(keys)

    def delete(self, key: str) -> bool:
        return self.inner.delete(key)

    def entries(self) -> Iterator[tuple[str, EntryStats]]:
        return self.inner.entries()

    def evict_to(self, max_bytes: int) -> list[str]:
        return self.inner.evict_to(max_bytes)

    def stats(self) -> StoreStats:
        return self.inner.stats()

    def get_record(self, name: str) -> dict | None:
        return self.inner.get_record(name)

    def put_record(self, name: str, record: dict) -> None:
        self.inner.put_record(name, record)

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"ThrottledStore({self.inner!r}, {self.bytes_per_s:.4g} B/s)"


class _ThrottledSpans(SpanReader):
    """The inner store's spans, each call delivered over the link (its bytes only)."""

    def __init__(self, store: ThrottledStore, keys: Sequence[str]) -> None:
        super().__init__(store, keys)
        self._inner = store.inner.span_reader(keys)

    def read(self, spans: Sequence[tuple[int, int, int]]) -> list:
        got = self._inner.read(spans)
        self.store.deliver(sum(len(v) for v in got))  # type: ignore[attr-defined]
        return got

    def close(self) -> None:
        self._inner.close()
