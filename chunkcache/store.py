"""Persistent chunk stores: a small key -> bytes interface, an LMDB implementation, eviction policies.

A store maps a chunk key (``keys.chunk_key``) to one entry (``format.pack_chunk``) and keeps
per-entry access facts (last access, hits, size, tokens) for eviction. It does not decode entries
except to read the token count from a header at ``put``; ``load_chunk`` is the one place that
turns a stored value into a ``ChunkKV`` (and drops damaged entries).

    with open_store("cache.lmdb") as store:        # None -> MemoryStore, a path -> LMDBStore
        store.put(key, pack_chunk(chunk, "int4", key_info))
        chunk = load_chunk(store, key)             # None on a miss or a damaged entry

Eviction policies only return a sort key (SGLang style); the entry with the smallest key goes
first. ``lru``: oldest last access. ``cost`` (Cache-Craft): reuse frequency x recompute time saved
per stored byte, with recompute time taken as proportional to the chunk's tokens.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import lmdb

from .errors import CorruptEntryError, StoreError, StoreFullError, StoreReadOnlyError
from .format import load_chunk, read_header, verify_entry

__all__ = [
    "EVICTION_POLICIES",
    "EntryStats",
    "LMDBStore",
    "MemoryStore",
    "Store",
    "StoreStats",
    "load_chunk",  # defined in format, re-exported here
    "open_store",
    "pick_victims",
    "verify_store",
]


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


class EvictionPolicy(Protocol):
    def sort_key(self, e: EntryStats) -> tuple: ...


class LRU:
    """Least recently used first."""

    def sort_key(self, e: EntryStats) -> tuple:
        return (e.last_access,)


class Cost:
    """Cache-Craft style: keep what is reused often and expensive to recompute per byte it costs.

    value = (hits + 1) * tokens / nbytes  (recompute time ~ tokens); lowest value goes first,
    ties broken by age of last access.
    """

    def sort_key(self, e: EntryStats) -> tuple:
        return ((e.hits + 1) * e.tokens / max(e.nbytes, 1), e.last_access)


EVICTION_POLICIES: dict[str, EvictionPolicy] = {"lru": LRU(), "cost": Cost()}


def pick_victims(
    entries: Iterable[tuple[str, EntryStats]], free_bytes: int, policy: EvictionPolicy
) -> list[str]:
    """Keys to remove, in order, until at least ``free_bytes`` are freed (all keys if that is not enough)."""
    if free_bytes <= 0:
        return []
    victims, freed = [], 0
    for key, e in sorted(entries, key=lambda ke: (policy.sort_key(ke[1]), ke[0])):
        victims.append(key)
        freed += e.nbytes
        if freed >= free_bytes:
            break
    return victims


def _policy(name: str) -> EvictionPolicy:
    try:
        return EVICTION_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(EVICTION_POLICIES)}") from None


def _entry_tokens(value: bytes | memoryview) -> int:
    try:
        return int(read_header(value)["num_tokens"])
    except (CorruptEntryError, KeyError, TypeError, ValueError):
        return 0


class _Clock:
    """time.time_ns(), made strictly increasing so that access order is never a tie."""

    def __init__(self) -> None:
        self._last = 0

    def __call__(self) -> int:
        self._last = max(time.time_ns(), self._last + 1)
        return self._last


class Store(ABC):
    """A key -> bytes chunk store. Batch forms and iteration helpers are built on the abstract core."""

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


class MemoryStore(Store):
    """A dict in this process. For tests and for runs that need no persistence."""

    def __init__(self, max_bytes: int | None = None, eviction: Literal["lru", "cost"] = "lru") -> None:
        self.max_bytes = max_bytes
        self.policy = _policy(eviction)
        self._data: dict[str, bytes] = {}
        self._meta: dict[str, EntryStats] = {}
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._clock = _Clock()
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
            self._meta[key] = EntryStats(len(value), _entry_tokens(value), hits, now, created)
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
                self._hits, self._misses, self._evictions, self._bytes, len(self._data), self.max_bytes
            )


_META = struct.Struct("<QQQqq")  # nbytes, tokens, hits, last_access, created
_TOTAL = b"total_bytes"
_OPEN_PATHS: dict[str, int] = {}  # realpath -> pid, to refuse opening one environment twice per process


def _os_error(e: BaseException, path: str, action: str) -> StoreError:
    text = str(e)
    if isinstance(e, PermissionError) or "Permission denied" in text or "Read-only file system" in text:
        return StoreReadOnlyError(
            f"cannot {action} chunk store at {path}: {text}; open it with readonly=True to read"
        )
    if "No space left" in text or "Disk quota" in text:
        return StoreFullError(f"cannot {action} chunk store at {path}: the disk is full ({text})")
    return StoreError(f"cannot {action} chunk store at {path}: {text}")


class LMDBStore(Store):
    """Chunk entries in one LMDB environment (a directory holding data.mdb and lock.mdb).

    Sub-databases: ``chunks`` (key -> entry), ``access`` (key -> EntryStats, 40 bytes) and ``info``
    (the running byte total). A put, its evictions and the total change commit in one transaction,
    so a writer killed at any point leaves a store where every entry is whole and the bookkeeping
    agrees with it (LMDB is copy-on-write; the reader never sees a half-written entry).

    Concurrency: any number of reader processes and one writer at a time (LMDB serialises writers
    across processes). One handle per path per process; a handle must not cross ``fork()``: it
    records its pid and refuses use in a child (open a new store there, or use ``spawn``).

    ``writemap`` stays off. With ``writemap=True`` LMDB writes pages through a shared mmap of a
    sparse file: writes are faster (0.74 vs 0.16 GB/s measured here), but a full disk then kills the
    process with SIGBUS instead of failing the commit, so "full disk gives a clear error and
    loses nothing committed" could not hold; stray writes into the map could also damage pages.

    Access facts on ``get`` are amortised: hits and access times collect in memory and are written
    with the next write transaction, or by ``get`` every ``ACCESS_FLUSH_EVERY`` hits or
    ``ACCESS_FLUSH_SECONDS`` seconds, so reads stay read-only transactions. Another process sees
    them only after that flush; a read-only handle never writes them.

    The map starts at ``map_size`` bytes (a sparse file) and doubles whenever a write hits
    ``MapFullError``; the write is retried, nothing is lost.
    """

    ACCESS_FLUSH_EVERY = 256
    ACCESS_FLUSH_SECONDS = 1.0
    MAX_DBS = 4

    def __init__(
        self,
        path: str | os.PathLike,
        map_size: int = 1 << 30,
        max_bytes: int | None = None,
        eviction: Literal["lru", "cost"] = "lru",
        readonly: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.policy = _policy(eviction)
        self.readonly = readonly
        self._pid = os.getpid()
        self._env: lmdb.Environment | None = None
        self._clock = _Clock()
        self._lock = threading.RLock()
        self._pending: dict[bytes, list[int]] = {}  # key -> [last_access, extra hits]
        self._pending_hits = 0
        self._last_flush = time.monotonic()
        self._hits = self._misses = self._evictions = 0
        self._real = os.path.realpath(self.path)
        self._unmap_hooks: list[Callable[[], None]] = []
        self._records_handle = None
        if _OPEN_PATHS.get(self._real) == self._pid:
            raise StoreError(f"chunk store {self.path} is already open in this process; reuse that handle")
        if readonly and not os.path.isfile(os.path.join(self.path, "data.mdb")):
            raise StoreError(f"no chunk store at {self.path} (data.mdb missing)")
        if not readonly:
            try:
                os.makedirs(self.path, exist_ok=True)
            except OSError as e:
                raise _os_error(e, self.path, "create") from None
        opts = dict(map_size=map_size, max_dbs=self.MAX_DBS, readonly=readonly, writemap=False, meminit=False)
        try:
            env = lmdb.open(self.path, max_readers=512, **opts)
        except lmdb.Error as e:
            if not (readonly and "Read-only file system" in str(e)):
                raise _os_error(e, self.path, "open") from None
            try:  # read-only media: no writer can exist, so running without the lock file is safe
                env = lmdb.open(self.path, lock=False, **opts)
            except lmdb.Error as e2:
                raise _os_error(e2, self.path, "open") from None
        try:
            env.reader_check()  # clear reader slots left by killed processes
            self._db = env.open_db(b"chunks", create=not readonly)
            self._access = env.open_db(b"access", create=not readonly)
            self._info = env.open_db(b"info", create=not readonly)
        except lmdb.NotFoundError:
            env.close()
            raise StoreError(f"{self.path} is an LMDB environment but not a chunkcache store") from None
        except lmdb.Error as e:
            env.close()
            raise _os_error(e, self.path, "open") from None
        self._env = env
        _OPEN_PATHS[self._real] = self._pid

    # -- plumbing -----------------------------------------------------------------------------

    def _check(self) -> lmdb.Environment:
        if self._env is None:
            raise StoreError(f"chunk store {self.path} is closed")
        if os.getpid() != self._pid:
            raise StoreError(
                f"chunk store {self.path} was opened in process {self._pid} and carried into process "
                f"{os.getpid()} by fork; LMDB handles must not cross fork: open a new LMDBStore in the "
                "child (or start workers with multiprocessing 'spawn')"
            )
        return self._env

    def on_unmap(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` once, just before this handle unmaps its memory map (``close``, or growing
        the map, which may move it). For whatever holds addresses inside the map (``hostmap``)."""
        self._unmap_hooks.append(hook)

    def _unmapping(self) -> None:
        hooks, self._unmap_hooks = self._unmap_hooks, []
        for hook in hooks:
            hook()

    def _begin(self, write: bool = False) -> lmdb.Transaction:
        env = self._check()
        try:
            return env.begin(write=write)
        except lmdb.MapResizedError:  # another process grew the map: adopt its size
            self._unmapping()
            env.set_mapsize(0)
            return env.begin(write=write)

    def _write(self, fn: Callable[[lmdb.Transaction], object], nbytes: int = 0) -> object:
        """Run ``fn`` in one write transaction (with pending access facts), growing the map as needed."""
        if self.readonly:
            raise StoreReadOnlyError(f"chunk store {self.path} was opened read-only")
        env = self._check()
        with self._lock:
            while True:
                pending, evictions = dict(self._pending), self._evictions
                try:
                    with self._begin(write=True) as txn:
                        self._flush_into(txn, pending)
                        result = fn(txn)
                except lmdb.MapFullError:  # aborted: nothing happened; grow and redo it all
                    self._pending, self._evictions = pending, evictions
                    self._unmapping()
                    env.set_mapsize(max(env.info()["map_size"] * 2, nbytes * 4))
                    continue
                except lmdb.Error as e:
                    self._pending, self._evictions = pending, evictions
                    raise self._write_error(e, nbytes) from None
                except BaseException:
                    self._pending, self._evictions = pending, evictions
                    raise
                self._pending, self._pending_hits = {}, 0  # flushed (gets wait on the lock meanwhile)
                self._last_flush = time.monotonic()
                return result

    def _write_error(self, e: lmdb.Error, nbytes: int) -> StoreError:
        err = _os_error(e, self.path, "write to")
        if type(err) is StoreError:  # LMDB reports a short write on a full disk as EIO: check free space
            try:
                st = os.statvfs(self.path)
                free = st.f_bavail * st.f_frsize
            except OSError:
                free = None
            if free is not None and free < max(nbytes, 1) + (1 << 20):
                return StoreFullError(
                    f"cannot write to chunk store at {self.path}: the disk is full ({free} bytes free, "
                    f"write needs {nbytes}); nothing of this write was committed ({e})"
                )
        return err

    def _flush_into(self, txn: lmdb.Transaction, pending: dict[bytes, list[int]]) -> None:
        for kb, (last, hits) in pending.items():
            raw = txn.get(kb, db=self._access)
            if raw is None:
                continue
            nbytes, tokens, old_hits, old_last, created = _META.unpack(raw)
            txn.put(
                kb, _META.pack(nbytes, tokens, old_hits + hits, max(last, old_last), created), db=self._access
            )

    def _maybe_flush(self) -> None:
        if self.readonly:
            if len(self._pending) > 100_000:  # nowhere to write them: keep memory bounded
                self._pending.clear()
            return
        due = self._pending_hits >= self.ACCESS_FLUSH_EVERY
        if due or time.monotonic() - self._last_flush > self.ACCESS_FLUSH_SECONDS:
            try:
                self._write(lambda txn: None)
            except StoreError as e:  # a read must not fail because bookkeeping could not be written
                warnings.warn(f"chunkcache: could not record access times in {self.path}: {e}", stacklevel=3)

    def _total(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(_TOTAL, db=self._info)
        return 0 if raw is None else struct.unpack("<Q", raw)[0]

    def _read_entries(
        self, txn: lmdb.Transaction, exclude: bytes | None = None, overlay: bool = False
    ) -> list[tuple[str, EntryStats]]:
        """Entries as committed; ``overlay`` adds this handle's unflushed hits (read transactions only)."""
        out = []
        for kb, raw in txn.cursor(db=self._access):
            if kb == exclude:
                continue
            nbytes, tokens, hits, last, created = _META.unpack(raw)
            p = self._pending.get(bytes(kb)) if overlay else None
            if p is not None:
                hits, last = hits + p[1], max(last, p[0])
            out.append((bytes(kb).decode(), EntryStats(nbytes, tokens, hits, last, created)))
        return out

    def _evict_in(self, txn: lmdb.Transaction, free_bytes: int, exclude: bytes | None = None) -> list[str]:
        victims = pick_victims(self._read_entries(txn, exclude), free_bytes, self.policy)
        total = self._total(txn)
        for k in victims:
            total -= self._delete_in(txn, k.encode())
        txn.put(_TOTAL, struct.pack("<Q", max(total, 0)), db=self._info)
        self._evictions += len(victims)
        return victims

    def _delete_in(self, txn: lmdb.Transaction, kb: bytes) -> int:
        raw = txn.pop(kb, db=self._access)
        txn.delete(kb, db=self._db)
        self._pending.pop(kb, None)
        return 0 if raw is None else _META.unpack(raw)[0]

    # -- the Store interface ------------------------------------------------------------------

    def _records_db(self, create: bool):
        """The ``records`` sub-database (opened on first use; None if it does not exist yet)."""
        if self._records_handle is None:
            env = self._check()
            with self._lock:
                try:
                    self._records_handle = env.open_db(b"records", create=create and not self.readonly)
                except lmdb.NotFoundError:
                    return None
        return self._records_handle

    def get_record(self, name: str) -> dict | None:
        """A small JSON record in the ``records`` sub-database (beside the entries, never one of them)."""
        db = self._records_db(create=False)
        if db is None:
            return None
        with self._begin() as txn:
            value = txn.get(name.encode(), db=db)
        return None if value is None else json.loads(bytes(value))

    def put_record(self, name: str, record: dict) -> None:
        value = json.dumps(record, sort_keys=True).encode()
        db = self._records_db(create=True)
        self._write(lambda txn: txn.put(name.encode(), value, db=db), len(value))

    def get(self, key: str, *, touch: bool = True) -> bytes | None:
        kb = key.encode()
        with self._begin() as txn:
            value = txn.get(kb, db=self._db)
        if touch:
            with self._lock:
                if value is None:
                    self._misses += 1
                else:
                    self._hits += 1
                    rec = self._pending.get(kb)
                    self._pending[kb] = [self._clock(), 1 + (rec[1] if rec else 0)]
                    self._pending_hits += 1
                    self._maybe_flush()
        return value

    def get_many(self, keys: Iterable[str]) -> list[bytes | None]:
        keys = list(keys)
        with self._begin() as txn:
            values = [txn.get(k.encode(), db=self._db) for k in keys]
        with self._lock:
            for k, v in zip(keys, values, strict=True):
                if v is None:
                    self._misses += 1
                else:
                    self._hits += 1
                    rec = self._pending.get(k.encode())
                    self._pending[k.encode()] = [self._clock(), 1 + (rec[1] if rec else 0)]
                    self._pending_hits += 1
            self._maybe_flush()
        return values

    def put(self, key: str, value: bytes) -> None:
        self.put_many([(key, value)])

    def put_many(self, items: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> None:
        """All items in one transaction: either every one is stored or none is."""
        items = list(items.items() if isinstance(items, Mapping) else items)
        for k, v in items:
            if self.max_bytes is not None and len(v) > self.max_bytes:
                raise StoreFullError(
                    f"value for {k} ({len(v)} bytes) cannot fit under max_bytes={self.max_bytes}"
                )
        metas = [(k.encode(), v, _entry_tokens(v)) for k, v in items]

        def fn(txn: lmdb.Transaction) -> None:
            total = self._total(txn)
            for kb, v, tokens in metas:
                now = self._clock()
                hits, created = 0, now
                old = txn.get(kb, db=self._access)
                if old is not None:
                    o_nbytes, _, hits, _, created = _META.unpack(old)
                    total -= o_nbytes
                if self.max_bytes is not None and total + len(v) > self.max_bytes:
                    txn.put(_TOTAL, struct.pack("<Q", total), db=self._info)
                    self._evict_in(txn, total + len(v) - self.max_bytes, exclude=kb)
                    total = self._total(txn)
                txn.put(kb, v, db=self._db)
                txn.put(kb, _META.pack(len(v), tokens, hits, now, created), db=self._access)
                total += len(v)
            txn.put(_TOTAL, struct.pack("<Q", total), db=self._info)

        self._write(fn, nbytes=sum(len(v) for _, v, _ in metas))

    def contains(self, key: str) -> bool:
        with self._begin() as txn:
            return txn.get(key.encode(), db=self._access) is not None

    def contains_many(self, keys: Iterable[str]) -> list[bool]:
        with self._begin() as txn:
            return [txn.get(k.encode(), db=self._access) is not None for k in keys]

    def delete(self, key: str) -> bool:
        kb = key.encode()

        def fn(txn: lmdb.Transaction) -> bool:
            if txn.get(kb, db=self._access) is None and txn.get(kb, db=self._db) is None:
                return False
            nbytes = self._delete_in(txn, kb)
            txn.put(_TOTAL, struct.pack("<Q", max(self._total(txn) - nbytes, 0)), db=self._info)
            return True

        return bool(self._write(fn))

    def entries(self) -> Iterator[tuple[str, EntryStats]]:
        with self._lock, self._begin() as txn:
            snapshot = self._read_entries(txn, overlay=True)  # copy out: no long-lived read transaction
        yield from snapshot

    def evict_to(self, max_bytes: int) -> list[str]:
        return list(self._write(lambda txn: self._evict_in(txn, self._total(txn) - max_bytes)))

    def stats(self) -> StoreStats:
        with self._begin() as txn:
            total, entries = self._total(txn), txn.stat(self._db)["entries"]
        try:
            file_bytes = os.path.getsize(os.path.join(self.path, "data.mdb"))
        except OSError:
            file_bytes = None
        return StoreStats(
            self._hits, self._misses, self._evictions, total, entries, self.max_bytes, file_bytes
        )

    def flush(self) -> None:
        """Write pending access facts now (no-op when read-only)."""
        if not self.readonly and self._pending:
            self._write(lambda txn: None)

    def close(self) -> None:
        if self._env is None:
            return
        if os.getpid() != self._pid:  # inherited by fork: the parent owns it, just forget it here
            self._env = None
            return
        try:
            self.flush()
        except StoreError as e:
            warnings.warn(f"chunkcache: access times not saved on close: {e}", stacklevel=2)
        self._unmapping()
        self._env.close()
        self._env = None
        _OPEN_PATHS.pop(self._real, None)

    def __del__(self) -> None:
        try:
            if self._env is not None and os.getpid() == self._pid:
                self._unmapping()
                self._env.close()
                _OPEN_PATHS.pop(self._real, None)
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"LMDBStore({self.path!r}, readonly={self.readonly})"


def open_store(spec: str | os.PathLike | Store | None, **kwargs) -> Store:
    """None or ":memory:" -> MemoryStore; a Store -> itself; a path -> LMDBStore(path, **kwargs);
    a ``redis://`` / ``rediss://`` URL -> RedisStore(url, **kwargs) (see ``redis_store``)."""
    if isinstance(spec, Store):
        return spec
    if spec is None or spec == ":memory:":
        return MemoryStore(**kwargs)
    if isinstance(spec, str) and spec.startswith(("redis://", "rediss://")):
        from .redis_store import RedisStore  # optional dependency: imported only when asked for

        return RedisStore(spec, **kwargs)
    return LMDBStore(spec, **kwargs)


def verify_store(store: Store, delete: bool = False) -> list[tuple[str, str]]:
    """Check every entry's header and checksums; the (key, reason) of each damaged one.

    Reads do not count as hits. With ``delete`` the damaged entries are removed.
    """
    bad = []
    for key in list(store.keys()):
        raw = store.get(key, touch=False)
        reason = "missing value" if raw is None else verify_entry(raw)
        if reason is not None:
            bad.append((key, reason))
            if delete:
                store.delete(key)
    return bad
