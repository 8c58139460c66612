"""The device cache of hot entries (``devicecache.DeviceCache``, ``ChunkCache(device_cache_bytes=)``):
fusions that take entries from it equal fusions from the store bit for bit; it keeps to its byte
budget, least recently used out; a store entry damaged after admission does not matter (the
resident copy was verified); threads share it safely. On CPU the "device" is host memory: the
same code paths (the CUDA ones are in tests/test_gpu_devicecache.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import PASSAGES, QUESTION, tiny_model

from chunkcache.devicecache import DeviceCache
from chunkcache.engine import ChunkCache


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _pair(tok, model, tmp_path, codec="int8", budget=1 << 30):
    ref = ChunkCache(model=model, tokenizer=tok, store=str(tmp_path / "s"), codec=codec, fast_path=True)
    ref.precompute(PASSAGES)
    hot = ChunkCache(
        model=model, tokenizer=tok, store=ref.store, codec=codec, fast_path=True, device_cache_bytes=budget
    )
    return ref, hot


def _same(a, b) -> None:
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.selected, b.selected)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.kv, b.kv)


@pytest.mark.parametrize("codec", ["raw", "int8", "int4"])
def test_resident_fusion_equals_store_fusion(smol_tokenizer, model, tmp_path, codec):
    ref, hot = _pair(smol_tokenizer, model, tmp_path, codec)
    chunks = PASSAGES[:3]
    want = ref.fuse(chunks, QUESTION, recompute_ratio=0.3)
    first = hot.fuse(chunks, QUESTION, recompute_ratio=0.3)  # from the store, then admitted
    assert first.stats["device_cache"] == {"hits": 0, "admitted": 3}
    again = hot.fuse(list(reversed(chunks)) + [PASSAGES[3]], QUESTION, recompute_ratio=0.3)
    assert again.stats["device_cache"] == {"hits": 3, "admitted": 1}  # a mix: 3 resident, 1 read
    third = hot.fuse(chunks, QUESTION, recompute_ratio=0.3)
    assert third.stats["device_cache"] == {"hits": 3, "admitted": 0}
    assert third.stats["zero_copy"] and not first.stats["zero_copy"] and not again.stats["zero_copy"]
    _same(want, first)
    _same(want, third)
    _same(ref.fuse(list(reversed(chunks)) + [PASSAGES[3]], QUESTION, recompute_ratio=0.3), again)


def test_budget_evicts_least_recently_used(smol_tokenizer, model, tmp_path):
    ref, probe = _pair(smol_tokenizer, model, tmp_path)
    sizes = []
    for p in PASSAGES[:3]:  # each entry's device bytes
        before = probe.device_cache.nbytes
        probe.fuse([p], QUESTION)
        sizes.append(probe.device_cache.nbytes - before)
    assert min(sizes) > 0
    _, hot = _pair(smol_tokenizer, model, tmp_path / "b", budget=sizes[1] + sizes[2])
    hot.fuse(PASSAGES[:2], QUESTION)
    hot.fuse(PASSAGES[2:3], QUESTION)  # over budget: the least recently used goes
    cache = hot.device_cache
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    assert cache.stats()["evicted"] == 1
    keys = hot.resolve(PASSAGES[:3])[0]
    assert [r is not None for r in cache.acquire(keys)] == [False, True, True]


def test_damaged_store_entry_after_admission_is_not_used(smol_tokenizer, model, tmp_path):
    ref, hot = _pair(smol_tokenizer, model, tmp_path, codec="raw")
    chunks = PASSAGES[:2]
    want = ref.fuse(chunks, QUESTION)
    hot.fuse(chunks, QUESTION)
    key = hot.resolve(chunks[:1])[0][0]
    value = bytearray(hot.store.get(key))
    value[-100] ^= 0xFF  # damage a KV byte in the store's copy
    hot.store.put(key, bytes(value))
    got = hot.fuse(chunks, QUESTION)
    assert got.stats["device_cache"]["hits"] == 2
    _same(want, got)


def test_threads_share_it_and_equal_sequential(smol_tokenizer, model, tmp_path):
    ref, hot = _pair(smol_tokenizer, model, tmp_path)
    reqs = [([PASSAGES[(i + j) % len(PASSAGES)] for j in range(1 + i % 3)], QUESTION) for i in range(12)]
    with ThreadPoolExecutor(6) as ex:
        got = list(ex.map(lambda r: hot.fuse(*r), reqs))
    for (c, q), g in zip(reqs, got, strict=True):
        _same(ref.fuse(c, q), g)


def test_bad_budget_is_refused_before_the_model_loads():
    with pytest.raises(ValueError, match="device_cache_bytes"):
        DeviceCache("cpu", -1)
    with pytest.raises(ValueError, match="device_cache_bytes"):
        ChunkCache(model="/nonexistent", device_cache_bytes=1.5)


def _held_puts(store, refuse: bool = False):
    """Make ``store``'s puts wait for the returned event (a slow disk, a remote store), or, with
    ``refuse``, fail as a full disk does; ``store.puts`` counts them."""
    import threading

    from chunkcache.errors import StoreError

    go, real = threading.Event(), store.put
    store.puts = 0

    def put(key, value):
        store.puts += 1
        if refuse:
            raise StoreError("disk full")
        assert go.wait(30)
        real(key, value)

    store.put = put
    return go


@pytest.mark.parametrize("on_device", [True, False], ids=["parts-from-device", "packed-first"])
def test_a_serving_miss_is_written_behind_through_the_device_cache(
    smol_tokenizer, model, tmp_path, monkeypatch, on_device
):
    """With a device cache, a fusion's miss is encoded, admitted to the device cache and written
    to the store by a background thread: the fusion does not wait for the write (a slow store's
    put is the tail of a loaded server), its result equals a fusion of the stored entry, another
    fusion of that chunk meanwhile takes it from the device cache (never encodes it again), and
    after ``flush`` the store holds the entry a plain engine makes. By default the entry is
    serialised on the writer's thread only (the device cache takes the codec parts as encoded)."""
    import threading

    import chunkcache.engine as engine_mod

    monkeypatch.setattr(ChunkCache, "_pack_on_device", on_device)
    packers = []
    real_pack = ChunkCache._pack
    monkeypatch.setattr(
        ChunkCache, "_pack", lambda self, *a, **k: packers.append(threading.current_thread().name) or real_pack(self, *a, **k)
    )

    ref = ChunkCache(
        model=model, tokenizer=smol_tokenizer, store=str(tmp_path / "ref"), codec="int8", fast_path=True
    )
    want = ref.fuse(PASSAGES[:3], QUESTION, recompute_ratio=0.3)  # every chunk a miss, written first
    hot = ChunkCache(model=model, tokenizer=smol_tokenizer, store=str(tmp_path / "s"), codec="int8", fast_path=True,
                     device_cache_bytes=1 << 30)  # fmt: skip
    hot.precompute(PASSAGES[:2])
    packers.clear()  # (those two were written first, on this thread)
    go = _held_puts(hot.store)
    encoded = []
    real = engine_mod.encode_chunks
    monkeypatch.setattr(
        engine_mod,
        "encode_chunks",
        lambda lm, ids, *a, **k: encoded.append(len(ids)) or real(lm, ids, *a, **k),
    )
    out = {}
    t = threading.Thread(target=lambda: out.update(res=hot.fuse(PASSAGES[:3], QUESTION, recompute_ratio=0.3)))
    t.start()
    t.join(20)
    if t.is_alive():
        go.set()
        pytest.fail("the fusion waited for the store write of its miss")
    assert hot.store.puts == 1 and not hot.store.contains(hot.key(PASSAGES[2]))  # still being written
    got = out["res"]
    _same(want, got)
    assert got.stats["misses"]["chunks"] == 1 and encoded == [1]
    other = hot.fuse([PASSAGES[2], PASSAGES[0]], QUESTION, recompute_ratio=0.3)  # meanwhile: resident
    assert other.stats["device_cache"]["hits"] == 2 and "misses" not in other.stats and encoded == [1]
    _same(ref.fuse([PASSAGES[2], PASSAGES[0]], QUESTION, recompute_ratio=0.3), other)
    go.set()
    hot.flush()
    assert hot.store.get(hot.key(PASSAGES[2])) == ref.store.get(ref.key(PASSAGES[2]))
    if on_device:  # nothing of the miss serialised on a caller's thread: only the writer's
        assert packers == ["chunkcache-write-behind"], packers
    else:
        assert len(packers) == 1 and packers[0] != "chunkcache-write-behind", packers
    monkeypatch.undo()
    ref.store.close()
    hot.store.close()


def test_a_miss_the_device_cache_cannot_take_is_written_before_the_fusion(smol_tokenizer, model, tmp_path):
    hot = ChunkCache(
        model=model,
        tokenizer=smol_tokenizer,
        store=str(tmp_path / "s"),
        codec="int8",
        fast_path=True,
        device_cache_bytes=1024,
    )  # fmt: skip  (smaller than any entry)
    res = hot.fuse(PASSAGES[:2], QUESTION, recompute_ratio=0.3)
    assert hot._behind is None and all(hot.store.contains_many([hot.key(p) for p in PASSAGES[:2]]))
    assert res.stats["misses"]["chunks"] == 2
    hot.store.close()


def test_a_background_write_the_store_refuses_is_warned_and_lets_go_of_the_chunk(
    smol_tokenizer, model, tmp_path
):
    hot = ChunkCache(model=model, tokenizer=smol_tokenizer, store=str(tmp_path / "s"), codec="int8", fast_path=True,
                     device_cache_bytes=1 << 30)  # fmt: skip
    _held_puts(hot.store, refuse=True)
    with pytest.warns(RuntimeWarning, match="cannot write to the chunk store"):
        hot.fuse(PASSAGES[:1], QUESTION, recompute_ratio=0.3)
        hot.flush()
    assert hot.store.puts == 1 and hot._inflight == {}  # the claim was let go: a later miss is encoded again
    hot.device_cache.drop(hot.key(PASSAGES[0]))
    again = hot.fuse(PASSAGES[:1], QUESTION, recompute_ratio=0.3)
    hot.flush()
    assert again.stats["misses"]["chunks"] == 1 and hot.store.puts == 2
    hot.store.close()
