"""The device cache on CUDA (run on the device machine: ``pytest -m gpu``): resident entries are
copied device to device by the loader, with the same kernels on the same bytes, so fusions equal
the store's; 16 threads sharing one engine and a small budget (entries admitted and evicted while
other fusions read resident ones) get what the same calls get one at a time."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import PASSAGES, QUESTION, tiny_model
from test_concurrency import _requests

from chunkcache.engine import ChunkCache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("codec", ["raw", "int8", "int4", "int2"])
def test_resident_fusion_equals_store_fusion_on_cuda(smol_tokenizer, tmp_path, codec):
    model = tiny_model().to("cuda")
    ref = ChunkCache(model=model, tokenizer=smol_tokenizer, store=str(tmp_path / "s"), codec=codec)
    ref.precompute(PASSAGES)
    hot = ChunkCache(model=model, tokenizer=smol_tokenizer, store=ref.store, codec=codec,
                     device_cache_bytes=1 << 30)  # fmt: skip
    chunks = PASSAGES[:4]
    for _ in range(3):  # store, then resident (graphs recorded and replayed on the resident path)
        want = ref.fuse(chunks, QUESTION, recompute_ratio=0.3)
        got = hot.fuse(chunks, QUESTION, recompute_ratio=0.3)
        assert got.stats["fast_path"] and got.stats["direct_copies"]
        assert torch.equal(want.selected.cpu(), got.selected.cpu())
        assert torch.equal(want.logits, got.logits)
        assert torch.equal(want.kv, got.kv)
    assert got.stats["device_cache"] == {"hits": 4, "admitted": 0} and got.stats["zero_copy"]
    assert all(
        t.is_cuda
        for _, parts in hot.device_cache.acquire(hot.resolve(chunks)[0])
        for n, t in parts.items()
        if n != "token_ids"
    )


def test_threads_with_a_small_budget_equal_sequential_on_cuda(smol_tokenizer, tmp_path):
    model = tiny_model().to("cuda")
    ref = ChunkCache(model=model, tokenizer=smol_tokenizer, store=str(tmp_path / "s"), codec="int8")
    reqs = _requests(48, seed=7)
    for c, _ in reqs:
        ref.precompute(c)
    probe = ChunkCache(model=model, tokenizer=smol_tokenizer, store=ref.store, codec="int8",
                       device_cache_bytes=1 << 30)  # fmt: skip
    probe.fuse(PASSAGES[:1], QUESTION)
    one = probe.device_cache.nbytes
    hot = ChunkCache(model=model, tokenizer=smol_tokenizer, store=ref.store, codec="int8",
                     device_cache_bytes=3 * one, concurrent_fusions=2)  # fmt: skip
    with ThreadPoolExecutor(16) as ex:
        got = list(ex.map(lambda r: hot.fuse(r[0], r[1], recompute_ratio=0.3), reqs))
    torch.cuda.synchronize()
    stats = hot.device_cache.stats()
    assert stats["evicted"] > 0 and stats["hits"] > 0
    for (c, q), g in zip(reqs, got, strict=True):
        want = ref.fuse(c, q, recompute_ratio=0.3)
        assert torch.equal(want.selected.cpu(), g.selected.cpu())
        torch.testing.assert_close(want.logits, g.logits, rtol=0, atol=1e-5)


def test_threads_with_misses_written_behind_equal_sequential_on_cuda(smol_tokenizer, tmp_path):
    """16 threads over chunks never stored: each miss is encoded on its own stream, admitted to a
    small device cache (evicted again while other fusions read it) and written behind; after
    ``flush`` the store holds every chunk, and every fusion equals the same call made alone over
    the stored entries (shared: a chunk encoded in a padded batch may differ in the last bit)."""
    model = tiny_model().to("cuda")
    reqs = _requests(32, seed=11)
    hot = ChunkCache(model=model, tokenizer=smol_tokenizer, store=str(tmp_path / "hot"), codec="int8",
                     device_cache_bytes=1 << 30, concurrent_fusions=2)  # fmt: skip
    probe = ChunkCache(model=model, tokenizer=smol_tokenizer, codec="int8", device_cache_bytes=1 << 30)
    probe.fuse(PASSAGES[:1], QUESTION)
    hot.device_cache = type(hot.device_cache)(hot.lm.device, 3 * probe.device_cache.nbytes)
    with ThreadPoolExecutor(16) as ex:
        got = list(ex.map(lambda r: hot.fuse(r[0], r[1], recompute_ratio=0.3), reqs))
    hot.flush()
    torch.cuda.synchronize()
    texts = sorted({t for c, _ in reqs for t in c})
    assert all(hot.store.contains_many([hot.key(t) for t in texts]))
    ref = ChunkCache(model=model, tokenizer=smol_tokenizer, store=hot.store, codec="int8")
    assert any("misses" in g.stats for g in got)
    for (c, q), g in zip(reqs, got, strict=True):
        want = ref.fuse(c, q, recompute_ratio=0.3)
        assert torch.equal(want.selected.cpu(), g.selected.cpu())
        torch.testing.assert_close(want.logits, g.logits, rtol=0, atol=1e-5)
