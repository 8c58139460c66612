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

import json
import math
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import torch

from .errors import CorruptEntryError, StoreError, StoreFullError
from .format import FORMAT_VERSION, MAGIC, dtype_from_name
from .store import EntryStats, Store, StoreStats, _Clock, _entry_tokens, _policy, pick_victims

__all__ = ["RedisConfig", "RedisStore", "RemoteUnavailableError"]

_PREFIX = struct.Struct("<8sIIII")  # the entry prefix (format's docstring): magic, version, hlen, hcrc, 0


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
        _policy(self.eviction)


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
        self.policy = _policy(self.config.eviction)
        self.max_bytes = None  # Redis's maxmemory caps the shared store
        self._client_obj = None
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._clock = _Clock()
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

            if isinstance(e, rx.ResponseError) and str(e).startswith("OOM"):
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
            return p.execute()[:: 3 if touch else 1]

        try:
            hashes, reached = self._run("get", fn), True
        except RemoteUnavailableError:
            hashes, reached = [{}] * len(keys), False
        out = [_join(h) for h in hashes]
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
                p.hget(self._rkey(k), "n")
            old_n = p.execute()
            p = r.pipeline(transaction=False)
            for (k, v), old in zip(items, old_n, strict=True):
                mv = memoryview(v).cast("B")
                pieces = [mv[i : i + pb] for i in range(0, max(len(mv), 1), pb)]
                fields: dict[str, bytes | int | str] = {f"p{i}": bytes(x) for i, x in enumerate(pieces)}
                fields.update(n=len(pieces), pb=pb, nbytes=len(mv), tokens=_entry_tokens(v),
                              crc=",".join(f"{zlib.crc32(x):08x}" for x in pieces))  # fmt: skip
                rk = self._rkey(k)
                p.hset(rk, mapping=fields)
                if old is not None and int(old) > len(pieces):  # a shorter value: drop the stale tail
                    p.hdel(rk, *[f"p{i}" for i in range(len(pieces), int(old))])
                p.hsetnx(rk + ":a", "created", now)
                p.hsetnx(rk + ":a", "hits", 0)
                p.hset(rk + ":a", "last", now)
            p.execute()

        self._run("put", fn)

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
                out.append((k, EntryStats(int(nbytes), int(tokens or 0), int(hits or 0), int(last or 0),
                                          int(created or 0))))  # fmt: skip
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
            self._hits, self._misses, self._evictions, sum(e.nbytes for _, e in ents), len(ents), None
        )

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
        n, stored_pb, nbytes, crcs = int(res[0]), int(res[1]), int(res[2]), res[3].decode().split(",")
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
        if layers.step != 1:
            raise ValueError("layers must be a contiguous range")
        head = self._ranges(key, [(0, _PREFIX.size)])[0]
        if head is None:
            return None
        magic, version, hlen, hcrc, _ = _PREFIX.unpack_from(head, 0)
        if magic != MAGIC or version != FORMAT_VERSION:
            raise CorruptEntryError(f"Redis entry {key} is not a version-{FORMAT_VERSION} chunkcache entry")
        raw = self.get_range(key, _PREFIX.size, _PREFIX.size + hlen)
        if raw is None or zlib.crc32(raw) != hcrc:
            raise CorruptEntryError(f"Redis entry {key}: header checksum mismatch")
        header = json.loads(raw)
        base = -(-(_PREFIX.size + hlen) // 64) * 64
        spans, shapes = [], []
        for name, s in header["sections"].items():
            shape, off, nb = [int(x) for x in s["shape"]], int(s["offset"]), int(s["nbytes"])
            if name not in ("token_ids", "token_scores", "layer_sums"):  # whole: small, not layers-first
                if not (0 <= layers.start <= layers.stop <= shape[0]):
                    raise ValueError(f"layers {layers} outside the entry's {shape[0]} layers")
                per = nb // shape[0]
                off, nb = off + layers.start * per, per * len(layers)
                shape = [len(layers), *shape[1:]]
            spans.append((base + off, base + off + nb))
            shapes.append((name, dtype_from_name(s["dtype"]), shape))
        bufs = self._ranges(key, spans)
        if bufs[0] is None:
            return None
        parts = {}
        for (name, dtype, shape), buf in zip(shapes, bufs, strict=True):
            t = torch.frombuffer(bytearray(buf), dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            parts[name] = t.view(shape) if math.prod(shape) else torch.empty(shape, dtype=dtype)
        return header, parts


def _join(h: dict) -> bytes | None:
    n = h.get(b"n")
    if n is None:
        return None
    return b"".join(h.get(b"p%d" % i, b"") for i in range(int(n)))


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
