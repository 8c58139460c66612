"""CUDA under concurrency (run on the device machine: ``pytest -m gpu``): 16 threads calling one
engine's fast path (stagings from a pool, CUDA graphs captured and replayed while other threads
fuse) get what the same calls get one at a time; asyncio callers too; a graph keeps what it reads
alive, so no new object at a freed address can replay it."""

from __future__ import annotations

import asyncio
import gc
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import tiny_model
from test_concurrency import _requests

from chunkcache.engine import ChunkCache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _same(a, b) -> None:
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.selected.cpu(), b.selected.cpu())
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)


def test_graphs_are_recorded_on_a_stream_no_pooled_stream_shares():
    """torch.cuda.Stream() hands out 32 pooled streams per priority round robin; the stream graphs
    are recorded on (``graphs.capture_stream``) is none of them, so no other thread's work on a
    pooled stream (a staging's copies, a miss's encoding) can land in a graph being recorded; a
    graph recorded there replays what it recorded."""
    from chunkcache import graphs

    with graphs._CAPTURE:
        stream = graphs.capture_stream(torch.cuda.current_device())
    assert stream is not None
    pooled = {torch.cuda.Stream(priority=p).cuda_stream for p in (0, -1) for _ in range(80)}
    assert len(pooled) >= 2 and stream.cuda_stream not in pooled
    x = torch.arange(8.0, device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        y = x * 2 + 1
    x.copy_(torch.full_like(x, 3.0))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.full_like(x, 7.0))


@pytest.mark.parametrize("concurrent_fusions", [1, 2])
def test_many_threads_on_cuda_equal_sequential(smol_tokenizer, tmp_path, concurrent_fusions):
    model = tiny_model().to("cuda")
    eng = ChunkCache(model=model, tokenizer=smol_tokenizer, store=str(tmp_path / "s"),
                     concurrent_fusions=concurrent_fusions)  # fmt: skip
    reqs = _requests(64, seed=5)  # 1-5 passages of different lengths, some never precomputed
    with ThreadPoolExecutor(16) as ex:
        got = list(ex.map(lambda r: eng.fuse(r[0], r[1], recompute_ratio=0.3), reqs))
    torch.cuda.synchronize()
    assert all(g.stats.get("fast_path") for g in got)
    ref = [eng.fuse(c, q, recompute_ratio=0.3) for c, q in reqs]
    exact = 0
    for a, b in zip(ref, got, strict=True):
        _same(a, b)
        exact += bool(torch.equal(a.logits, b.logits))
    print(f"{exact}/{len(ref)} bit-identical")
    with ThreadPoolExecutor(16) as ex:  # again, now that graphs replay
        again = list(ex.map(lambda r: eng.fuse(r[0], r[1], recompute_ratio=0.3), reqs))
    for a, b in zip(ref, again, strict=True):
        _same(a, b)
    eng.store.close()


def test_asyncio_on_cuda_equal_sequential(smol_tokenizer):
    eng = ChunkCache(
        model=tiny_model().to("cuda"), tokenizer=smol_tokenizer, store=None, concurrent_fusions=2
    )
    reqs = _requests(12, seed=6)
    want = [eng.fuse(c, q, recompute_ratio=0.2) for c, q in reqs]

    async def main():
        return await asyncio.gather(*(eng.afuse(c, q, recompute_ratio=0.2) for c, q in reqs))

    for a, b in zip(want, asyncio.run(main()), strict=True):
        _same(a, b)
    texts = [eng.generate(c, q, max_new_tokens=4) for c, q in reqs[:4]]

    async def gen():
        return await asyncio.gather(*(eng.agenerate(c, q, max_new_tokens=4) for c, q in reqs[:4]))

    assert asyncio.run(gen()) == texts


def test_a_graph_keeps_what_it_reads_alive():
    from chunkcache.graphs import FusionGraphs

    graphs = FusionGraphs(min_uses=1)
    lin = torch.nn.Linear(8, 8).cuda()
    buf = torch.ones(8, device="cuda")
    alive = weakref.ref(lin)
    x = torch.randn(2, 8, device="cuda")
    for _ in range(2):  # eager (this thread's first use), then captured and replayed
        out = graphs.run(("lin",), lambda x, m=lin: m(x) + buf, {"x": x}, reads=(lin, buf))
        torch.testing.assert_close(out, lin(x) + buf)
    del lin
    gc.collect()
    assert alive() is not None  # the captured graph reads its weights: they must not be freed
    assert graphs.captures == 1
