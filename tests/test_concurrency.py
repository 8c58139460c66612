"""Concurrency is normal input: many threads and asyncio tasks calling one engine get exactly what
the same calls get one at a time (CPU fp32: bit-identical), on the eager path and on the fast
path (``pipeline.fuse_entries`` with a pool of stagings), with misses precomputed meanwhile; the
async forms never block the event loop; the text index serves a text seen before without the
tokeniser and never serves a changed text. Tiny random model, CPU, seconds."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import PASSAGES, QUESTION, tiny_model

from chunkcache.engine import ChunkCache
from chunkcache.errors import ModelMismatchError
from chunkcache.generation import generate_defaults
from chunkcache.pipeline import StagingPool

EXTRA = [  # chunks of other lengths, some never precomputed (misses at fuse time)
    "Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity. " * 3,
    "The Great Wall of China is a series of fortifications built across the historical northern borders.",
    "Honey never spoils.",
    "Photosynthesis converts light energy into chemical energy stored in glucose; " * 4,
]
QUESTIONS = [QUESTION, "Where is Kilimanjaro?", "Who studied radioactivity?", "What never spoils?"]


def _requests(n: int, seed: int = 0) -> list[tuple[list[str], str]]:
    rng = random.Random(seed)
    pool = PASSAGES + EXTRA
    return [(rng.sample(pool, rng.randint(1, 5)), rng.choice(QUESTIONS)) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _engine(tok, model, store=None, **kw) -> ChunkCache:
    return ChunkCache(model=model, tokenizer=tok, store=store, **kw)


@pytest.mark.parametrize("fast_path", [False, True])
def test_threads_equal_sequential(smol_tokenizer, model, tmp_path, fast_path):
    reqs = _requests(16)
    eng = _engine(smol_tokenizer, model, str(tmp_path / "s"), fast_path=fast_path, concurrent_fusions=2)
    eng.precompute(PASSAGES[:3])  # the rest are misses, precomputed by whichever thread comes first

    def call(r):
        return eng.fuse(r[0], r[1], recompute_ratio=0.3)

    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(call, reqs))
    # The same calls one at a time, over the same entries (a chunk encoded in a padded batch may
    # differ in the last bit from one encoded alone, so the store is shared, not rebuilt).
    ref_eng = _engine(smol_tokenizer, model, eng.store, fast_path=fast_path)
    ref = [ref_eng.fuse(c, q, recompute_ratio=0.3) for c, q in reqs]
    for a, b in zip(ref, got, strict=True):
        assert b.stats.get("fast_path", False) is fast_path
        assert torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.selected, b.selected)
        assert torch.equal(a.logits, b.logits)
        assert torch.equal(a.kv, b.kv)
    eng.store.close()


def test_asyncio_callers_equal_sequential_and_never_block_the_loop(smol_tokenizer, model):
    eng = _engine(smol_tokenizer, model, fast_path=True, concurrent_fusions=2)
    reqs = _requests(6, seed=1)
    want_fused = [eng.fuse(c, q, recompute_ratio=0.2).logits for c, q in reqs]
    want_text = [eng.generate(c, q, max_new_tokens=5) for c, q in reqs]

    async def ticking(aw):
        """``await aw`` while a ticker counts how often the event loop got to run meanwhile."""
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        tick = asyncio.create_task(ticker())
        out = await aw
        done.set()
        await tick
        return out, ticks

    async def pieces(c, q):
        return [p async for p in eng.astream_generate(c, q, max_new_tokens=5)]

    async def main():
        fused = await ticking(asyncio.gather(*(eng.afuse(c, q, recompute_ratio=0.2) for c, q in reqs)))
        texts = await ticking(asyncio.gather(*(eng.agenerate(c, q, max_new_tokens=5) for c, q in reqs)))
        streamed = await ticking(asyncio.gather(*(pieces(c, q) for c, q in reqs)))
        return fused, texts, streamed

    (fused, t1), (texts, t2), (streamed, t3) = asyncio.run(main())
    assert all(torch.equal(a, b.logits) for a, b in zip(want_fused, fused, strict=True))
    assert texts == want_text
    assert ["".join(p).strip() for p in streamed] == want_text
    # the loop kept running while each kind of work went on (blocked, it would tick a few times)
    assert min(t1, t2, t3) > 10, (t1, t2, t3)


def test_stream_closed_early_stops_and_frees(smol_tokenizer, model):
    eng = _engine(smol_tokenizer, model)
    it = eng.stream_generate(PASSAGES[:2], QUESTION, max_new_tokens=200)
    next(it)
    it.close()  # joins the generating thread: nothing keeps running
    assert not [t for t in threading.enumerate() if t.name == "chunkcache-generate"]
    assert eng.generate(PASSAGES[:1], QUESTION, max_new_tokens=3) is not None


def test_staging_pool_hands_each_staging_to_one_caller_at_a_time():
    pool = StagingPool("cpu", size=2)
    held: list[int] = []
    lock = threading.Lock()
    most = [0]
    seen = set()

    def work(_):
        with pool.take() as st:
            with lock:
                assert id(st) not in held  # nobody else holds this one
                held.append(id(st))
                seen.add(id(st))
                most[0] = max(most[0], len(held))
            time.sleep(0.01)
            with lock:
                held.remove(id(st))

    with ThreadPoolExecutor(6) as ex:
        list(ex.map(work, range(18)))
    assert most[0] == 2 and len(seen) == 2
    with pytest.raises(ValueError, match="at least one"):
        StagingPool("cpu", size=0)


def test_staging_pool_serves_waiters_first_come_first_served(monkeypatch):
    """A staging handed back goes to the caller that waited longest, never to one that came later
    (a plain condition let returning callers barge in: p99 far above the median); a failed
    creation passes its slot on to the next waiter."""
    pool = StagingPool("cpu", size=1)
    order: list[int] = []
    release = threading.Event()

    def holder():
        with pool.take():
            release.wait()
        with pool.take():  # straight back for more: it must queue behind those already waiting
            order.append("again")

    def waiter(i):
        with pool.take():
            order.append(i)

    first = threading.Thread(target=holder)
    first.start()
    while not pool._made:
        time.sleep(0.001)
    threads = []
    for i in range(5):  # queued one after another, in this order
        threads.append(threading.Thread(target=waiter, args=(i,)))
        threads[-1].start()
        while len(pool._waiters) < i + 1:
            time.sleep(0.001)
    release.set()
    for t in [first, *threads]:
        t.join()
    assert order == [0, 1, 2, 3, 4, "again"]
    assert len(pool.stagings()) == 1 and not pool._waiters

    import chunkcache.pipeline as pipeline

    pool = StagingPool("cpu", size=1)
    real, calls = pipeline.Staging, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of device memory")
        return real(*a, **kw)

    monkeypatch.setattr(pipeline, "Staging", flaky)
    with pytest.raises(RuntimeError, match="out of device memory"):
        with pool.take():
            pass
    with pool.take() as st:  # the slot came back: the next caller makes one
        assert isinstance(st, real)
    assert pool._made == 1


# ---- the text index ------------------------------------------------------------------------------


def _count_tokenising(eng, monkeypatch) -> list[str]:
    calls: list[str] = []
    real = eng._chunk_ids

    def counted(text):
        calls.append(text)
        return real(text)

    monkeypatch.setattr(eng, "_chunk_ids", counted)
    return calls


@pytest.mark.parametrize("fast_path", [False, True])
def test_text_seen_before_costs_no_tokeniser_call(smol_tokenizer, model, tmp_path, monkeypatch, fast_path):
    eng = _engine(smol_tokenizer, model, str(tmp_path / "s"), fast_path=fast_path)
    calls = _count_tokenising(eng, monkeypatch)
    first = eng.fuse(PASSAGES, QUESTION, recompute_ratio=0.2)
    assert len(calls) == len(PASSAGES)
    again = eng.fuse(PASSAGES[::-1], QUESTION, recompute_ratio=0.2)
    assert len(calls) == len(PASSAGES)  # every chunk from the index
    assert eng.key(PASSAGES[0]) == eng.key_for_ids(eng.template.chunk_ids(PASSAGES[0]))
    eng.store.close()
    # persisted beside the store: a restarted engine tokenises nothing it saw before
    eng2 = _engine(smol_tokenizer, model, str(tmp_path / "s"), fast_path=fast_path)
    calls2 = _count_tokenising(eng2, monkeypatch)
    third = eng2.fuse(PASSAGES, QUESTION, recompute_ratio=0.2)
    assert calls2 == []
    assert torch.equal(first.logits, third.logits)
    assert again.input_ids.shape == first.input_ids.shape
    eng2.store.close()


def test_changed_text_is_never_served_from_the_index(smol_tokenizer, model):
    eng = _engine(smol_tokenizer, model, fast_path=True)
    eng.fuse(PASSAGES[:2], QUESTION)
    changed = [PASSAGES[0].replace("1889", "1899"), PASSAGES[1]]
    got = eng.fuse(changed, QUESTION, recompute_ratio=0.2)
    want = _engine(smol_tokenizer, model).fuse(changed, QUESTION, recompute_ratio=0.2)
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.logits, want.logits)
    # a record that disagrees with the entry's stored token ids is refused, never used
    index = eng.text_index()
    key0, ids0 = index.get_many([PASSAGES[0]])[0]
    _, ids1 = index.get_many([PASSAGES[1]])[0]
    index.put_many([(PASSAGES[0], key0, ids1)])
    with pytest.raises(ModelMismatchError, match="other tokens"):
        eng.fuse(PASSAGES[:1], QUESTION)
    eager = _engine(smol_tokenizer, model, store=eng.store, fast_path=False)
    eager.text_index().put_many([(PASSAGES[0], key0, ids1)])
    with pytest.raises(ModelMismatchError, match="other tokens"):
        eager.fuse(PASSAGES[:1], QUESTION)


def test_index_namespaces_never_share_records(smol_tokenizer, model):
    """Another codec (or model, template, tokenizer) gets its own namespace: its keys differ."""
    a = _engine(smol_tokenizer, model)
    b = _engine(smol_tokenizer, model, store=a.store, codec="int8")
    assert a.key(PASSAGES[0]) != b.key(PASSAGES[0])
    assert a.text_index().digest(PASSAGES[0]) != b.text_index().digest(PASSAGES[0])


def test_pad_token_id_zero_is_kept():
    class Tok:
        pad_token_id, eos_token_id = 0, 2

    assert generate_defaults(Tok())["pad_token_id"] == 0
    Tok.pad_token_id = None
    assert generate_defaults(Tok())["pad_token_id"] == 2


@pytest.mark.parametrize("fast_path", [False, True])
def test_threads_equal_sequential_with_two_variants_and_per_chunk_contexts(smol_tokenizer, model, fast_path):
    """exact_first with each chunk behind its own passages (its nearest ones): misses make both
    variants under concurrent callers, and every result equals the same call alone."""
    from chunkcache.corpus import Neighbours

    pool = PASSAGES + EXTRA
    kw = dict(sink="context", sink_context=Neighbours(pool, k=2), exact_first=True, fast_path=fast_path)
    eng = _engine(smol_tokenizer, model, concurrent_fusions=2, **kw)
    reqs = _requests(12, seed=3)
    with ThreadPoolExecutor(6) as ex:
        got = list(ex.map(lambda r: eng.fuse(r[0], r[1], recompute_ratio=0.3), reqs))
    assert len(eng.store) == 2 * len({t for c, _ in reqs for t in c})  # each chunk twice, once each
    ref_eng = _engine(smol_tokenizer, model, eng.store, **kw)  # the same entries, its own contexts
    for (c, q), b in zip(reqs, got, strict=True):
        a = ref_eng.fuse(c, q, recompute_ratio=0.3)
        assert b.stats["exact_chunks"][0] and not any(b.stats["exact_chunks"][1:])
        assert torch.equal(a.logits, b.logits) and torch.equal(a.kv, b.kv)


@pytest.mark.parametrize("grow", [False, True])
def test_store_writes_wait_for_fusions_only_when_the_map_must_grow(
    smol_tokenizer, model, tmp_path, monkeypatch, grow
):
    """A miss written to the store while another fusion holds views of the LMDB map must not wait
    for that fusion (one client's miss would stall every fusion behind it: the p99 of a loaded
    server), unless the write must grow, and so move, the map: then it waits until the views are
    let go, and both the fusion and the written entry are right."""
    import chunkcache.pipeline as pipeline
    from chunkcache.store import LMDBStore

    path = str(tmp_path / "s")
    eng = _engine(smol_tokenizer, model, path, fast_path=True)
    eng.precompute(PASSAGES[:2])
    want = eng.fuse(PASSAGES[:2], QUESTION, recompute_ratio=0.3)
    if grow:  # reopen with the map just large enough for what it holds: the next write must grow it
        size = eng.store._env.info()["map_size"]
        used = (eng.store._env.info()["last_pgno"] + 1) * eng.store._env.stat()["psize"]
        eng.store.close()
        eng = _engine(smol_tokenizer, model, LMDBStore(path, map_size=used + 4096), fast_path=True)
        assert eng.store._env.info()["map_size"] < size
    entered, release = threading.Event(), threading.Event()
    real = pipeline.fuse_entries

    def held(*a, **k):  # the fusion, holding its views of the map, waits for the test
        entered.set()
        assert release.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "fuse_entries", held)
    out = {}
    fusing = threading.Thread(
        target=lambda: out.update(res=eng.fuse(PASSAGES[:2], QUESTION, recompute_ratio=0.3))
    )
    fusing.start()
    assert entered.wait(30)
    writing = threading.Thread(target=lambda: out.update(keys=eng.precompute([EXTRA[0]])))
    writing.start()
    writing.join(3)
    assert writing.is_alive() is grow  # a write that fits went through while the views were held
    release.set()
    fusing.join(30)
    writing.join(30)
    assert not fusing.is_alive() and not writing.is_alive()
    assert torch.equal(out["res"].logits, want.logits) and torch.equal(out["res"].kv, want.kv)
    monkeypatch.setattr(pipeline, "fuse_entries", real)
    assert eng.store.contains(out["keys"][0])
    ref = _engine(smol_tokenizer, model, fast_path=True)  # the written entry is the one a fresh engine makes
    assert torch.equal(eng.chunk(EXTRA[0]).kv, ref.chunk(EXTRA[0]).kv)
    eng.store.close()
