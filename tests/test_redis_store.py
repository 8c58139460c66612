"""RedisStore against real redis-server processes: one server and a three-node cluster on loopback.

Same bytes as LMDB, small pieces, partial reads, corruption caught by checksums, a killed or hung
server bounded by the configured timeouts, two processes standing in for two hosts, and the
sharded precompute CLI into a shared store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import pytest
import torch
from conftest import PASSAGES, QUESTION
from redis_servers import RedisClusterProcs, RedisServer, require_redis, servers
from store_worker import entry

from chunkcache.codec import get_codec
from chunkcache.errors import CorruptEntryError
from chunkcache.format import load_chunk, unpack_chunk
from chunkcache.store import open_store

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def urls():
    require_redis()
    with servers() as (single, cluster):
        yield {"single": single.url, "cluster": cluster.url}


@pytest.fixture(params=["single", "cluster"])
def store(request, urls):
    from chunkcache.store.redis_store import RedisStore

    s = RedisStore(urls[request.param], prefix=f"t{uuid.uuid4().hex[:8]}:", piece_bytes=4096)
    yield s
    s.flushdb_prefix()
    s.close()


def _raw(store):
    """The redis-py client behind a store (to damage values behind its back)."""
    store.contains("x")  # connect
    return store._client_obj


def test_open_store_url_and_cluster_detection(urls):
    for name, url in urls.items():
        s = open_store(url.split("?")[0])  # no ?cluster=: the server is asked
        assert s.contains("0" * 64) is False
        assert s._cluster is (name == "cluster")
        s.close()


def test_same_entry_bytes_as_lmdb_in_small_pieces(store, tmp_path):
    from chunkcache.store import LMDBStore

    items = [entry(i, codec=c, tokens=64, layers=4) for i, c in enumerate(["raw", "int8", "int4"])]
    store.put_many(items)
    with LMDBStore(tmp_path / "l") as lm:
        lm.put_many(items)
        for k, v in items:
            assert store.get(k) == v == lm.get(k)
            assert torch.equal(load_chunk(store, k).kv, unpack_chunk(v).kv)
    r = _raw(store)
    for k, v in items:
        h = r.hgetall(store._rkey(k))
        pieces = [f for f in h if f.startswith(b"p") and f != b"pb"]
        assert len(pieces) == int(h[b"n"]) == -(-len(v) // 4096) and max(len(h[f]) for f in pieces) <= 4096
    s = store.stats()
    assert (s.entries, s.bytes, s.hits, s.misses) == (3, sum(len(v) for _, v in items), 6, 0)
    assert store.get("f" * 64) is None and store.stats().misses == 1
    assert not r.exists(store._rkey("f" * 64) + ":a")  # a miss leaves no access record behind
    assert store.contains_many([items[0][0], "f" * 64]) == [True, False]
    assert dict((k, e.hits) for k, e in store.entries()) == {k: 2 for k, _ in items}
    assert store.delete(items[0][0]) and not store.delete(items[0][0]) and len(store) == 2


def test_overwrite_with_a_shorter_value_drops_the_stale_pieces(store):
    k, long = entry(0, tokens=64, layers=4)
    _, short = entry(0, tokens=8, layers=4)
    store.put(k, long)
    store.put(k, short)
    assert store.get(k) == short
    h = _raw(store).hgetall(store._rkey(k))
    assert len([f for f in h if f.startswith(b"p") and f != b"pb"]) == int(h[b"n"])


def test_get_range_and_get_layers_move_only_what_they_need(store):
    for codec in ("raw", "int4"):
        k, v = entry(1, codec=codec, tokens=64, layers=6)
        store.put(k, v)
        assert store.get_range(k, 5000, 13000) == v[5000:13000]
        header, parts = store.get_layers(k, range(2, 4))
        kv = get_codec(header["codec"]).decode(parts, torch.float32)  # [2, 2, H, T, D]
        assert torch.equal(kv, unpack_chunk(v, torch.float32).kv[2:4])
        assert torch.equal(parts["token_ids"], unpack_chunk(v).token_ids)
    assert store.get_layers("e" * 64, range(0, 1)) is None


def test_streamed_layers_move_each_piece_once_and_are_checked(store):
    """``span_reader`` under ``stream.LayerStream``: heads, then layer by layer, one round trip a
    step; every piece crosses once however the layers cut it, and the bytes are the entry's; a
    damaged piece is an error, never data."""
    from chunkcache.store.redis_store import _RedisSpans
    from chunkcache.stream import LayerStream

    items = [entry(5 + i, codec=c, tokens=64, layers=6) for i, c in enumerate(["int8", "int2m"])]
    store.put_many(items)
    kept = []
    orig = _RedisSpans._keep

    def keep(self, i, j, piece):
        kept.append((i, j))
        return orig(self, i, j, piece)

    _RedisSpans._keep = keep
    try:
        stream = LayerStream(store, [k for k, _ in items], step_bytes=1).start()
        entries = stream.entries_when_ready()
        stream.wait(5)
        stream.close()
    finally:
        _RedisSpans._keep = orig
    assert [bytes(e) for e in entries] == [v for _, v in items]
    assert len(kept) == len(set(kept)) and {i for i, _ in kept} == {0, 1}
    assert store.stats().hits == 2  # a streamed read counts as a hit, as get does
    k, v = items[0]
    _raw(store).hset(store._rkey(k), "p3", os.urandom(4096))
    stream = LayerStream(store, [k]).start()
    with pytest.raises(CorruptEntryError, match="piece 3"):
        stream.entries_when_ready()
        stream.wait(5)
    stream.close()


def test_a_corrupted_piece_is_caught_by_checksums_and_dropped(store):
    k, v = entry(2, tokens=64, layers=4)
    store.put(k, v)
    _raw(store).hset(store._rkey(k), "p3", os.urandom(4096))  # garbage behind the store's back
    with pytest.raises(CorruptEntryError, match="piece 3"):
        store.get_range(k, 3 * 4096, 3 * 4096 + 10)
    with pytest.warns(RuntimeWarning, match="dropping damaged entry"):
        assert load_chunk(store, k) is None
    assert not store.contains(k)  # deleted, so the engine recomputes it


def test_killed_server_warns_and_misses_within_the_timeout():
    from chunkcache.store.redis_store import RedisStore, RemoteUnavailableError

    require_redis()
    with RedisServer() as srv:
        s = RedisStore(srv.url, socket_timeout=0.5, connect_timeout=0.5, down_seconds=30)
        k, v = entry(3)
        s.put(k, v)
        srv.kill()
        t = time.monotonic()
        with pytest.warns(RuntimeWarning, match="unreachable during get"):
            assert s.get(k) is None
        assert time.monotonic() - t < 2 * 1.0 + 0.5
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # marked down: no new warning, no waiting
            t = time.monotonic()
            assert s.get(k) is None and s.contains(k) is False
            with pytest.raises(RemoteUnavailableError):
                s.put(k, v)
            assert time.monotonic() - t < 0.1
        assert s._misses == 2


def test_hung_server_never_blocks_past_the_socket_timeout():
    from chunkcache.store.redis_store import RedisStore

    require_redis()
    with RedisServer() as srv:
        s = RedisStore(srv.url, socket_timeout=0.5, connect_timeout=0.5, retries=1)
        k, v = entry(4)
        s.put(k, v)
        os.kill(srv.proc.pid, signal.SIGSTOP)  # accepts connections (kernel), never answers
        try:
            t = time.monotonic()
            with pytest.warns(RuntimeWarning, match="Timeout"):
                assert s.get(k) is None
            assert time.monotonic() - t < 2 * (0.5 + 0.5) + 0.5
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        s._down_until = 0  # server back: the next call reconnects
        assert s.get(k) == v


def test_cluster_node_killed_mid_run_gives_misses_not_errors():
    from chunkcache.store.redis_store import RedisStore

    require_redis()
    with RedisClusterProcs(3) as cl:
        s = RedisStore(cl.url, socket_timeout=0.5, connect_timeout=0.5, down_seconds=0)
        items = [entry(i) for i in range(12)]
        s.put_many(items)
        cl.nodes[1].kill()
        t = time.monotonic()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            got = [s.get(k) for k, _ in items]
        assert time.monotonic() - t < 12 * 2.0
        assert any("unreachable" in str(x.message) for x in w)
        assert all(g is None or g == v for g, (_, v) in zip(got, items, strict=True))  # never a wrong value
        assert None in got


def test_two_hosts_one_precomputes_the_other_fuses_with_hits_only(urls, tiny_engine):
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    targets = [urls["single"], urls["cluster"]]
    for u in targets:
        open_store(u).flushdb_prefix()
    worker = [sys.executable, str(HERE / "redis_servers.py")]
    a = subprocess.run(
        [*worker, "precompute", *targets], capture_output=True, text=True, env=env, timeout=120
    )
    assert a.returncode == 0, a.stderr[-2000:]
    b = subprocess.run([*worker, "fuse", *targets], capture_output=True, text=True, env=env, timeout=120)
    assert b.returncode == 0, b.stderr[-2000:]
    want = tiny_engine.fuse(PASSAGES[::-1], QUESTION).logits[:64]
    for line in b.stdout.strip().splitlines():
        r = json.loads(line)
        assert (r["hits"], r["misses"], r["entries"]) == (len(PASSAGES), 0, len(PASSAGES)), r
        torch.testing.assert_close(torch.tensor(r["logits"]), want, rtol=1e-5, atol=1e-5)


def test_missing_redis_server_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server here
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_redis()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="redis-server"):
        require_redis()


def test_sharded_precompute_splits_without_duplicates_and_resumes(urls, model_dir, tmp_path, capsys):
    from chunkcache.cli import main

    url = urls["cluster"]
    open_store(url).flushdb_prefix()
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i} says {i * 7}."}) + "\n" for i in range(10)))

    def shard(spec):
        emit = tmp_path / f"emit-{spec.replace('/', '-')}.jsonl"
        args = ["precompute", str(corpus), "--store", url, "--model", str(model_dir), "--sink", "bos",
                "--shard", spec, "--emit", str(emit), "--device", "cpu"]  # fmt: skip
        assert main(args) == 0
        out = capsys.readouterr().out
        stored = int(out.split(" stored now")[0].split()[-1])
        return stored, [json.loads(x)["key"] for x in emit.read_text().splitlines()]

    n0, k0 = shard("0/2")
    n1, k1 = shard("1/2")
    assert not set(k0) & set(k1) and len(k0) + len(k1) == 10 and (n0, n1) == (len(k0), len(k1))
    assert all(int(k, 16) % 2 == 0 for k in k0) and all(int(k, 16) % 2 == 1 for k in k1)
    assert shard("0/2")[0] == 0  # a rerun of a shard finds its work done
    assert len(open_store(url)) == 10
    with pytest.raises(SystemExit):
        main(["precompute", str(corpus), "--store", url, "--shard", "2/2"])


def test_cli_store_commands_accept_a_redis_url(urls, capsys):
    from store_worker import KEY_INPUTS, random_chunk

    from chunkcache.cli import main
    from chunkcache.format import pack_chunk
    from chunkcache.store.redis_store import RedisStore

    s = RedisStore(urls["single"])
    c = random_chunk(seed=int(uuid.uuid4().hex[:6], 16))
    key = KEY_INPUTS.key(c.token_ids)  # verify checks that an entry hashes to its key
    s.put(key, pack_chunk(c, "raw", KEY_INPUTS.to_dict()))
    assert main(["ls", "--store", urls["single"]]) == 0
    assert key in capsys.readouterr().out
    assert main(["verify", "--store", urls["single"]]) == 0
    assert main(["stats", "--store", urls["single"]]) == 0
    s.delete(key)
    s.close()
