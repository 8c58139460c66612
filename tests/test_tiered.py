"""TieredStore: a local LMDB (size cap, eviction) in front of a real Redis, and the engine on top
of it answering exactly as without faults when Redis dies mid-run or serves a damaged value."""

from __future__ import annotations

import os
import uuid
import warnings

import pytest
import torch
from conftest import PASSAGES, QUESTION, tiny_model
from redis_servers import RedisServer, require_redis
from store_worker import entry

from chunkcache.format import load_chunk
from chunkcache.store import LMDBStore
from chunkcache.store.tiered import TieredStore


@pytest.fixture(scope="module")
def server():
    require_redis()
    with RedisServer() as s:
        yield s


def _remote(url, **kw):
    from chunkcache.store.redis_store import RedisStore

    return RedisStore(url, prefix=f"t{uuid.uuid4().hex[:8]}:", piece_bytes=8192, **kw)


def test_read_through_writes_to_both_and_counts_tiers(server, tmp_path):
    remote = _remote(server.url)
    (k1, v1), (k2, v2) = entry(1), entry(2)
    remote.put(k1, v1)  # precomputed by another host
    with TieredStore(LMDBStore(tmp_path / "l"), remote) as t:
        assert t.get(k1) == v1 and t.local.contains(k1)  # promoted into the local tier
        assert t.get(k1) == v1
        assert t.tier_hits == {"local": 1, "remote": 1}
        t.put(k2, v2)
        assert t.local.get(k2, touch=False) == v2 == remote.get(k2, touch=False)
        assert t.get("0" * 64) is None
        s = t.stats()
        assert (s.hits, s.misses, s.entries) == (2, 1, 2)
        assert t.contains_many([k1, k2, "0" * 64]) == [True, True, False]
        assert t.delete(k1) and not t.local.contains(k1) and not remote.contains(k1)


def test_local_tier_keeps_its_own_cap_and_eviction(server, tmp_path):
    remote = _remote(server.url)
    items = [entry(i) for i in range(6)]
    size = len(items[0][1])
    with TieredStore(LMDBStore(tmp_path / "l", max_bytes=3 * size, eviction="lru"), remote) as t:
        t.put_many(items[:3])
        for k, v in items[3:]:
            t.put(k, v)
        assert t.local.stats().entries == 3 and t.local.stats().evictions == 3
        assert len(remote) == 6 and t.stats().entries == 6 and t.stats().max_bytes == 3 * size
        assert t.get(items[0][0]) == items[0][1]  # evicted locally, served by the remote
        assert t.tier_hits["remote"] == 1 and t.local.contains(items[0][0])


def _engine(store, smol_tokenizer):
    from chunkcache.engine import ChunkCache

    return ChunkCache(model=tiny_model("llama"), tokenizer=smol_tokenizer, store=store)


def test_remote_killed_mid_run_falls_back_to_local_and_recompute(tmp_path, smol_tokenizer, tiny_engine):
    require_redis()
    want = tiny_engine.fuse(PASSAGES, QUESTION).logits
    with RedisServer() as srv:
        remote = _remote(srv.url, socket_timeout=0.5, connect_timeout=0.5)
        with TieredStore(LMDBStore(tmp_path / "l"), remote) as t:
            eng = _engine(t, smol_tokenizer)
            eng.precompute(PASSAGES[:2])
            assert len(remote) == 2
            srv.kill()
            with pytest.warns(RuntimeWarning, match="unreachable"):
                res = eng.fuse(PASSAGES, QUESTION)  # 2 local hits, 2 recomputed; remote writes fail
            torch.testing.assert_close(res.logits, want, rtol=1e-5, atol=1e-5)
            # 2 local hits + 2 misses, recomputed, written locally (remote down) and read back from there
            assert t.tier_hits == {"local": 4, "remote": 0} and t.local.stats().entries == 4
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res2 = eng.fuse(PASSAGES, QUESTION)  # now all local
            torch.testing.assert_close(res2.logits, want, rtol=1e-5, atol=1e-5)


def test_corrupted_remote_value_is_dropped_and_recomputed(server, tmp_path, smol_tokenizer, tiny_engine):
    want = tiny_engine.fuse(PASSAGES[:2], QUESTION).logits
    remote = _remote(server.url)
    host_a = _engine(remote, smol_tokenizer)  # another host precomputes into Redis
    keys = host_a.precompute(PASSAGES[:2])
    remote.contains("x")
    remote._client_obj.hset(remote._rkey(keys[0]), "p1", os.urandom(8192))  # damage one piece
    with TieredStore(LMDBStore(tmp_path / "l"), remote) as t:
        with pytest.warns(RuntimeWarning, match="dropping damaged entry"):
            assert load_chunk(t, keys[0]) is None
        assert not t.local.contains(keys[0]) and not remote.contains(keys[0])  # gone from both tiers
        res = _engine(t, smol_tokenizer).fuse(PASSAGES[:2], QUESTION)  # recomputes it, writes both
        torch.testing.assert_close(res.logits, want, rtol=1e-5, atol=1e-5)
        assert remote.contains(keys[0]) and load_chunk(remote, keys[0]) is not None
