"""The batched decoder (``chunkcache.decode``): greedy tokens equal ``model.generate`` over the same
fused cache; concurrent requests of different lengths (threads, asyncio), batched together and
joining as others leave, get exactly their own-alone tokens; seeded sampling is reproducible,
matches ``generate``'s draw and does not depend on what else is decoded; a consumer that stops
early frees its request; bad arguments fail before any work. CPU, tiny random fp32 models (and
SmolLM2 for the greedy contract)."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import PASSAGES, QUESTION, tiny_model
from test_concurrency import _requests

from chunkcache.decode import DecodeConfig, Decoder, Sampling, sampling_from
from chunkcache.engine import ChunkCache
from chunkcache.generation import answer_text, generate_text
from chunkcache.model import cache_kwarg


@pytest.fixture(scope="module")
def engine(smol_tokenizer):
    return ChunkCache(
        model=tiny_model(), tokenizer=smol_tokenizer, store=None, decode_batching=DecodeConfig(4)
    )


def _hf_tokens(lm, fused, n: int, **kw) -> list[int]:
    """``model.generate``'s new tokens over the fused cache (the engine's HF path)."""
    ids = fused.input_ids
    pad = lm.tokenizer.pad_token_id
    out = lm.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
        pad_token_id=pad, **{"do_sample": False, **kw}, **{cache_kwarg(lm.model): fused.fresh_cache()},
    )  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def _eos(lm) -> tuple[int, ...]:
    return sampling_from({}, lm.model.generation_config)[0].eos


def _held(dec: Decoder, k: int):
    """Hold the decoder's first step until ``k`` requests wait (so they batch deterministically)."""
    gate, step = threading.Event(), dec.step

    def held(active):
        gate.wait(30)
        return step(active)

    dec.step = held

    def release():
        for _ in range(3000):
            if dec.pending() >= k:
                break
            threading.Event().wait(0.01)
        gate.set()

    return release


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_greedy_equals_generate(smol_tokenizer, arch):
    kw = {"sliding_window": 24} if arch == "mistral" else {}  # a window shorter than the prompt
    eng = ChunkCache(model=tiny_model(arch, **kw), tokenizer=smol_tokenizer, store=None)
    dec = Decoder(eng.lm)
    for chunks in (PASSAGES[:1], PASSAGES[1:4]):
        fused = eng.fuse(chunks, QUESTION, recompute_ratio=0.3)
        want = _hf_tokens(eng.lm, fused, 24)
        assert list(dec.tokens(fused, 24, Sampling(eos=_eos(eng.lm)))) == want
    dec.close()


@pytest.mark.slow
def test_greedy_equals_generate_smollm2(smol):
    eng = ChunkCache(model=smol.model, tokenizer=smol.tokenizer, store=None, decode_batching=DecodeConfig(4))
    reqs = [
        (PASSAGES[:2], QUESTION),
        (PASSAGES[1:4], "Where is Kilimanjaro?"),
        (PASSAGES[3:], "Who was Curie?"),
    ]
    fused = [eng.fuse(c, q) for c, q in reqs]
    want = [_hf_tokens(eng.lm, f, 20) for f in fused]
    release = _held(eng.decoder, len(reqs))
    with ThreadPoolExecutor(len(reqs)) as ex:
        futures = [
            ex.submit(lambda f: list(eng.decoder.tokens(f, 20, Sampling(eos=_eos(eng.lm)))), f) for f in fused
        ]
        release()
        got = [f.result() for f in futures]
    assert got == want
    assert eng.decoder.rows > eng.decoder.steps  # they shared steps
    assert [eng.generate_from(f, max_new_tokens=20) for f in fused] == [
        answer_text(smol.tokenizer, w) for w in want
    ]


def _alone(eng, fused, n, sampling: Sampling | None = None) -> list[int]:
    dec = Decoder(eng.lm, DecodeConfig(max_batch=1))
    try:
        return list(dec.tokens(fused, n, sampling or Sampling()))
    finally:
        dec.close()


def test_threads_batched_equal_alone(engine):
    reqs = _requests(10, seed=3)
    news = [3, 17, 9, 25, 2, 12, 30, 5, 21, 8]
    fused = [engine.fuse(c, q, recompute_ratio=0.2) for c, q in reqs]
    eos = _eos(engine.lm)
    alone = [_alone(engine, f, n, Sampling(eos=eos)) for f, n in zip(fused, news, strict=True)]
    assert alone[:3] == [_hf_tokens(engine.lm, f, n) for f, n in zip(fused[:3], news[:3], strict=True)]
    dec = Decoder(engine.lm, DecodeConfig(max_batch=4))  # 10 requests, 4 at a time: they join as others leave
    release = _held(dec, 4)
    with ThreadPoolExecutor(10) as ex:
        futures = [ex.submit(lambda f, n: list(dec.tokens(f, n, Sampling(eos=eos))), f, n) for f, n in zip(fused, news, strict=True)]  # fmt: skip
        release()
        got = [f.result() for f in futures]
    assert got == alone
    assert dec.rows > dec.steps  # batched: fewer steps than request-steps
    assert dec.pending() == 0
    dec.close()


def test_engine_threads_and_asyncio_equal_sequential(engine, smol_tokenizer):
    reqs = _requests(8, seed=4)
    news = [6, 14, 3, 20, 9, 11, 4, 16]
    plain = ChunkCache(model=engine.model, tokenizer=smol_tokenizer, store=None)  # model.generate
    want = [plain.generate(c, q, max_new_tokens=n) for (c, q), n in zip(reqs, news, strict=True)]
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda r, n: engine.generate(r[0], r[1], max_new_tokens=n), reqs, news))
    assert got == want
    streamed = [
        "".join(engine.stream_generate(c, q, max_new_tokens=n)) for (c, q), n in zip(reqs, news, strict=True)
    ]
    assert [s.strip() for s in streamed] == want

    async def main():
        ticks = 0
        stop = asyncio.Event()

        async def tick():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        texts = await asyncio.gather(
            *(engine.agenerate(c, q, max_new_tokens=n) for (c, q), n in zip(reqs, news, strict=True))
        )

        async def pieces(c, q, n):
            return "".join([p async for p in engine.astream_generate(c, q, max_new_tokens=n)])

        streams = await asyncio.gather(*(pieces(c, q, n) for (c, q), n in zip(reqs, news, strict=True)))
        stop.set()
        await ticker
        return texts, streams, ticks

    texts, streams, ticks = asyncio.run(main())
    assert texts == want
    assert [s.strip() for s in streams] == want
    assert ticks > 10  # the loop kept running while they decoded


def test_seeded_sampling_reproducible_and_independent_of_the_batch(engine):
    reqs = _requests(6, seed=7)
    fused = [engine.fuse(c, q, recompute_ratio=0.2) for c, q in reqs]
    s = Sampling(do_sample=True, temperature=1.5, top_k=40, top_p=0.95, seed=11)
    alone = _alone(engine, fused[0], 24, s)
    assert _alone(engine, fused[0], 24, s) == alone
    other = _alone(
        engine, fused[0], 24, Sampling(do_sample=True, temperature=1.5, top_k=40, top_p=0.95, seed=12)
    )
    assert other != alone  # the seed matters
    dec = Decoder(engine.lm, DecodeConfig(max_batch=6))
    mixes = [s] + [Sampling(do_sample=i % 2 == 0, temperature=2.0, seed=100 + i) for i in range(1, 6)]
    release = _held(dec, 6)
    with ThreadPoolExecutor(6) as ex:
        futures = [
            ex.submit(lambda f, m: list(dec.tokens(f, 24, m)), f, m)
            for f, m in zip(fused, mixes, strict=True)
        ]
        release()
        got = [f.result() for f in futures]
    assert got[0] == alone
    assert got[1:] == [_alone(engine, f, 24, m) for f, m in zip(fused[1:], mixes[1:], strict=True)]
    dec.close()


def test_sampling_draws_what_generate_draws(engine):
    """The same warpers in the same order, and multinomial from a generator seeded as torch's global
    one: the same tokens as ``model.generate`` after ``torch.manual_seed``."""
    fused = engine.fuse(PASSAGES[:2], QUESTION)
    for kw in (
        {"temperature": 1.3, "top_k": 30, "top_p": 0.9},
        {"temperature": 0.7},
        {"top_p": 0.5, "top_k": 0},
    ):
        torch.manual_seed(5)
        want = _hf_tokens(engine.lm, fused, 16, do_sample=True, **kw)
        sampling, _ = sampling_from({"do_sample": True, "seed": 5, **kw}, engine.model.generation_config)
        assert _alone(engine, fused, 16, sampling) == want, kw


def test_eos_and_max_new_tokens_end_a_request(engine):
    fused = engine.fuse(PASSAGES[:2], QUESTION)
    greedy = _alone(engine, fused, 12)
    assert len(greedy) == 12
    assert _alone(engine, fused, 12, Sampling(eos=(greedy[4],))) == greedy[: greedy.index(greedy[4]) + 1]
    assert _alone(engine, fused, 1) == greedy[:1]  # from the fusion's logits alone


def test_closed_stream_frees_its_request(engine):
    fused = engine.fuse(PASSAGES[:2], QUESTION)
    dec = Decoder(engine.lm, DecodeConfig(max_batch=2))
    long = dec.tokens(fused, 3000)
    next(long), next(long)
    (req,) = dec._active
    buf = weakref.ref(req.buf)
    long.close()
    for _ in range(500):
        if dec.pending() == 0:
            break
        threading.Event().wait(0.01)
    del req
    gc.collect()
    assert dec.pending() == 0 and buf() is None
    assert list(dec.tokens(fused, 3)) == _alone(engine, fused, 3)  # the worker goes on

    async def cancelled():
        agen = dec.atokens(fused, 3000)
        task = asyncio.ensure_future(agen.__anext__())
        await task
        await agen.aclose()

    asyncio.run(cancelled())
    for _ in range(500):
        if dec.pending() == 0:
            break
        threading.Event().wait(0.01)
    assert dec.pending() == 0
    dec.close()


def test_a_failing_step_fails_its_requests_only(engine):
    fused = engine.fuse(PASSAGES[:1], QUESTION)
    dec = Decoder(engine.lm)
    step = dec.step

    def boom(active):
        dec.step = step
        raise RuntimeError("out of memory (simulated)")

    dec.step = boom
    with pytest.raises(RuntimeError, match="simulated"):
        list(dec.tokens(fused, 5))
    assert list(dec.tokens(fused, 5)) == _alone(engine, fused, 5)
    dec.close()
    with pytest.raises(RuntimeError, match="closed"):
        list(dec.tokens(fused, 5))


def test_unsupported_kwargs_decode_through_generate(engine, smol_tokenizer):
    plain = ChunkCache(model=engine.model, tokenizer=smol_tokenizer, store=None)
    want = plain.generate(PASSAGES[:2], QUESTION, max_new_tokens=8, repetition_penalty=1.3)
    with pytest.warns(RuntimeWarning, match="repetition_penalty"):
        got = engine.generate(PASSAGES[:2], QUESTION, max_new_tokens=8, repetition_penalty=1.3)
    assert got == want
    with pytest.raises(ValueError, match="seed"):  # model.generate cannot honour a seed
        engine.generate(PASSAGES[:2], QUESTION, max_new_tokens=8, repetition_penalty=1.3, seed=1)
    with pytest.raises(ValueError, match="seed"):
        plain.generate(PASSAGES[:2], QUESTION, max_new_tokens=8, do_sample=True, seed=1)


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "8"])
def test_bad_max_new_tokens_fail_before_work(smol_tokenizer, monkeypatch, bad):
    for batching in (None, DecodeConfig()):
        eng = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=None, decode_batching=batching)
        monkeypatch.setattr(eng, "fuse", lambda *a, **k: pytest.fail("fused before checking"))
        with pytest.raises(ValueError, match="max_new_tokens"):
            eng.generate(PASSAGES[:1], QUESTION, max_new_tokens=bad)
        with pytest.raises(ValueError, match="max_new_tokens"):
            eng.stream_generate(PASSAGES[:1], QUESTION, max_new_tokens=bad)
        with pytest.raises(ValueError, match="max_new_tokens"):
            eng.astream_generate(PASSAGES[:1], QUESTION, max_new_tokens=bad)
        with pytest.raises(ValueError, match="max_new_tokens"):
            asyncio.run(eng.agenerate(PASSAGES[:1], QUESTION, max_new_tokens=bad))


def test_bad_sampling_and_config_fail_before_work(engine, monkeypatch):
    fused = engine.fuse(PASSAGES[:1], QUESTION)
    with pytest.raises(ValueError, match="positions"):  # longer than the model's context
        engine.decoder.tokens(fused, 10**6)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.decoder.tokens(fused, 0)
    monkeypatch.setattr(engine, "fuse", lambda *a, **k: pytest.fail("fused before checking"))
    for kw, match in [
        ({"do_sample": True, "temperature": 0}, "temperature"),
        ({"do_sample": True, "top_p": 0.0}, "top_p"),
        ({"do_sample": True, "top_k": -1}, "top_k"),
        ({"do_sample": "yes"}, "do_sample"),
        ({"seed": "7"}, "seed"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            engine.generate(PASSAGES[:1], QUESTION, max_new_tokens=4, **kw)
        with pytest.raises((ValueError, TypeError), match=match):
            engine.stream_generate(PASSAGES[:1], QUESTION, max_new_tokens=4, **kw)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="max_batch"):
            DecodeConfig(max_batch=bad)
    with pytest.raises(TypeError, match="decode_batching"):
        ChunkCache(model="no-such-model", decode_batching=8)


def test_generate_text_unchanged_by_the_refactor(engine, smol_tokenizer):
    """The HF path's text helpers (``answer_text`` now shared) give what they gave."""
    fused = engine.fuse(PASSAGES[:2], QUESTION)
    cache = {cache_kwarg(engine.model): fused.fresh_cache()}
    assert generate_text(engine.lm, fused.input_ids, cache, 10) == answer_text(
        smol_tokenizer, _hf_tokens(engine.lm, fused, 10)
    )


@pytest.mark.parametrize("max_batch, graphs", [(4, False), (16, False), (16, True)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_many_threads_on_cuda_equal_alone(smol_tokenizer, max_batch, graphs):
    """32 requests of different lengths from 16 threads (greedy and seeded sampling), at most
    ``max_batch`` decoded together, on CUDA (fused kernels in ``packed_layer``; with ``graphs``
    the steps replayed as CUDA graphs): each gets its own-alone tokens; greedy ones also what
    ``model.generate`` gives."""
    eng = ChunkCache(model=tiny_model().to("cuda"), tokenizer=smol_tokenizer, store=None)
    reqs = _requests(32, seed=9)
    fused = [eng.fuse(c, q, recompute_ratio=0.2) for c, q in reqs]
    news = [2 + (7 * i) % 29 for i in range(32)]
    eos = _eos(eng.lm)
    modes = [
        Sampling(eos=eos) if i % 3 else Sampling(do_sample=True, top_p=0.9, seed=i, eos=eos)
        for i in range(32)
    ]
    alone = [_alone(eng, f, n, m) for f, n, m in zip(fused, news, modes, strict=True)]
    greedy = [i for i in range(32) if not modes[i].do_sample][:6]
    assert [alone[i] for i in greedy] == [_hf_tokens(eng.lm, fused[i], news[i]) for i in greedy]
    dec = Decoder(eng.lm, DecodeConfig(max_batch=max_batch, graphs=graphs))
    with ThreadPoolExecutor(16) as ex:
        got = list(ex.map(lambda f, n, m: list(dec.tokens(f, n, m)), fused, news, modes))
    assert got == alone
    assert dec.rows > dec.steps and dec.pending() == 0
    if graphs:  # each alone: one set of requests for 23 steps, recorded once, then replayed
        again = [list(dec.tokens(f, 24, Sampling())) for f in fused[:3]]
        assert again == [_alone(eng, f, 24) for f in fused[:3]]
        assert dec.graphs is not None and dec.graphs.captures >= 3 and dec.graphs.replays >= 3 * 21
    dec.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_asyncio_on_cuda_equal_sequential(smol_tokenizer):
    model = tiny_model().to("cuda")
    eng = ChunkCache(model=model, tokenizer=smol_tokenizer, store=None, decode_batching=DecodeConfig(8))
    reqs = _requests(16, seed=10)
    news = [3 + (5 * i) % 17 for i in range(16)]
    want = [
        eng.generate(c, q, max_new_tokens=n) for (c, q), n in zip(reqs, news, strict=True)
    ]  # one at a time

    async def main():
        texts = asyncio.gather(
            *(eng.agenerate(c, q, max_new_tokens=n) for (c, q), n in zip(reqs, news, strict=True))
        )

        async def pieces(c, q, n):
            return "".join([p async for p in eng.astream_generate(c, q, max_new_tokens=n)]).strip()

        streams = asyncio.gather(*(pieces(c, q, n) for (c, q), n in zip(reqs, news, strict=True)))
        return await texts, await streams

    texts, streams = asyncio.run(main())
    assert texts == want and streams == want


def test_engine_streams_closed_early_free_their_requests(engine):
    def idle() -> bool:
        for _ in range(500):
            if engine.decoder.pending() == 0:
                return True
            threading.Event().wait(0.01)
        return False

    it = engine.stream_generate(PASSAGES[:2], QUESTION, max_new_tokens=3000)
    next(it)
    for _ in range(500):  # the first token comes before the request is queued
        if engine.decoder.pending() == 1:
            break
        threading.Event().wait(0.01)
    assert engine.decoder.pending() == 1
    it.close()
    assert idle()

    async def first_piece():
        async for piece in engine.astream_generate(PASSAGES[:2], QUESTION, max_new_tokens=3000):
            return piece  # leaves the loop: the generator is closed

    assert asyncio.run(first_piece())
    assert idle()
