"""A two-tier store: a local store (LMDB, with its own size cap and eviction) as a read-through
cache in front of a shared remote one (``RedisStore``). Writes go to both.

It knows the order of the tiers and what a remote fault means; it knows nothing about Redis or
LMDB themselves (any two ``Store``s work), nor about entry bytes (``load_chunk`` checks those).

    local = LMDBStore("/var/cache/chunkcache", max_bytes=20 * 2**30, eviction="cost")
    with TieredStore(local, RedisStore("redis://cache:6379/0")) as store:
        ChunkCache(model, store=store).fuse(passages, question)

    get:  local hit -> return it | local miss -> remote get -> copy into local -> return it
    put:  local put (must succeed) -> remote put (a failure warns; the local copy stays)

A remote that is down (``RemoteUnavailableError``) or refuses a write is reported with a
RuntimeWarning and the tier is skipped: reads fall back to the local tier (then to recompute),
writes keep the local copy. A damaged entry is deleted from both tiers by ``load_chunk``.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping

from chunkcache.errors import StoreError, StoreFullError

from .base import EntryStats, Store, StoreStats

__all__ = ["TieredStore"]


class TieredStore(Store):
    """``local`` in front of ``remote``; see the module docstring.

    ``stats()``: hits/misses as seen through this handle (a hit in either tier is a hit),
    ``tier_hits`` splits them; bytes/entries are the remote's (the shared truth), or the local's
    while the remote is down; ``max_bytes``/``file_bytes``/``evictions`` are the local tier's.
    ``evict_to`` evicts the local tier only (size the remote with Redis's maxmemory).
    """

    def __init__(self, local: Store, remote: Store, *, promote: bool = True) -> None:
        self.local = local
        self.remote = remote
        self.promote = promote
        """Copy remote hits into the local tier (the read-through cache)."""
        self.tier_hits = {"local": 0, "remote": 0}
        self.failed_writes = 0
        self._misses = 0
        self._lock = threading.Lock()

    def _remote(self, what: str, fn, default):
        try:
            return fn()
        except StoreError as e:  # RemoteUnavailableError (already warned by the store) or a refusal
            if "marked down" not in str(e):
                warnings.warn(f"chunkcache: remote store {what} failed, using the local tier: {e}",
                              RuntimeWarning, stacklevel=3)  # fmt: skip
            return default

    def get(self, key: str, *, touch: bool = True) -> bytes | None:
        return self.get_many([key], touch=touch)[0]

    def get_record(self, name: str) -> dict | None:
        return self.local.get_record(name)  # records (e.g. the correctness gate's) are per host

    def put_record(self, name: str, record: dict) -> None:
        self.local.put_record(name, record)

    def get_many(self, keys: Iterable[str], *, touch: bool = True) -> list[bytes | None]:
        keys = list(keys)
        out = [self.local.get(k, touch=touch) for k in keys]
        need = [i for i, v in enumerate(out) if v is None]
        remote = []
        if need:
            remote = self._remote(
                "get", lambda: self.remote.get_many([keys[i] for i in need]), [None] * len(need)
            )
            for i, v in zip(need, remote, strict=True):
                out[i] = v
                if v is not None and self.promote:
                    try:
                        self.local.put(keys[i], v)
                    except StoreFullError:  # larger than the local cap: serve it, do not cache it
                        pass
        if touch:
            with self._lock:
                self.tier_hits["remote"] += sum(v is not None for v in remote)
                self.tier_hits["local"] += len(keys) - len(need)
                self._misses += sum(v is None for v in out)
        return out

    def put(self, key: str, value: bytes) -> None:
        self.put_many([(key, value)])

    def put_many(self, items: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> None:
        """Local first (its errors propagate, except a value too big for the local cap), then remote."""
        items = list(items.items() if isinstance(items, Mapping) else items)
        try:
            self.local.put_many(items)
            local_ok = True
        except StoreFullError:
            local_ok = False
        if not local_ok:  # at least one value is bigger than the local cap: the remote must take it
            self.remote.put_many(items)
            return
        if self._remote("put", lambda: self.remote.put_many(items), False) is False:
            self.failed_writes += 1  # the local copy is kept; the shared tier lacks it

    def contains(self, key: str) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: Iterable[str]) -> list[bool]:
        keys = list(keys)
        out = self.local.contains_many(keys)
        need = [i for i, x in enumerate(out) if not x]
        if need:
            found = self._remote("contains", lambda: self.remote.contains_many([keys[i] for i in need]), [])
            for i, x in zip(need, found, strict=False):
                out[i] = x
        return out

    def delete(self, key: str) -> bool:
        here = self.local.delete(key)
        there = self._remote("delete", lambda: self.remote.delete(key), False)
        return here or there

    def entries(self) -> Iterator[tuple[str, EntryStats]]:
        """The remote's entries, or the local's while the remote is down."""
        rows = self._remote("entries", lambda: list(self.remote.entries()), None)
        yield from self.local.entries() if rows is None else rows

    def evict_to(self, max_bytes: int) -> list[str]:
        return self.local.evict_to(max_bytes)

    def stats(self) -> StoreStats:
        loc = self.local.stats()
        rem = self._remote("stats", self.remote.stats, None)
        shared = loc if rem is None else rem
        return StoreStats(
            sum(self.tier_hits.values()), self._misses, loc.evictions, shared.bytes, shared.entries,
            loc.max_bytes, loc.file_bytes, loc.failed_writes + self.failed_writes,
        )  # fmt: skip

    def close(self) -> None:
        try:
            self.remote.close()
        finally:
            self.local.close()

    def __repr__(self) -> str:
        return f"TieredStore({self.local!r}, {self.remote!r})"
