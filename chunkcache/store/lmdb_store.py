"""The default chunk store: entries in one LMDB environment, safe across processes and threads.

    with LMDBStore("cache.lmdb", max_bytes=50 * 10**9, eviction="cost") as store:
        store.put(key, entry); store.get(key)
        with store.views([key]) as [view]:       # zero-copy view of the map, valid in the block
            header = read_header(view)

What it knows: LMDB (transactions, map growth, reader slots), the file's own layout where a
damaged or truncated file must be refused at open instead of crashing the process on first read
(SIGBUS), access bookkeeping. What it does not know: the entry format (beyond the token count).
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

import lmdb

from chunkcache.errors import StoreError, StoreFullError, StoreReadOnlyError

from .base import Clock, EntryStats, SpanReader, Store, StoreStats, entry_tokens
from .eviction import get_policy, pick_victims

__all__ = ["LMDBStore", "check_data_file", "preflight"]

_META = struct.Struct("<QQQqq")  # nbytes, tokens, hits, last_access, created
_TOTAL = b"total_bytes"
_OPEN_PATHS: dict[str, int] = {}  # realpath -> pid, to refuse opening one environment twice per process
_LMDB_MAGIC = 0xBEEFC0DE
_MIN_FREE = 1 << 20  # bytes a new store needs on its file system (meta pages, the first commits)
_DBS = (b"chunks", b"access", b"info")


def _kb(key: str) -> bytes:
    """Key -> LMDB key bytes. ``surrogateescape`` round-trips keys that were not UTF-8 on disk."""
    return key.encode("utf-8", "surrogateescape")


def _ks(kb: bytes | memoryview) -> str:
    return bytes(kb).decode("utf-8", "surrogateescape")


def _os_error(e: BaseException, path: str, action: str) -> StoreError:
    text = str(e)
    if isinstance(e, PermissionError) or "Permission denied" in text or "Read-only file system" in text:
        return StoreReadOnlyError(
            f"cannot {action} chunk store at {path}: {text}; open it with readonly=True "
            "(ChunkCache(store=..., readonly=True), open_store(path, readonly=True)) to read it"
        )
    if "No space left" in text or "Disk quota" in text:
        return StoreFullError(f"cannot {action} chunk store at {path}: the disk is full ({text})")
    return StoreError(f"cannot {action} chunk store at {path}: {text}")


def check_data_file(path: str) -> None:
    """Raise ``StoreError`` if ``path/data.mdb`` is shorter than LMDB's newest meta page says it
    is (a partial copy, a truncated file): LMDB maps the file and would die with SIGBUS on the
    first read of a missing page. Reads the two meta pages (page 0 and 1: magic, page size, last
    page number, transaction id) of the 64-bit LMDB layout."""
    data = os.path.join(path, "data.mdb")
    try:
        size = os.path.getsize(data)
        if size == 0:
            return  # a new environment: LMDB initialises it
        with open(data, "rb") as f:
            head = f.read(2 * 65536)
    except OSError:
        return  # lmdb.open reports it
    metas = []
    psize = struct.unpack_from("<I", head, 40)[0] if len(head) >= 44 else 0
    for page in (0, psize):
        if not 4096 <= psize <= 65536 or len(head) < page + 152:
            break
        magic, _ = struct.unpack_from("<II", head, page + 16)
        last_pg, txnid = struct.unpack_from("<QQ", head, page + 136)
        if magic == _LMDB_MAGIC:
            metas.append((txnid, last_pg))
    if not metas:
        raise StoreError(
            f"{data} is not an LMDB file or is truncated ({size} bytes, no valid meta page): "
            "restore it from a full copy or delete the store"
        )
    need = (max(metas)[1] + 1) * psize
    if size < need:
        raise StoreError(
            f"{data} is truncated: {size} of {need} bytes (a partial copy?); reading it would crash "
            "the process (SIGBUS): restore it from a full copy or delete the store"
        )


def preflight(path: str, create: bool) -> None:
    """Refuse (``StoreError``) to open the LMDB environment at ``path`` where LMDB would crash the
    process with SIGBUS: a truncated data file (``check_data_file``), or, when it would be
    created (``create`` and no data file yet), a file system with less than ``_MIN_FREE`` bytes
    free (``StoreFullError``). For every LMDB environment chunkcache opens (stores, sidecars)."""
    data = os.path.join(path, "data.mdb")
    if create and (not os.path.isfile(data) or os.path.getsize(data) == 0):
        try:
            st = os.statvfs(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
        except OSError:
            st = None
        free = None if st is None else st.f_bavail * st.f_frsize
        if free is not None and free < _MIN_FREE:
            raise StoreFullError(
                f"cannot create an LMDB environment at {path}: the disk is full ({free} bytes free, "
                f"it needs {_MIN_FREE})"
            )
    check_data_file(path)


class _NoRoom(Exception):
    """A write that would have to grow the map, where growing is not allowed (``_write(grow=False)``)."""


class _MapLock:
    """Readers (every transaction) share it; moving the map (``set_mapsize``, ``close``) takes it
    alone, so no transaction and no zero-copy view outlives the mapping it points into. A thread
    that holds a read must not ask to move the map (that would wait for itself): it gets an error."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._moving = False
        self._mine = threading.local()

    @contextmanager
    def read(self) -> Iterator[None]:
        depth = getattr(self._mine, "n", 0)
        with self._cond:
            while self._moving and depth == 0:  # a thread already reading may nest freely
                self._cond.wait()
            self._readers += 1
        self._mine.n = depth + 1
        try:
            yield
        finally:
            self._mine.n = depth
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def move(self, what: str) -> Iterator[None]:
        held = getattr(self._mine, "n", 0)
        if held:
            raise StoreError(
                f"cannot {what} while this thread holds a read transaction or zero-copy views "
                "(leave the store.views() block first)"
            )
        with self._cond:
            while self._moving:
                self._cond.wait()
            self._moving = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._moving = False
                self._cond.notify_all()


class LMDBStore(Store):
    """Chunk entries in one LMDB environment (a directory holding data.mdb and lock.mdb).

    Sub-databases: ``chunks`` (key -> entry), ``access`` (key -> EntryStats, 40 bytes) and ``info``
    (the running byte total). A put, its evictions and the total change commit in one transaction,
    so a writer killed at any point leaves a store where every entry is whole and the bookkeeping
    agrees with it (LMDB is copy-on-write; the reader never sees a half-written entry).

    Concurrency: any number of reader processes and one writer at a time (LMDB serialises writers
    across processes); any number of threads on one handle. Growing the map moves it, so every
    transaction and every ``views`` block holds a shared lock that the resize takes alone
    (``_MapLock``): a zero-copy view is never read after its mapping moved. One handle per path
    per process; a handle must not cross ``fork()``: it records its pid and refuses use in a child
    (open a new store there, or use ``spawn``).

    At open, a truncated ``data.mdb`` (``check_data_file``) and a damaged index are refused with a
    ``StoreError`` (LMDB itself would crash the process with SIGBUS, or a writer would build a
    new index over the damage); a new store needs ``_MIN_FREE`` bytes free on its file system.
    ``readonly=True`` opens a store whose directory this user cannot write (permissions or
    read-only media): without LMDB's lock file, see ``__init__``.

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
        self.policy = get_policy(eviction)
        self.readonly = readonly
        self._pid = os.getpid()
        self._env: lmdb.Environment | None = None
        self._clock = Clock()
        self._lock = threading.RLock()
        self._map = _MapLock()
        self._pending: dict[bytes, list[int]] = {}  # key -> [last_access, extra hits]
        self._pending_hits = 0
        self._last_flush = time.monotonic()
        self._hits = self._misses = self._evictions = 0
        self.failed_writes = 0
        self._real = os.path.realpath(self.path)
        self._unmap_hooks: list[Callable[[], None]] = []
        self._records_handle = None
        if _OPEN_PATHS.get(self._real) == self._pid:
            raise StoreError(f"chunk store {self.path} is already open in this process; reuse that handle")
        data = os.path.join(self.path, "data.mdb")
        if readonly and not os.path.isfile(data):
            raise StoreError(f"no chunk store at {self.path} (data.mdb missing)")
        if not readonly:
            try:
                os.makedirs(self.path, exist_ok=True)
            except OSError as e:
                raise _os_error(e, self.path, "create") from None
        preflight(self.path, create=not readonly)
        opts = dict(map_size=map_size, max_dbs=self.MAX_DBS, readonly=readonly, writemap=False, meminit=False)
        try:
            env = lmdb.open(self.path, max_readers=512, **opts)
        except lmdb.Error as e:
            text = str(e)
            if not (readonly and ("Read-only file system" in text or "Permission denied" in text)):
                raise _os_error(e, self.path, "open") from None
            # The lock file cannot be written (read-only media, or permissions: a store made by
            # another user). Without it this handle cannot announce itself to writers, so LMDB
            # could reuse pages it still reads; read-only media have no writers, and a store
            # whose directory we may not write is read at the owner's risk: warn in that case.
            if "Permission denied" in text:
                warnings.warn(
                    f"chunkcache: {self.path} is not writable by this user; reading it without "
                    "LMDB's lock file (safe only while no other process writes to it)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            try:
                env = lmdb.open(self.path, lock=False, **opts)
            except lmdb.Error as e2:
                raise _os_error(e2, self.path, "open") from None
        try:
            if not readonly:
                env.reader_check()  # clear reader slots left by killed processes
            self._open_dbs(env)
        except BaseException:
            env.close()
            raise
        self._env = env
        _OPEN_PATHS[self._real] = self._pid

    def _open_dbs(self, env: lmdb.Environment) -> None:
        """Open the three sub-databases; tell a foreign LMDB environment from a damaged one."""
        try:
            with env.begin() as txn:
                names = [bytes(k) for k, _ in txn.cursor()]  # the main database: sub-database names
        except lmdb.Error as e:
            raise StoreError(
                f"chunk store {self.path} is damaged: its LMDB index cannot be read ({e}); "
                "restore it from a copy or delete it (no writes were made)"
            ) from None
        present = [n for n in _DBS if n in names]
        if present and len(present) < len(_DBS) or (not present and names):
            what = (
                "is damaged (some of its databases are missing)" if present else "is not a chunkcache store"
            )
            raise StoreError(
                f"{self.path} {what}: its LMDB index lists {sorted(n.decode(errors='replace') for n in names)}; "
                "no writes were made"
            )
        if not present and env.info()["last_pgno"] > 1:
            # pages were written but the index lists nothing: the index itself was lost
            raise StoreError(
                f"chunk store {self.path} is damaged: its index lists no databases although the file "
                f"holds {env.info()['last_pgno'] + 1} pages; restore it or delete it (no writes were made)"
            )
        try:
            self._db = env.open_db(b"chunks", create=not self.readonly)
            self._access = env.open_db(b"access", create=not self.readonly)
            self._info = env.open_db(b"info", create=not self.readonly)
        except lmdb.NotFoundError:
            raise StoreError(f"{self.path} is an LMDB environment but not a chunkcache store") from None
        except lmdb.Error as e:
            raise StoreError(f"chunk store {self.path} is damaged: {e}") from None

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

    @contextmanager
    def mapping(self) -> Iterator[str]:
        """The path of the mapped data file, with the map held in place (no resize, no close)
        for the block: for whatever registers the map's addresses (``hostmap``)."""
        with self._map.read():
            self._check()
            yield os.path.join(self.path, "data.mdb")

    def on_unmap(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` once, just before this handle unmaps its memory map (``close``, or growing
        the map, which may move it). For whatever holds addresses inside the map (``hostmap``)."""
        self._unmap_hooks.append(hook)

    def _unmapping(self) -> None:
        hooks, self._unmap_hooks = self._unmap_hooks, []
        for hook in hooks:
            hook()

    def _resize(self, size: int) -> None:
        """Move the map to ``size`` bytes (0: adopt the size another process set), alone."""
        env = self._check()
        with self._map.move("grow the store's map"):
            self._unmapping()
            env.set_mapsize(size)

    @contextmanager
    def _txn(self, write: bool = False, buffers: bool = False) -> Iterator[lmdb.Transaction]:
        """A transaction under the shared map lock; committed on a clean exit (write), else aborted."""
        env = self._check()
        for attempt in range(3):
            with self._map.read():
                try:
                    txn = env.begin(write=write, buffers=buffers)
                except lmdb.MapResizedError:  # another process grew the map: adopt its size
                    txn = None
                if txn is not None:
                    try:
                        yield txn
                    except BaseException:
                        txn.abort()
                        raise
                    if write:
                        txn.commit()
                    else:
                        txn.abort()
                    return
            if attempt == 2:
                raise StoreError(f"chunk store {self.path}: the map keeps being resized by another process")
            self._resize(0)

    def _write(self, fn: Callable[[lmdb.Transaction], object], nbytes: int = 0, grow: bool = True) -> object:
        """Run ``fn`` in one write transaction (with pending access facts), growing the map as needed
        (``grow=False``: raise ``_NoRoom`` instead, for callers that may hold ``self._lock``)."""
        if self.readonly:
            raise StoreReadOnlyError(
                f"chunk store {self.path} was opened read-only (readonly=True); open it without it to write"
            )
        env = self._check()
        while True:
            with self._lock:
                pending, evictions = dict(self._pending), self._evictions
                try:
                    with self._txn(write=True) as txn:
                        self._flush_into(txn, pending)
                        result = fn(txn)
                except lmdb.MapFullError:  # aborted: nothing happened; grow (below) and redo it all
                    self._pending, self._evictions = pending, evictions
                    size = max(env.info()["map_size"] * 2, nbytes * 4)
                except lmdb.Error as e:
                    self._pending, self._evictions = pending, evictions
                    self.failed_writes += 1
                    raise self._write_error(e, nbytes) from None
                except BaseException:
                    self._pending, self._evictions = pending, evictions
                    raise
                else:
                    self._pending, self._pending_hits = {}, 0  # flushed (gets wait on the lock meanwhile)
                    self._last_flush = time.monotonic()
                    return result
            # outside self._lock: a reader inside views() may need it (touching a get) before it
            # leaves, and the resize waits for every reader to leave
            if not grow:
                raise _NoRoom()
            self._resize(size)

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
                self._write(lambda txn: None, grow=False)  # called under self._lock: never resize here
            except _NoRoom:  # the map is full: the next put grows it and flushes these
                pass
            except StoreError as e:  # a read must not fail because bookkeeping could not be written
                self.failed_writes -= 1  # not a put
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
            kb = bytes(kb)
            if kb == exclude:
                continue
            nbytes, tokens, hits, last, created = _META.unpack(raw)
            p = self._pending.get(kb) if overlay else None
            if p is not None:
                hits, last = hits + p[1], max(last, p[0])
            out.append((_ks(kb), EntryStats(nbytes, tokens, hits, last, created)))
        return out

    def _evict_in(self, txn: lmdb.Transaction, free_bytes: int, exclude: bytes | None = None) -> list[str]:
        victims = pick_victims(self._read_entries(txn, exclude), free_bytes, self.policy)
        total = self._total(txn)
        for k in victims:
            total -= self._delete_in(txn, _kb(k))
        txn.put(_TOTAL, struct.pack("<Q", max(total, 0)), db=self._info)
        self._evictions += len(victims)
        return victims

    def _delete_in(self, txn: lmdb.Transaction, kb: bytes) -> int:
        raw = txn.pop(kb, db=self._access)
        txn.delete(kb, db=self._db)
        self._pending.pop(kb, None)
        return 0 if raw is None else _META.unpack(raw)[0]

    def _valid(self, kb: bytes) -> bool:
        """LMDB keys are 1..511 bytes; any other key is simply absent."""
        return 0 < len(kb) <= 511

    # -- the Store interface ------------------------------------------------------------------

    def _records_db(self, create: bool):
        """The ``records`` sub-database (opened on first use; None if it does not exist yet)."""
        if self._records_handle is None:
            env = self._check()
            with self._lock, self._map.read():
                try:
                    self._records_handle = env.open_db(b"records", create=create and not self.readonly)
                except lmdb.NotFoundError:
                    return None
                except lmdb.Error as e:  # creating it is a write (a full disk, ...)
                    raise self._write_error(e, 4096) from None
        return self._records_handle

    def get_record(self, name: str) -> dict | None:
        """A small JSON record in the ``records`` sub-database (beside the entries, never one of them)."""
        db = self._records_db(create=False)
        if db is None:
            return None
        with self._txn() as txn:
            value = txn.get(name.encode(), db=db)
        return None if value is None else json.loads(bytes(value))

    def put_record(self, name: str, record: dict) -> None:
        value = json.dumps(record, sort_keys=True).encode()
        db = self._records_db(create=True)
        self._write(lambda txn: txn.put(name.encode(), value, db=db), len(value))

    def get(self, key: str, *, touch: bool = True) -> bytes | None:
        kb = _kb(key)
        value = None
        if self._valid(kb):
            with self._txn() as txn:
                value = txn.get(kb, db=self._db)
        if touch:
            with self._lock:
                self._count_access(kb, value)
                if value is not None:
                    self._maybe_flush()
        return value

    def _count_access(self, kb: bytes, value) -> None:
        """A hit or a miss in the stats; a hit's access time and count wait in ``_pending`` for the
        next flush. Called under ``self._lock``."""
        if value is None:
            self._misses += 1
            return
        self._hits += 1
        rec = self._pending.get(kb)
        self._pending[kb] = [self._clock(), 1 + (rec[1] if rec else 0)]
        self._pending_hits += 1

    def get_many(self, keys: Iterable[str]) -> list[bytes | None]:
        kbs = [_kb(k) for k in keys]
        with self._txn() as txn:
            values = [txn.get(kb, db=self._db) if self._valid(kb) else None for kb in kbs]
        with self._lock:
            for kb, v in zip(kbs, values, strict=True):
                self._count_access(kb, v)
            self._maybe_flush()
        return values

    @contextmanager
    def views(self, keys: Sequence[str]) -> Iterator[list]:
        """Zero-copy views of the values under ``keys`` (None for a missing one), valid only inside
        the block: one read transaction with ``buffers=True``, held under the map lock so that no
        other thread's growing ``put`` moves the map meanwhile (it waits for the block to end).
        Do not write to this store from inside the block (a write that must grow the map raises)."""
        with self._txn(buffers=True) as txn:
            yield [txn.get(kb, db=self._db) if self._valid(kb) else None for kb in map(_kb, keys)]

    def span_reader(self, keys: Sequence[str]) -> SpanReader:
        """Spans sliced straight from the map (``_LMDBSpans``): only the bytes asked for are copied."""
        return _LMDBSpans(self, keys)

    def read_prefix(self, key: str, nbytes: int) -> bytes | None:
        kb = _kb(key)
        if not self._valid(kb):
            return None
        with self._txn(buffers=True) as txn:
            v = txn.get(kb, db=self._db)
            return None if v is None else bytes(v[:nbytes])

    def sample_keys(self, n: int) -> list[str]:
        out = []
        with self._txn() as txn:
            cur = txn.cursor(db=self._access)
            for kb in cur.iternext(keys=True, values=False):
                if len(out) >= n:
                    break
                out.append(_ks(kb))
        return out

    def put(self, key: str, value: bytes) -> None:
        self.put_many([(key, value)])

    def put_many(self, items: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> None:
        """All items in one transaction: either every one is stored or none is."""
        items = list(items.items() if isinstance(items, Mapping) else items)
        for k, v in items:
            if not self._valid(_kb(k)):
                raise ValueError(f"store keys must be 1 to 511 bytes, got {len(_kb(k))}")
            if self.max_bytes is not None and len(v) > self.max_bytes:
                self.failed_writes += 1
                raise StoreFullError(
                    f"value for {k} ({len(v)} bytes) cannot fit under max_bytes={self.max_bytes}"
                )
        metas = [(_kb(k), v, entry_tokens(v)) for k, v in items]

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
        return self.contains_many([key])[0]

    def contains_many(self, keys: Iterable[str]) -> list[bool]:
        with self._txn() as txn:
            return [self._valid(kb) and txn.get(kb, db=self._access) is not None for kb in map(_kb, keys)]

    def delete(self, key: str) -> bool:
        kb = _kb(key)
        if not self._valid(kb):
            return False

        def fn(txn: lmdb.Transaction) -> bool:
            if txn.get(kb, db=self._access) is None and txn.get(kb, db=self._db) is None:
                return False
            nbytes = self._delete_in(txn, kb)
            txn.put(_TOTAL, struct.pack("<Q", max(self._total(txn) - nbytes, 0)), db=self._info)
            return True

        return bool(self._write(fn))

    def entries(self) -> Iterator[tuple[str, EntryStats]]:
        with self._lock, self._txn() as txn:
            snapshot = self._read_entries(txn, overlay=True)  # copy out: no long-lived read transaction
        yield from snapshot

    def evict_to(self, max_bytes: int) -> list[str]:
        return list(self._write(lambda txn: self._evict_in(txn, self._total(txn) - max_bytes)))

    def stats(self) -> StoreStats:
        with self._txn() as txn:
            total, entries = self._total(txn), txn.stat(self._db)["entries"]
        try:
            file_bytes = os.path.getsize(os.path.join(self.path, "data.mdb"))
        except OSError:
            file_bytes = None
        return StoreStats(
            self._hits, self._misses, self._evictions, total, entries, self.max_bytes, file_bytes,
            self.failed_writes,
        )  # fmt: skip

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
        with self._map.move("close the store"):
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


class _LMDBSpans(SpanReader):
    """``SpanReader`` over the map: ``views`` of the entries from the first ``read`` to ``close``
    (one read transaction, on the thread that reads: growing writes wait for it), each span a
    zero-copy slice. Like ``views``, it counts no hits."""

    def __init__(self, store: LMDBStore, keys: Sequence[str]) -> None:
        super().__init__(store, keys)
        self._block = None
        self._values: list | None = None

    def read(self, spans: Sequence[tuple[int, int, int]]) -> list:
        if self._values is None:
            self._block = self.store.views(self.keys)
            self._values = [None if v is None else memoryview(v).cast("B") for v in self._block.__enter__()]
        for i, _, _ in spans:
            if self._values[i] is None:
                raise KeyError(f"chunk {self.keys[i]} is not in the store")
        return [self._values[i][a:b] for i, a, b in spans]

    def close(self) -> None:
        if self._block is not None:
            self._values, block, self._block = None, self._block, None
            block.__exit__(None, None, None)
