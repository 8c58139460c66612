"""A chunk store on Redis (one server or a Redis Cluster), behind the same ``Store`` interface.

Several serving machines share one set of chunk caches: the same keys (``keys.chunk_key``), the
same entry bytes (``format.pack_chunk``: header, checksums, codecs) as LMDB; only where the bytes
live changes. It knows nothing about models or decoding, except that ``get_layers`` reads an
entry's header to fetch a subset of layers.

    store = RedisStore("redis://10.0.0.5:6379/0", socket_timeout=2.0)   # or open_store(url)
    store.put(key, pack_chunk(chunk, "int4", key_info))
    chunk = load_chunk(store, key)            # None on a miss, a damaged entry or Redis down

Layout of one entry (``K`` = the chunk key, default prefix ``chunkcache:``)::

    chunkcache:{K}     hash  n, pb, nbytes, tokens, crc   | p0 | p1 | ... | p(n-1) |
                             (pieces of <= pb bytes, default 1 MiB, crc = crc32 of each piece)
    chunkcache:{K}:a   hash  hits, last, created           (access facts, for eviction and ls)

One hash per entry: a put is a single HSET (atomic: a reader sees the old pieces or the new ones,
never a mix), a get is a single HGETALL, Redis's own ``maxmemory`` eviction removes whole entries,
and the ``{K}`` hash tag puts both keys in one cluster slot, so one pipeline reaches them. Pieces
keep every value far below Redis's limits (a 512-token Llama-3-8B bf16 chunk is 64 pieces of
1 MiB, not one 64 MiB string) and let ``get_range``/``get_layers`` move only the pieces they need.

Faults: every call is bounded by ``socket_connect_timeout``/``socket_timeout`` (times
``1 + retries``). A connection error or timeout warns once, then the store counts as down for
``down_seconds``: reads answer "miss" at once, writes raise ``RemoteUnavailableError`` (a
``StoreError``; ``TieredStore`` keeps the local copy). Damaged values are caught by the entry
checksums in ``load_chunk`` (and per piece in ``get_range``), never used.
"""

from __future__ import annotations

import threading
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import torch  # noqa: F401 - get_layers returns tensors

from chunkcache.errors import CorruptEntryError, StoreError, StoreFullError
from chunkcache.format import PREFIX_BYTES, header_span, layer_spans, read_header, section_views

from .base import Clock, EntryStats, SpanReader, Store, StoreStats, entry_tokens
from .eviction import get_policy, pick_victims

__all__ = ["RedisConfig", "RedisStore", "RemoteUnavailableError"]


class RemoteUnavailableError(StoreError):
    """The remote store cannot be reached now (refused, timed out, cluster down)."""


@dataclass(frozen=True)
class RedisConfig:
    """Where the shared store is and how long a call may take."""

    url: str
    """``redis://[user:pass@]host:port/db`` or ``rediss://`` (TLS). ``?cluster=true|false`` says
    whether it is a Redis Cluster; without it the server is asked once (INFO cluster)."""
    prefix: str = "chunkcache:"
    """Prepended to every Redis key, so several caches (or other data) can share a server."""
    piece_bytes: int = 1 << 20
    """Largest value stored in one hash field; an entry of S bytes is ceil(S / piece_bytes) pieces."""
    socket_timeout: float = 2.0
    """Seconds one command may wait for its reply."""
    connect_timeout: float = 1.0
    """Seconds a connection attempt may take."""
    retries: int = 1
    """Extra attempts after a connection error or timeout (no backoff), e.g. for a stale pooled
    connection after a server restart. A call waits at most (1 + retries) x the timeouts."""
    down_seconds: float = 5.0
    """After a failure, calls skip the server this long (reads miss at once), then try again."""
    eviction: Literal["lru", "cost"] = "lru"
    """Policy of ``evict_to`` (Redis's own maxmemory eviction is LRU/LFU over whole entries)."""

    def __post_init__(self) -> None:
        if urlsplit(self.url).scheme not in ("redis", "rediss"):
            raise ValueError(f"not a Redis URL: {self.url!r} (expected redis://host:port/db)")
        if self.piece_bytes < 4096:
            raise ValueError(f"piece_bytes must be at least 4096, got {self.piece_bytes}")
        if min(self.socket_timeout, self.connect_timeout) <= 0 or self.retries < 0 or self.down_seconds < 0:
            raise ValueError("timeouts must be > 0, retries and down_seconds >= 0")
        get_policy(self.eviction)


def _split_url(url: str) -> tuple[str, bool | None]:
    """(url without our ``cluster`` query option, the option: True/False/None)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    flag = None
    rest = []
    for k, v in query:
        if k == "cluster":
            flag = v.lower() in ("1", "true", "yes")
        else:
            rest.append((k, v))
    return urlunsplit(parts._replace(query=urlencode(rest))), flag


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions as rx

    return (rx.ConnectionError, rx.TimeoutError, rx.ClusterError, rx.RedisClusterException, OSError)


class RedisStore(Store):
    """Chunk entries in Redis or Redis Cluster (see the module docstring for layout and faults).

    Thread-safe (redis-py pools connections). ``stats``/``entries``/``evict_to`` scan the key space
    (SCAN on every primary): fine for ops commands, not for the serving path.
    """

    def __init__(self, url: str | RedisConfig, **overrides) -> None:
        self.config = (
            replace(url, **overrides) if isinstance(url, RedisConfig) else RedisConfig(url, **overrides)
        )
        self.url, self._cluster = _split_url(self.config.url)
        self.policy = get_policy(self.config.eviction)
        self.failed_writes = 0
        self.max_bytes = None  # Redis's maxmemory caps the shared store
        self._client_obj = None
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._clock = Clock()
        self._hits = self._misses = self._evictions = 0

    # -- plumbing -----------------------------------------------------------------------------

    def _rkey(self, key: str) -> str:
        return f"{self.config.prefix}{{{key}}}"

    def _connect(self):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        c = self.config
        kw = dict(socket_timeout=c.socket_timeout, socket_connect_timeout=c.connect_timeout)
        cluster = self._cluster
        if cluster is None:  # ask the server once
            probe = redis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0), **kw)
            try:
                cluster = bool(probe.info("cluster").get("cluster_enabled"))
            finally:
                probe.close()
            self._cluster = cluster
        if cluster:
            from redis.cluster import RedisCluster

            return RedisCluster.from_url(self.url, retry=Retry(NoBackoff(), c.retries), **kw)
        return redis.Redis.from_url(self.url, retry=Retry(NoBackoff(), c.retries), **kw)

    def _run(self, what: str, fn):
        """``fn(client)``; a connection fault warns once and marks the server down for a while."""
        if time.monotonic() < self._down_until:
            raise RemoteUnavailableError(
                f"Redis at {self.url} is marked down (recent failure); {what} skipped"
            )
        try:
            with self._lock:
                if self._client_obj is None:
                    self._client_obj = self._connect()
                client = self._client_obj
            return fn(client)
        except _redis_errors() as e:
            self._down_until = time.monotonic() + self.config.down_seconds
            msg = (
                f"chunkcache: Redis at {self.url} unreachable during {what} ({type(e).__name__}: {e}); "
                f"reads count as misses and writes fail for the next {self.config.down_seconds:g} s"
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            if self._cluster:  # a cluster client keeps a stale slot map: rebuild it next time
                with self._lock:
                    old, self._client_obj = self._client_obj, None
                _close_quietly(old)
            raise RemoteUnavailableError(msg.removeprefix("chunkcache: ")) from None
        except Exception as e:
            import redis.exceptions as rx

            if isinstance(e, rx.ResponseError) and ("OOM" in str(e) or "maxmemory" in str(e)):
                raise StoreFullError(f"Redis at {self.url} is full (maxmemory, noeviction): {e}") from None
            if isinstance(e, rx.RedisError):
                raise StoreError(f"Redis at {self.url} refused {what}: {type(e).__name__}: {e}") from None
            raise

    def _count(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self._hits += 1
            else:
                self._misses += 1

    # -- the Store interface ------------------------------------------------------------------

    def get(self, key: str, *, touch: bool = True) -> bytes | None:
        return self.get_many([key], touch=touch)[0]

    def get_many(self, keys: Iterable[str], *, touch: bool = True) -> list[bytes | None]:
        """One pipeline for all keys; Redis down -> all misses (with one warning)."""
        keys = list(keys)
        now = self._clock()

        def fn(r):
            p = r.pipeline(transaction=False)
            for k in keys:
                p.hgetall(self._rkey(k))
                if touch:  # on a miss this creates a stray access record; removed below
                    p.hincrby(self._rkey(k) + ":a", "hits", 1)
                    p.hset(self._rkey(k) + ":a", "last", now)
            res = p.execute(raise_on_error=False)  # access facts may be refused (OOM): reads go on
            hashes = res[:: 3 if touch else 1]
            for h in hashes:
                if isinstance(h, Exception):
                    raise h
            return hashes

        try:
            hashes, reached = self._run("get", fn), True
        except RemoteUnavailableError:
            hashes, reached = [{}] * len(keys), False
        out = []
        for k, h in zip(keys, hashes, strict=True):
            try:
                out.append(_join(h))
            except CorruptEntryError as e:  # bad framing fields: damaged, dropped, recomputed
                warnings.warn(
                    f"chunkcache: dropping damaged entry {k} (its Redis hash): {e}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                out.append(None)
                if reached:
                    try:
                        self.delete(k)
                    except StoreError:
                        pass
        if touch:
            for v in out:
                self._count(v is not None)
            stray = [self._rkey(k) + ":a" for k, h in zip(keys, hashes, strict=True) if not h]
            if stray and reached:
                try:
                    self._run("get", lambda r: _delete_keys(r, stray))
                except StoreError:
                    pass
        return out

    def put(self, key: str, value: bytes) -> None:
        self.put_many([(key, value)])

    def put_many(self, items: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> None:
        """One pipeline; each entry is one HSET (atomic), so no entry is ever half-visible."""
        items = list(items.items() if isinstance(items, Mapping) else items)
        pb = self.config.piece_bytes
        now = self._clock()

        def fn(r):
            p = r.pipeline(transaction=False)
            for k in (k for k, _ in items):
                p.hkeys(self._rkey(k))
            old_fields = p.execute()
            p = r.pipeline(transaction=False)
            for (k, v), old in zip(items, old_fields, strict=True):
                mv = memoryview(v).cast("B")
                pieces = [mv[i : i + pb] for i in range(0, max(len(mv), 1), pb)]
                fields: dict[str, bytes | int | str] = {f"p{i}": bytes(x) for i, x in enumerate(pieces)}
                fields.update(n=len(pieces), pb=pb, nbytes=len(mv), tokens=entry_tokens(v),
                              crc=",".join(f"{zlib.crc32(x):08x}" for x in pieces))  # fmt: skip
                rk = self._rkey(k)
                p.hset(rk, mapping=fields)
                stale = [f for f in (x.decode(errors="replace") for x in old or []) if f not in fields]
                if stale:  # a shorter value's tail, or fields a damaged entry had: never mixed in
                    p.hdel(rk, *stale)
                p.hsetnx(rk + ":a", "created", now)
                p.hsetnx(rk + ":a", "hits", 0)
                p.hset(rk + ":a", "last", now)
            p.execute()

        try:
            self._run("put", fn)
        except StoreError:
            self.failed_writes += 1
            raise

    def contains(self, key: str) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: Iterable[str]) -> list[bool]:
        """Redis down -> all False (the caller recomputes; a write will then report the fault)."""
        keys = list(keys)

        def fn(r):
            p = r.pipeline(transaction=False)
            for k in keys:
                p.hexists(self._rkey(k), "n")
            return [bool(x) for x in p.execute()]

        try:
            return self._run("contains", fn)
        except RemoteUnavailableError:
            return [False] * len(keys)

    def delete(self, key: str) -> bool:
        rk = self._rkey(key)
        return bool(self._run("delete", lambda r: _delete_keys(r, [rk, rk + ":a"])))

    def _scan(self, r) -> list[str]:
        pre = self.config.prefix + "{"
        found = set()
        for raw in r.scan_iter(match=_glob_escape(pre) + "*", count=1000):
            name = raw.decode()
            if name.endswith("}"):
                found.add(name[len(pre) : -1])
        return sorted(found)

    def entries(self) -> Iterator[tuple[str, EntryStats]]:
        def fn(r):
            keys = self._scan(r)
            p = r.pipeline(transaction=False)
            for k in keys:
                p.hmget(self._rkey(k), "nbytes", "tokens")
                p.hmget(self._rkey(k) + ":a", "hits", "last", "created")
            res = p.execute()
            out = []
            for i, k in enumerate(keys):
                (nbytes, tokens), (hits, last, created) = res[2 * i], res[2 * i + 1]
                if nbytes is None:  # deleted meanwhile
                    continue
                out.append((k, EntryStats(_num(nbytes), _num(tokens), _num(hits), _num(last), _num(created))))
            return out

        yield from self._run("entries", fn)

    def evict_to(self, max_bytes: int) -> list[str]:
        ents = list(self.entries())
        victims = pick_victims(ents, sum(e.nbytes for _, e in ents) - max_bytes, self.policy)
        for k in victims:
            self.delete(k)
        self._evictions += len(victims)
        return victims

    def stats(self) -> StoreStats:
        ents = list(self.entries())
        return StoreStats(
            self._hits, self._misses, self._evictions, sum(e.nbytes for _, e in ents), len(ents), None,
            failed_writes=self.failed_writes,
        )  # fmt: skip

    def flushdb_prefix(self) -> int:
        """Delete every entry under this store's prefix (tests, benchmarks); the count removed."""
        keys = self._run("flush", self._scan)
        for k in keys:
            self.delete(k)
        return len(keys)

    def close(self) -> None:
        with self._lock:
            old, self._client_obj = self._client_obj, None
        _close_quietly(old)

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, cluster={self._cluster})"

    # -- partial reads --------------------------------------------------------------------------

    def get_range(self, key: str, start: int, stop: int) -> bytes | None:
        """Bytes ``[start, stop)`` of the entry, fetching only the pieces that hold them (one round
        trip). Each piece is checked against its crc32 (``CorruptEntryError``); None on a miss.
        Does not count a hit or touch access facts."""
        return self._ranges(key, [(start, stop)])[0] if stop > start else b""

    def _ranges(self, key: str, spans: Sequence[tuple[int, int]]) -> list[bytes] | list[None]:
        pb = self.config.piece_bytes
        idx = sorted({i for a, b in spans for i in range(a // pb, (b - 1) // pb + 1) if b > a})
        rk = self._rkey(key)

        def fetch(r, wanted):
            return r.hmget(rk, ["n", "pb", "nbytes", "crc", *[f"p{i}" for i in wanted]])

        try:
            res = self._run("get_range", lambda r: fetch(r, idx))
        except RemoteUnavailableError:
            return [None] * len(spans)
        if res[0] is None:
            return [None] * len(spans)
        n, stored_pb, nbytes, crcs = _framing(key, res[:4])
        if stored_pb != pb:  # written with another piece size: fetch by that one
            pb = stored_pb
            idx = sorted({i for a, b in spans for i in range(a // pb, (b - 1) // pb + 1) if b > a})
            res = self._run("get_range", lambda r: fetch(r, idx))
        got = {}
        for i, piece in zip(idx, res[4:], strict=True):
            if i >= n or piece is None or f"{zlib.crc32(piece):08x}" != crcs[i]:
                raise CorruptEntryError(f"Redis entry {key}: piece {i} is missing or fails its crc32")
            got[i] = piece
        out = []
        for a, b in spans:
            if a < 0 or b > nbytes:
                raise ValueError(f"range [{a}, {b}) outside the {nbytes}-byte entry {key}")
            buf = b"".join(got[i] for i in range(a // pb, (b - 1) // pb + 1)) if b > a else b""
            off = (a // pb) * pb
            out.append(buf[a - off : b - off])
        return out

    def get_layers(self, key: str, layers: range) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """The header and the payload sections of ``layers`` only: every codec part sliced to
        ``[len(layers), ...]`` (all parts have layers first), plus the whole ``token_ids`` /
        ``token_scores`` / ``layer_sums``. Feed it to ``get_codec(header["codec"]).decode(parts, dtype)`` to get
        ``[len(layers), 2, H, T, D]``. Moves only the pieces those layers lie in (and piece 0 for
        the header); every piece is crc-checked. None on a miss or Redis down."""
        head = self._ranges(key, [(0, PREFIX_BYTES)])[0]
        if head is None:
            return None
        raw = self.get_range(key, 0, header_span(head))
        if raw is None:
            return None
        header = read_header(raw, whole=False)  # every field checked, as for any other reader
        sections = layer_spans(header, layers)
        base = header["payload_offset"]
        bufs = self._ranges(
            key, [(base + s["offset"], base + s["offset"] + s["nbytes"]) for s in sections.values()]
        )
        if bufs and bufs[0] is None:
            return None
        return header, section_views(header, sections, bufs)

    def span_reader(self, keys: Sequence[str]) -> SpanReader:
        """Streaming reads that move only the pieces each call's spans need (``_RedisSpans``)."""
        return _RedisSpans(self, keys)

    def read_prefix(self, key: str, nbytes: int) -> bytes | None:
        """The first ``nbytes`` bytes (fewer if the entry is shorter), moving only their pieces."""
        try:
            total = self._run("read_prefix", lambda r: r.hget(self._rkey(key), "nbytes"))
        except RemoteUnavailableError:
            return None
        if total is None:
            return None
        stop = min(nbytes, _num(total))
        return self.get_range(key, 0, stop) if stop > 0 else b""

    def sample_keys(self, n: int) -> list[str]:
        """Up to ``n`` keys from the first SCAN batches (not the whole key space)."""
        pre = self.config.prefix + "{"

        def fn(r):
            found: list[str] = []
            for raw in r.scan_iter(match=_glob_escape(pre) + "*", count=max(n, 100)):
                name = raw.decode(errors="replace")
                if name.endswith("}") and name[len(pre) : -1] not in found:
                    found.append(name[len(pre) : -1])
                    if len(found) >= n:
                        break
            return found

        return self._run("sample", fn)


class _RedisSpans(SpanReader):
    """``SpanReader`` over Redis: a call is one pipeline (one round trip) of HMGETs for the pieces
    its spans need that no earlier call fetched, so every piece moves once however the spans cut
    it; each piece is checked against its crc32 and size (``CorruptEntryError``). An entry's first
    call also reads its framing fields (the same round trip, with piece 0, where its header lies)
    and counts a hit and touches its access facts, as ``get`` does. KeyError for a missing entry;
    Redis down raises ``RemoteUnavailableError``."""

    def __init__(self, store: RedisStore, keys: Sequence[str]) -> None:
        super().__init__(store, keys)
        self._frame: dict[int, tuple[int, int, int, list[str]]] = {}
        self._pieces: dict[tuple[int, int], bytes] = {}

    def _keep(self, i: int, j: int, piece) -> None:
        n, pb, nbytes, crcs = self._frame[i]
        size = pb if j < n - 1 else nbytes - pb * (n - 1)
        if piece is None or len(piece) != size or f"{zlib.crc32(piece):08x}" != crcs[j]:
            raise CorruptEntryError(f"Redis entry {self.keys[i]}: piece {j} is missing or fails its crc32")
        self._pieces[(i, j)] = piece

    def read(self, spans: Sequence[tuple[int, int, int]]) -> list:
        st: RedisStore = self.store  # type: ignore[assignment]
        new = sorted({i for i, _, _ in spans if i not in self._frame})
        if new:
            now = st._clock()

            def first(r):
                p = r.pipeline(transaction=False)
                for i in new:
                    rk = st._rkey(self.keys[i])
                    p.hmget(rk, ["n", "pb", "nbytes", "crc", "p0"])
                    p.hincrby(rk + ":a", "hits", 1)
                    p.hset(rk + ":a", "last", now)
                return p.execute(raise_on_error=False)[::3]

            for i, got in zip(new, st._run("get", first), strict=True):
                if isinstance(got, Exception):
                    raise got
                if got[0] is None:
                    raise KeyError(f"chunk {self.keys[i]} is not in the store")
                self._frame[i] = _framing(self.keys[i], got[:4])
                self._keep(i, 0, got[4])
                st._count(True)
        want: dict[int, list[int]] = {}
        for i, a, b in spans:
            n, pb, nbytes, _ = self._frame[i]
            if a < 0 or b > nbytes or a > b:
                raise ValueError(f"range [{a}, {b}) outside the {nbytes}-byte entry {self.keys[i]}")
            for j in range(a // pb, (b - 1) // pb + 1) if b > a else ():
                if (i, j) not in self._pieces and j not in want.setdefault(i, []):
                    want[i].append(j)
        want = {i: js for i, js in want.items() if js}
        if want:

            def more(r):
                p = r.pipeline(transaction=False)
                for i, js in want.items():
                    p.hmget(st._rkey(self.keys[i]), [f"p{j}" for j in js])
                return p.execute()

            for (i, js), got in zip(want.items(), st._run("get", more), strict=True):
                for j, piece in zip(js, got, strict=True):
                    self._keep(i, j, piece)
        out = []
        for i, a, b in spans:
            pb = self._frame[i][1]
            first_piece, last_piece = a // pb, (b - 1) // pb
            if b <= a:
                out.append(b"")
            elif first_piece == last_piece:
                off = first_piece * pb
                out.append(memoryview(self._pieces[(i, first_piece)])[a - off : b - off])
            else:
                joined = b"".join(self._pieces[(i, j)] for j in range(first_piece, last_piece + 1))
                off = first_piece * pb
                out.append(memoryview(joined)[a - off : b - off])
        return out

    def close(self) -> None:
        self._pieces.clear()


def _num(x, default: int = 0) -> int:
    """A bookkeeping field, 0 if missing or garbage (``ls`` and eviction must not crash on it)."""
    try:
        return int(x)
    except (TypeError, ValueError):
        return default


def _framing(key: str, fields: list) -> tuple[int, int, int, list[str]]:
    """(n, pb, nbytes, piece crcs) of an entry hash, checked against each other; CorruptEntryError
    for missing, non-numeric or inconsistent fields (``n=abc``, ``n=10**12``: never looped over)."""
    n, pb, nbytes, crc = fields
    try:
        n, pb, nbytes = int(n), int(pb), int(nbytes)
        crcs = crc.decode("ascii").split(",")
    except (TypeError, ValueError, AttributeError, UnicodeDecodeError):
        raise CorruptEntryError(
            f"Redis entry {key}: framing fields n/pb/nbytes/crc missing or not numbers"
        ) from None
    if not (pb >= 1 and 0 <= nbytes and n == max(-(-nbytes // pb), 1) and len(crcs) == n):
        raise CorruptEntryError(
            f"Redis entry {key}: framing fields disagree (n={n}, pb={pb}, nbytes={nbytes}, {len(crcs)} crcs)"
        )
    return n, pb, nbytes, crcs


def _join(h: dict) -> bytes | None:
    """The value of an entry hash (None if there is none); CorruptEntryError if its framing or a
    piece is bad (checked before anything is joined)."""
    if not h:
        return None
    n, pb, nbytes, crcs = _framing("", [h.get(b"n"), h.get(b"pb"), h.get(b"nbytes"), h.get(b"crc")])
    pieces = [h.get(b"p%d" % i) for i in range(n)]
    for i, piece in enumerate(pieces):
        if piece is None or len(piece) != (pb if i < n - 1 else nbytes - pb * (n - 1)):
            raise CorruptEntryError(f"piece {i} is missing or has the wrong size")
        if f"{zlib.crc32(piece):08x}" != crcs[i]:
            raise CorruptEntryError(f"piece {i} fails its crc32")
    return b"".join(pieces)


def _delete_keys(r, names: list[str]) -> int:
    p = r.pipeline(transaction=False)
    for name in names:
        p.delete(name)
    return sum(p.execute())


def _glob_escape(s: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in s)


def _close_quietly(client) -> None:
    if client is not None:
        try:
            client.close()
        except Exception:
            pass
