"""Persistent chunk stores behind one small interface, and ``open_store`` to pick one.

One module per concern: ``base`` (the ``Store`` interface and its records), ``eviction``
(policies as sort keys), ``memory`` (a dict, for tests), ``lmdb_store`` (the default),
``redis_store`` (shared, optional dependency), ``tiered`` (local in front of shared), ``throttled``
(a store behind a link of fixed bandwidth, for tests and emulations), ``check``
(verify every entry, remove stale ones, sample headers to tell whose entries a store holds).

    with open_store("cache.lmdb") as store:        # None -> MemoryStore, a path -> LMDBStore
        store.put(key, pack_chunk(chunk, "int4", key_info))
        chunk = load_chunk(store, key)             # None on a miss or a damaged entry
"""

from __future__ import annotations

import os

from chunkcache.format import load_chunk

from .base import EntryStats, Store, StoreStats
from .check import foreign_store, remove_stale, sample_key_infos, verify_store
from .eviction import EVICTION_POLICIES, get_policy, pick_victims
from .lmdb_store import LMDBStore
from .memory import MemoryStore

__all__ = [
    "EVICTION_POLICIES",
    "EntryStats",
    "LMDBStore",
    "MemoryStore",
    "Store",
    "StoreStats",
    "foreign_store",
    "get_policy",
    "load_chunk",  # defined in format, re-exported here
    "open_store",
    "pick_victims",
    "remove_stale",
    "sample_key_infos",
    "verify_store",
]


def open_store(spec: str | os.PathLike | Store | None, **kwargs) -> Store:
    """None or ":memory:" -> MemoryStore; a Store -> itself; a path -> LMDBStore(path, **kwargs)
    (``readonly=True`` for a store this user may not write); a ``redis://`` / ``rediss://`` URL ->
    RedisStore(url, **kwargs) (see ``redis_store``)."""
    if isinstance(spec, Store):
        return spec
    if spec is None or spec == ":memory:":
        kwargs.pop("readonly", None)
        return MemoryStore(**kwargs)
    if isinstance(spec, str) and spec.startswith(("redis://", "rediss://")):
        from .redis_store import RedisStore  # optional dependency: imported only when asked for

        kwargs.pop("readonly", None)
        return RedisStore(spec, **kwargs)
    return LMDBStore(spec, **kwargs)
