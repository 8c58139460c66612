"""The packed multi-request layer step (``chunkcache.batch``): several requests' rows through one
layer at once equal each request's rows run alone, each against its own cache and mask."""

from __future__ import annotations

import pytest
import torch
from conftest import PASSAGES, tiny_model

from chunkcache import fuse as F
from chunkcache import model as M
from chunkcache.batch import Pack, Segment, fuse_many, packed_layer
from chunkcache.model import wrap_model

# fp32: packing changes only the GEMMs' row count, and a BLAS may then sum in another order
# (each output is a dot product of up to 1536 terms here: a reordering moves it by a few ulps).
# So rows agree to a relative tolerance of each row's largest magnitude (SmolLM2's hidden states
# reach 1e4 in a few channels: an absolute tolerance would mean nothing there). Measured on this
# machine: 1.5e-7 after one SmolLM2 layer, growing to 1.5e-5 after its 30 (the tiny models: below
# 1e-6). A wrong mask, slot, position or buffer moves rows by >= 1e-2 of their scale.
ROW_TOL = 1e-4


def _assert_rows_close(got: torch.Tensor, want: torch.Tensor, tol: float = ROW_TOL) -> None:
    """Per row (last dim), max |got - want| <= tol * max |want| (and the same shape)."""
    assert got.shape == want.shape
    err = (got - want).abs().amax(-1) / want.abs().amax(-1).clamp_min(1e-30)
    assert float(err.max()) <= tol, f"rows differ by up to {float(err.max()):.3g} of their scale"


def _lm(arch, smol_tokenizer, device="cpu", **overrides):
    return wrap_model(tiny_model(arch, **overrides).to(device), smol_tokenizer)


def _geometry(lm, seed=0):
    """Three requests: scattered selected rows plus a question tail, one decode-like row, a long
    contiguous run; buffers of different lengths filled with finite random K/V."""
    spec = lm.spec
    g = torch.Generator().manual_seed(seed)
    lengths = [48, 21, 70]
    positions = [
        torch.tensor([3, 9, 10, 17, 30, 44, 45, 46, 47]),
        torch.tensor([20]),
        torch.arange(30, 70),
    ]
    bufs = [
        torch.randn(spec.num_layers, 2, spec.kv_heads, n, spec.head_dim, generator=g).to(lm.device, lm.dtype)
        for n in lengths
    ]
    hidden = lm.model.config.hidden_size
    h = torch.randn(1, sum(p.numel() for p in positions), hidden, generator=g).to(lm.device, lm.dtype)
    return bufs, [p.to(lm.device) for p in positions], h


def _alone(lm, bufs, positions, h):
    """Each request through every layer by itself, with fusion's own per-layer steps."""
    outs, start = [], 0
    for buf, pos in zip(bufs, positions, strict=True):
        x = h[:, start : start + pos.numel()]
        start += pos.numel()
        for li in range(lm.spec.num_layers):
            x = F._attend_finish(lm, buf, li, x, F._project(lm, buf, li, x, pos), pos)
        outs.append(x)
    return torch.cat(outs, dim=1)


def _packed(lm, bufs, positions, h):
    pack = Pack([Segment(b, p) for b, p in zip(bufs, positions, strict=True)])
    rope = pack.rope(lm, h)
    for li in range(lm.spec.num_layers):
        h = packed_layer(lm, li, h, pack, rope)
    return h


def _check_equal(lm):
    bufs, positions, h = _geometry(lm)
    alone_bufs = [b.clone() for b in bufs]
    with torch.no_grad():
        want = _alone(lm, alone_bufs, positions, h)
        got = _packed(lm, bufs, positions, h)
    _assert_rows_close(got, want)
    for b, a in zip(bufs, alone_bufs, strict=True):  # every segment's fresh K/V in its own buffer
        _assert_rows_close(b, a)


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("llama", {}),
        ("mistral", {"sliding_window": 12}),
        ("qwen3", {"use_sliding_window": True, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    ],
    ids=["llama", "mistral-window", "qwen3-layer-types"],
)  # fmt: skip
def test_packed_layer_equals_each_segment_alone(smol_tokenizer, arch, overrides):
    _check_equal(_lm(arch, smol_tokenizer, **overrides))


def test_packed_layer_equals_each_segment_alone_smollm2(smol):
    _check_equal(smol)


def test_segments_never_read_each_others_cache(smol_tokenizer):
    """Changing one request's cache and row leaves the other requests' rows bit-identical (same
    GEMM shapes, so not even the summation order changes), and slots after a segment's last
    position are invisible to it (exact causal mask): garbage there changes nothing."""
    lm = _lm("llama", smol_tokenizer)
    bufs, positions, h = _geometry(lm, seed=1)
    a, b = positions[0].numel(), positions[0].numel() + 1  # segment 1's one row
    with torch.no_grad():
        base = _packed(lm, [x.clone() for x in bufs], positions, h)
        other = [x.clone() for x in bufs]
        other[1] = other[1] * 3 + 1
        h2 = h.clone()
        h2[:, a:b] += 5
        changed = _packed(lm, other, positions, h2)
        garbage = [torch.cat([x, torch.full_like(x[:, :, :, :8], 50.0)], dim=3) for x in bufs]
        padded = _packed(lm, garbage, positions, h)
    assert not torch.equal(changed[:, a:b], base[:, a:b])
    assert torch.equal(changed[:, :a], base[:, :a])
    assert torch.equal(changed[:, b:], base[:, b:])
    # (a longer key axis may change the attention's blocking: equal to the last bits only)
    _assert_rows_close(padded, base)


def test_pack_checks_its_segments(smol_tokenizer):
    lm = _lm("llama", smol_tokenizer)
    bufs, positions, h = _geometry(lm)
    with pytest.raises(ValueError, match="at least one segment"):
        Pack([])
    with pytest.raises(ValueError, match="int64"):
        Pack([Segment(bufs[0], positions[0].int())])
    with pytest.raises(ValueError, match="does not match"):
        Pack([Segment(bufs[0], positions[0]), Segment(bufs[1][:2], positions[1])])
    with pytest.raises(ValueError, match="no rows"):
        Pack([Segment(bufs[0], positions[0][:0])])
    pack = Pack([Segment(b, p) for b, p in zip(bufs, positions, strict=True)])
    with pytest.raises(ValueError, match="segments' rows"):
        packed_layer(lm, 0, h[:, 1:], pack)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("llama", {}), ("mistral", {"sliding_window": 12})],
    ids=["llama", "mistral-window"],
)
def test_packed_layer_on_cuda_with_fused_kernels(smol_tokenizer, arch, overrides):
    """CUDA fp32 (no TF32: torch's default), the fused Triton kernels (rms_norm, rope + K/V scatter,
    selected_attention): the same agreement as on CPU."""
    lm = _lm(arch, smol_tokenizer, device="cuda", **overrides)
    assert M.fused_ops(lm.model.model.layers[0], torch.zeros(1, device="cuda"))
    _check_equal(lm)


QUESTIONS = [
    "Which tower was completed in 1889?",
    "Where is the highest mountain in Africa?",
    "Which river has the largest discharge?",
    "Who researched radioactivity?",
    "Name a volcano and a tower.",
    "What did Marie Curie study, and where is Kilimanjaro?",
]


def _requests():
    """Different chunk sets, orders and lengths; every policy kind (probe before layer 0, over
    every layer or the first half, probe + check layer, check layers without a probe, before
    layer 0 without a probe); ratios 0 and 1."""
    p = PASSAGES
    return [
        (p[:2], QUESTIONS[0], 0.3, "qfast"),
        (p[::-1], QUESTIONS[1], 0.15, "qaware"),
        (p[1:3], QUESTIONS[2], 0.5, "cacheblend"),
        ([p[3]], QUESTIONS[3], 0.0, "qfast"),
        (p[:3], QUESTIONS[4], 1.0, "gradual"),
        (p, QUESTIONS[5], 0.3, "gradual"),
        (p[2:], QUESTIONS[0], 0.15, "qfast"),
        (p[1:], QUESTIONS[1], 0.2, "qshallow"),  # its probe stops halfway; the others' goes on
        (p[:3], QUESTIONS[2], 0.3, "epic0"),  # selected before layer 0 with no probe
    ]


def _check_fuse_many(eng, requests, recompute="packed"):
    lm, prefix = eng.lm, eng.prefix_kv()
    args = [
        (eng.chunks(texts), eng._suffix_ids(q), F.FuseConfig(recompute_ratio=r, policy=pol))
        for texts, q, r, pol in requests
    ]
    alone = [F.fuse_kv(lm, prefix, c, eng._prefix_ids, s, cfg) for c, s, cfg in args]
    jobs = [F.assembled_job(lm, prefix, c, eng._prefix_ids, s, cfg) for c, s, cfg in args]
    many = fuse_many(lm, jobs, recompute)
    assert len(many) == len(alone)
    for a, b in zip(alone, many, strict=True):
        assert torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.selected, b.selected)
        _assert_rows_close(b.logits[None], a.logits[None])
        _assert_rows_close(b.kv, a.kv)
        for k in ("recomputed_tokens", "token_layers", "probe_token_layers", "compute_fraction", "policy"):
            assert a.stats[k] == b.stats[k], k


def test_fuse_many_equals_each_fusion_alone(tiny_engine):
    _check_fuse_many(tiny_engine, _requests())


def test_fuse_many_with_each_recompute_alone(tiny_engine):
    """``recompute="each"``: probes packed, each recompute by itself (qfast and ratios 0 and 1);
    with a check-layer policy in the batch it falls back to the packed recompute."""
    _check_fuse_many(tiny_engine, [r for r in _requests() if r[3] == "qfast" or r[2] in (0.0, 1.0)], "each")
    _check_fuse_many(tiny_engine, _requests()[:3], "each")
    with pytest.raises(ValueError, match="recompute"):
        fuse_many(tiny_engine.lm, [], "sideways")


def test_fuse_many_equals_each_fusion_alone_smollm2(smol):
    from chunkcache.engine import ChunkCache

    eng = ChunkCache(model=smol.model, tokenizer=smol.tokenizer, store=None)
    _check_fuse_many(eng, [r for r in _requests() if r[3] == "qfast"])


def test_fuse_many_of_one_is_fuse_assembled_bit_for_bit(tiny_engine):
    """One request: the same GEMM shapes as the one-request path, so the very same bits."""
    eng = tiny_engine
    for texts, q, r, pol in _requests()[:3]:
        cfg = F.FuseConfig(recompute_ratio=r, policy=pol)
        c, s = eng.chunks(texts), eng._suffix_ids(q)
        a = F.fuse_kv(eng.lm, eng.prefix_kv(), c, eng._prefix_ids, s, cfg)
        (b,) = fuse_many(eng.lm, [F.assembled_job(eng.lm, eng.prefix_kv(), c, eng._prefix_ids, s, cfg)])
        assert (
            torch.equal(a.logits, b.logits)
            and torch.equal(a.kv, b.kv)
            and torch.equal(a.selected, b.selected)
        )


# ---- the engine's scheduler -------------------------------------------------------------------


def _same_within_rounding(a, b) -> None:
    """A result fused in a batch against the same call alone: the same prompt and selection,
    logits and KV to the GEMMs' last bits (ROW_TOL)."""
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.selected, b.selected)
    _assert_rows_close(b.logits[None], a.logits[None])
    _assert_rows_close(b.kv, a.kv)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize(("fast_path", "preload"), [(False, True), (True, True), (True, False)])
def test_batched_threads_equal_each_call_alone(smol_tokenizer, model, tmp_path, fast_path, preload):
    """8 threads, 24 requests over different chunk sets and lengths (some chunks never
    precomputed: misses), ratios and policies; the worker waits for full batches, so requests
    really are fused together."""
    from test_concurrency import _requests as concurrency_requests

    from chunkcache.batch import BatchConfig
    from chunkcache.engine import ChunkCache

    store = str(tmp_path / "s")
    eng = ChunkCache(model=model, tokenizer=smol_tokenizer, store=store, fast_path=fast_path,
                     batching=BatchConfig(max_batch=4, max_wait_ms=500, preload=preload))  # fmt: skip
    eng.precompute(PASSAGES[:3])
    reqs = [
        (c, q, (0.15, 0.3, 0.5)[i % 3], ("qfast", "qaware", "cacheblend")[i % 3])
        for i, (c, q) in enumerate(concurrency_requests(24, seed=3))
    ]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda r: eng.fuse(r[0], r[1], recompute_ratio=r[2], policy=r[3]), reqs))
    sizes = eng.batcher().stats()["sizes"]
    assert max(sizes) > 1, sizes
    assert sum(k * v for k, v in sizes.items()) == len(reqs)
    alone = ChunkCache(model=model, tokenizer=smol_tokenizer, store=eng.store, fast_path=fast_path)
    for (c, q, r, pol), b in zip(reqs, got, strict=True):
        assert b.stats.get("fast_path", False) is fast_path
        _same_within_rounding(alone.fuse(c, q, recompute_ratio=r, policy=pol), b)
    eng.store.close()


def test_batched_generate_and_asyncio_equal_alone(smol_tokenizer, model):
    import asyncio

    from chunkcache.batch import BatchConfig
    from chunkcache.engine import ChunkCache

    eng = ChunkCache(
        model=model, tokenizer=smol_tokenizer, batching=BatchConfig(max_batch=6, max_wait_ms=500)
    )
    alone = ChunkCache(model=model, tokenizer=smol_tokenizer)
    reqs = [(PASSAGES[i % 4 :] + PASSAGES[: i % 4], QUESTIONS[i]) for i in range(6)]
    for c, _ in reqs:
        alone.precompute(c)
        eng.precompute(c)

    async def main():
        return await asyncio.gather(*(eng.agenerate(c, q, max_new_tokens=6) for c, q in reqs))

    got = asyncio.run(main())
    assert max(eng.batcher().stats()["sizes"]) > 1
    assert got == [alone.generate(c, q, max_new_tokens=6) for c, q in reqs]


def test_a_failing_request_fails_alone_in_its_batch(smol_tokenizer, model):
    """A request whose fusion raises inside a batch gets its own error; the others of its batch
    get their results (redone alone), equal to their calls alone."""
    from concurrent.futures import ThreadPoolExecutor

    from chunkcache.batch import BatchConfig
    from chunkcache.engine import ChunkCache
    from chunkcache.select import QFast

    class Boom(QFast):
        def select(self, ctx, k):
            raise RuntimeError("boom")

    eng = ChunkCache(
        model=model, tokenizer=smol_tokenizer, batching=BatchConfig(max_batch=4, max_wait_ms=1000)
    )
    alone = ChunkCache(model=model, tokenizer=smol_tokenizer)
    reqs = [(PASSAGES[:3], QUESTIONS[i], Boom() if i == 2 else None) for i in range(4)]

    def call(r):
        try:
            return eng.fuse(r[0], r[1], recompute_ratio=0.3, policy=r[2])
        except RuntimeError as e:
            return e

    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(call, reqs))
    assert eng.batcher().stats()["sizes"] == {4: 1}
    assert isinstance(got[2], RuntimeError) and str(got[2]) == "boom"
    for i in (0, 1, 3):
        want = alone.fuse(reqs[i][0], reqs[i][1], recompute_ratio=0.3)
        assert torch.equal(want.logits, got[i].logits)  # redone alone: the very same bits


def test_batch_config_is_checked():
    from chunkcache.batch import BatchConfig
    from chunkcache.engine import ChunkCache

    for bad in ({"max_batch": 0}, {"max_batch": 2.0}, {"max_batch": True}, {"max_wait_ms": -1},
                {"max_wait_ms": float("nan")}, {"idle_s": 0}, {"preload": 1}, {"recompute": "x"}):  # fmt: skip
        with pytest.raises(ValueError):
            BatchConfig(**bad)
    with pytest.raises(TypeError, match="BatchConfig"):
        ChunkCache(model=object(), batching={"max_batch": 4})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("max_wait_ms", "preload", "prep_stream"),
    [(0.0, True, False), (200.0, False, True), (200.0, True, "each")],  # (few: the GPU call's budget)
)
def test_batched_threads_on_cuda_equal_each_call_alone(
    smol_tokenizer, tmp_path, max_wait_ms, preload, prep_stream
):
    """16 threads, 48 requests with different chunk sets and lengths (some misses) through the
    CUDA fast path with batching (stagings, loaders, CUDA graphs for batches of one); each result
    against the same call on an engine without batching over the same store."""
    from concurrent.futures import ThreadPoolExecutor

    from test_concurrency import _requests as concurrency_requests

    from chunkcache.batch import BatchConfig
    from chunkcache.engine import ChunkCache

    model = tiny_model().to("cuda")
    eng = ChunkCache(model=model, tokenizer=smol_tokenizer, store=str(tmp_path / "s"),
                     batching=BatchConfig(max_batch=8, max_wait_ms=max_wait_ms, preload=preload,
                                          prep_stream=prep_stream is True,
                                          recompute="each" if prep_stream == "each" else "packed"))  # fmt: skip
    reqs = concurrency_requests(48, seed=11)
    with ThreadPoolExecutor(16) as ex:
        got = list(ex.map(lambda r: eng.fuse(r[0], r[1], recompute_ratio=0.3), reqs))
    torch.cuda.synchronize()
    assert all(g.stats.get("fast_path") for g in got)
    if max_wait_ms:
        assert max(eng.batcher().stats()["sizes"]) > 1
    alone = ChunkCache(model=model, tokenizer=smol_tokenizer, store=eng.store)
    for (c, q), b in zip(reqs, got, strict=True):
        _same_within_rounding(alone.fuse(c, q, recompute_ratio=0.3), b)
    eng.store.close()
