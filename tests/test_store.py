"""Store bookkeeping with exact expectations (hits, misses, eviction order) for both stores, and the
LMDB specifics: persistence, amortised access times, map growth, fork refusal, concurrent processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
from store_worker import entry

from chunkcache.errors import StoreError, StoreFullError, StoreReadOnlyError
from chunkcache.format import load_chunk, pack_chunk
from chunkcache.store import (
    EVICTION_POLICIES,
    EntryStats,
    LMDBStore,
    MemoryStore,
    Store,
    open_store,
    pick_victims,
    verify_store,
)

WORKER = str(Path(__file__).with_name("store_worker.py"))


@pytest.fixture(params=["memory", "lmdb"])
def make_store(request, tmp_path):
    opened = []

    def make(**kw) -> Store:
        s = MemoryStore(**kw) if request.param == "memory" else LMDBStore(tmp_path / "s", **kw)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def test_basic_bookkeeping(make_store):
    store = make_store()
    (ka, a), (kb, b) = entry(0), entry(1)
    assert store.get(ka) is None
    store.put(ka, a)
    store.put(kb, b)
    assert store.get(ka) == a and store.get(ka) == a and store.get(kb) == b
    assert store.get("nope") is None
    assert store.get(ka, touch=False) == a  # not counted
    s = store.stats()
    assert (s.hits, s.misses, s.evictions, s.entries, s.bytes) == (3, 2, 0, 2, len(a) + len(b))
    assert store.contains(ka) and ka in store and not store.contains("nope")
    assert sorted(store.keys()) == sorted([ka, kb]) and dict(store.items()) == {ka: len(a), kb: len(b)}
    ents = dict(store.entries())
    assert ents[ka].hits == 2 and ents[kb].hits == 1 and ents[ka].tokens == 16 and ents[ka].nbytes == len(a)
    assert store.delete(ka) is True and store.delete(ka) is False
    assert store.stats().bytes == len(b) and len(store) == 1


def test_batch_forms(make_store):
    store = make_store()
    items = dict(entry(i) for i in range(4))
    store.put_many(items)
    keys = list(items)
    assert store.get_many(keys + ["x"]) == [*items.values(), None]
    assert store.contains_many(["x", keys[2]]) == [False, True]
    assert (store.stats().hits, store.stats().misses) == (4, 1)


def test_replace_keeps_hits_and_fixes_bytes(make_store):
    store = make_store()
    k, v = entry(0)
    store.put(k, v)
    store.get(k)
    store.put(k, v + b"xx")
    assert store.stats().bytes == len(v) + 2 and store.stats().entries == 1
    assert dict(store.entries())[k].hits == 1


def test_lru_eviction_order(make_store):
    (ka, a), (kb, b), (kc, c), (kd, d) = (entry(i) for i in range(4))
    assert len({len(a), len(b), len(c), len(d)}) == 1
    store = make_store(max_bytes=3 * len(a), eviction="lru")
    store.put(ka, a)
    store.put(kb, b)
    store.put(kc, c)
    store.get(ka)  # a is now fresher than b and c
    store.put(kd, d)  # full: evicts b, the least recently used
    assert sorted(store.keys()) == sorted([ka, kc, kd])
    store.get(kc)
    store.put(kb, b)  # order of last access now: a, d, c -> evicts a
    assert sorted(store.keys()) == sorted([kb, kc, kd])
    s = store.stats()
    assert (s.evictions, s.entries, s.bytes, s.hits) == (2, 3, 3 * len(a), 2)
    assert store.evict_to(len(a)) == [kd, kc]  # lru order of the remaining: d (put), c (get), b (put)
    assert list(store.keys()) == [kb] and store.stats().evictions == 4


def test_cost_eviction_order(make_store):
    # raw entries cost ~3.6x the bytes of int4 ones for the same 16 tokens: less value per byte.
    (ka, a), (kd, d) = entry(0, "raw"), entry(3, "raw")
    (kb, b), (kc, c), (ke, e) = entry(1, "int4"), entry(2, "int4"), entry(4, "int4")
    store = make_store(max_bytes=len(a) + len(b) + len(c), eviction="cost")
    store.put(ka, a)
    store.put(kb, b)
    store.put(kc, c)
    store.get(ka)  # (1+1) * 16 / len(a) is still below 16 / len(b): a goes first although b is older
    store.put(kd, d)
    assert sorted(store.keys()) == sorted([kb, kc, kd])
    for _ in range(3):
        store.get(kb)
    store.put(ke, e)  # needs len(e) bytes: the lowest value is d (raw, never read) though it is the newest
    assert sorted(store.keys()) == sorted([kb, kc, ke])
    assert store.stats().evictions == 2
    assert store.evict_to(len(b)) == [kc, ke]  # equal value (int4, 0 hits): older access goes first
    assert list(store.keys()) == [kb]


def test_policy_sort_keys():
    e = lambda nbytes, tokens, hits, last: EntryStats(nbytes, tokens, hits, last, 0)  # noqa: E731
    ents = [
        ("old", e(100, 10, 0, 1)),
        ("hot", e(100, 10, 9, 2)),
        ("fat", e(1000, 10, 0, 3)),
        ("new", e(100, 10, 0, 4)),
    ]
    assert pick_victims(ents, 10**6, EVICTION_POLICIES["lru"]) == ["old", "hot", "fat", "new"]
    assert pick_victims(ents, 10**6, EVICTION_POLICIES["cost"]) == ["fat", "old", "new", "hot"]
    assert pick_victims(ents, 150, EVICTION_POLICIES["lru"]) == ["old", "hot"]
    assert pick_victims(ents, 0, EVICTION_POLICIES["lru"]) == []


def test_value_larger_than_cap(make_store):
    store = make_store(max_bytes=100)
    with pytest.raises(StoreFullError, match="max_bytes"):
        store.put(*entry(0))


def test_load_chunk_and_verify(make_store):
    store = make_store()
    k, v = entry(0)
    store.put(k, v)
    assert load_chunk(store, k).num_tokens == 16 and load_chunk(store, "nope") is None
    store.put("bad", v[:-10])
    with pytest.warns(RuntimeWarning, match="dropping damaged entry bad"):
        assert load_chunk(store, "bad") is None
    assert not store.contains("bad")
    store.put("bad2", b"junk")
    assert [k for k, _ in verify_store(store)] == ["bad2"]
    assert verify_store(store, delete=True) and verify_store(store) == []


def test_open_store(tmp_path):
    assert isinstance(open_store(None), MemoryStore) and isinstance(open_store(":memory:"), MemoryStore)
    m = MemoryStore()
    assert open_store(m) is m
    with open_store(str(tmp_path / "x")) as s:
        assert isinstance(s, LMDBStore)


# -- LMDB specifics ---------------------------------------------------------------------------


def test_lmdb_persists_and_flushes_access_on_close(tmp_path):
    k, v = entry(0)
    with LMDBStore(tmp_path) as s:
        s.put(k, v)
        s.get(k)
        s.get(k)
    with LMDBStore(tmp_path, readonly=True) as s:
        assert s.get(k) == v
        assert dict(s.entries())[k].hits == 3  # 2 flushed + 1 pending on this read-only handle
        assert s.stats().bytes == len(v)


def test_lmdb_access_is_amortised(tmp_path):
    k, v = entry(0)
    with LMDBStore(tmp_path) as s:
        s.ACCESS_FLUSH_SECONDS = 1e9
        s.ACCESS_FLUSH_EVERY = 3
        s.put(k, v)

        def committed() -> int:
            with s._txn() as txn:
                return dict(s._read_entries(txn))[k].hits

        s.get(k)
        s.get(k)
        assert committed() == 0 and dict(s.entries())[k].hits == 2  # pending, shown by entries()
        s.put(*entry(1))  # any write transaction carries the pending access facts
        assert committed() == 2
        for _ in range(3):
            s.get(k)
        assert committed() == 5  # the third hit reached ACCESS_FLUSH_EVERY


def test_lmdb_refuses_second_handle_and_readonly_writes(tmp_path):
    k, v = entry(0)
    with LMDBStore(tmp_path) as s:
        s.put(k, v)
        with pytest.raises(StoreError, match="already open in this process"):
            LMDBStore(tmp_path)
    with LMDBStore(tmp_path, readonly=True) as s:
        for op in (lambda: s.put(k, v), lambda: s.delete(k), lambda: s.evict_to(0)):
            with pytest.raises(StoreReadOnlyError, match="read-only"):
                op()
        assert s.get(k) == v
    with pytest.raises(StoreError, match="no chunk store"):
        LMDBStore(tmp_path / "missing", readonly=True)


def test_lmdb_map_grows_without_losing_writes(tmp_path):
    items = [entry(i, tokens=64) for i in range(12)]  # ~66 KB each
    with LMDBStore(tmp_path, map_size=64 * 1024) as s:
        for k, v in items:
            s.put(k, v)
        s.put_many(entry(i, tokens=64) for i in range(12, 20))
        assert s._env.info()["map_size"] > 64 * 1024
        assert s.stats().entries == 20 and verify_store(s) == []
        assert all(s.get(k) == v for k, v in items)


def _use_in_child(store: LMDBStore, q) -> None:
    try:
        store.get("x")
        q.put("no error")
    except StoreError as e:
        q.put(str(e))


def test_lmdb_handle_refuses_to_cross_fork(tmp_path):
    with LMDBStore(tmp_path) as s:
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_use_in_child, args=(s, q))
        p.start()
        msg = q.get(timeout=30)
        p.join(30)
        assert "must not cross fork" in msg
        s.put(*entry(0))  # the parent's handle is unharmed
        assert s.stats().entries == 1


def test_lmdb_readers_and_writer_in_separate_processes(tmp_path):
    path = str(tmp_path / "s")
    with LMDBStore(path) as s:
        s.put(*entry(1000, tokens=64, layers=4, heads=2))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    readers = [
        subprocess.Popen(
            [sys.executable, WORKER, "read", path, "4"], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(3)
    ]
    writer = subprocess.run(
        [sys.executable, WORKER, "write", path, "60"], capture_output=True, text=True, env=env
    )
    assert writer.returncode == 0, writer.stderr
    assert writer.stdout.splitlines()[-1] == "done 60 0"
    for r in readers:
        out, _ = r.communicate(timeout=60)
        assert r.returncode == 0
        assert int(out.split()[-1]) > 0
    with LMDBStore(path, readonly=True) as s:
        assert s.stats().entries == 61 and verify_store(s) == []


def test_pack_then_store_round_trip(tmp_path):
    from store_worker import random_chunk

    c = random_chunk(tokens=5)
    with LMDBStore(tmp_path) as s:
        s.put("k", pack_chunk(c, "int8", {}))
        out = load_chunk(s, "k")
    assert out.num_tokens == 5 and out.meta == c.meta


def test_unmap_hooks_run_before_the_map_moves_or_closes(tmp_path):
    """``on_unmap`` hooks (``hostmap`` drops its CUDA registration there) run once before a map
    resize and before close; a handle's map is never unmapped behind their back."""
    store = LMDBStore(tmp_path / "s", map_size=1 << 16)
    calls = []
    store.on_unmap(lambda: calls.append("a"))
    store.put("k", b"x" * 100)
    assert calls == []
    store.put("big", os.urandom(1 << 18))  # MapFullError: the map grows
    assert calls == ["a"]
    store.put("big2", os.urandom(1 << 19))
    assert calls == ["a"]  # one-shot
    store.on_unmap(lambda: calls.append("b"))
    store.close()
    assert calls == ["a", "b"]
