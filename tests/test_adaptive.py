"""Adaptive loading: the planner's choices (exact), and fusion with fetched + recomputed chunks."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import PASSAGES, QUESTION, tiny_model

from chunkcache.adaptive import AdaptiveConfig, plan
from chunkcache.engine import ChunkCache
from chunkcache.store import MemoryStore


def test_fast_link_fetches_everything_slow_link_recomputes():
    tokens, sizes = [100] * 4, [{"int8": 1000}] * 4
    fast = plan(tokens, sizes, link_bytes_per_s=1e6, recompute_tokens_per_s=100)  # 1 ms vs 1 s a chunk
    assert [c.action for c in fast.chunks] == ["fetch"] * 4 and fast.estimate_s == pytest.approx(0.004)
    slow = plan(tokens, sizes, link_bytes_per_s=1.0, recompute_tokens_per_s=100)  # 1000 s vs 1 s
    assert [c.action for c in slow.chunks] == ["recompute"] * 4 and slow.estimate_s == pytest.approx(4.0)


def test_balanced_link_splits_the_work():
    """Fetching a chunk takes as long as recomputing it: half and half gives max(2, 2) = 2 s."""
    p = plan([100] * 4, [{"int8": 100}] * 4, link_bytes_per_s=100, recompute_tokens_per_s=100)
    assert sorted(c.action for c in p.chunks) == ["fetch", "fetch", "recompute", "recompute"]
    assert p.estimate_s == pytest.approx(2.0) and p.stats()["recomputed"] == 2


def test_precision_best_quality_within_slack_else_smallest():
    sizes = [{"int8": 200, "int2": 60}] * 4
    roomy = plan([1000] * 4, sizes, link_bytes_per_s=1e9, recompute_tokens_per_s=1.0)
    assert {c.precision for c in roomy.chunks} == {"int2"}  # 800 ns vs 240 ns: int8 is > 10% slower
    tied = plan([1000] * 4, [{"int8": 100, "int2": 95}] * 4, link_bytes_per_s=1e9, recompute_tokens_per_s=1.0)
    assert {c.precision for c in tied.chunks} == {"int8"} and tied.stats()["fetched"] == {"int8": 4}


def test_off_or_unmeasured():
    sizes = [{"int8": 100}] * 3
    off = plan([5, 3, 9], sizes, 1.0, 1e9, enabled=False)
    assert [c.action for c in off.chunks] == ["fetch"] * 3 and "off" in off.reason
    probe = plan([5, 3, 9], sizes, None, None)  # nothing measured: recompute the shortest, fetch the rest
    assert [c.action for c in probe.chunks] == ["fetch", "recompute", "fetch"]
    with pytest.raises(ValueError):
        AdaptiveConfig(link_bytes_per_s=0)


class SlowStore(MemoryStore):
    """A throttling wrapper for tests: every get takes nbytes / rate seconds."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def get(self, key, *, touch=True):
        value = super().get(key, touch=touch)
        if value is not None:
            time.sleep(len(value) / self.rate)
        return value


def test_adaptive_fusion_equals_plain_fusion_and_measures_rates(smol_tokenizer):
    """Recomputed chunks are the same independent encode as precompute, so the fused logits are
    exactly the plain ones; the stats say how many were recomputed; both rates get measured."""
    model = tiny_model("llama")
    plain = ChunkCache(model=model, tokenizer=smol_tokenizer, store=MemoryStore())
    want = plain.fuse(PASSAGES, QUESTION)
    store = SlowStore(rate=2e6)
    forced = ChunkCache(model=model, tokenizer=smol_tokenizer, store=store,
                        adaptive=AdaptiveConfig(link_bytes_per_s=1.0, recompute_tokens_per_s=1e9))  # fmt: skip
    forced.precompute(PASSAGES)
    got = forced.fuse(PASSAGES, QUESTION)
    assert got.stats["adaptive"]["recomputed"] == len(PASSAGES)
    assert torch.equal(got.logits, want.logits)
    measured = ChunkCache(model=model, tokenizer=smol_tokenizer, store=store, adaptive=AdaptiveConfig())
    first = measured.fuse(PASSAGES, QUESTION)
    assert first.stats["adaptive"]["recomputed"] == 1 and "not measured" in first.stats["adaptive"]["reason"]
    assert measured._rates.link is not None and measured._rates.recompute is not None
    second = measured.fuse(PASSAGES, QUESTION)
    assert second.stats["adaptive"]["estimate_s"] is not None
    assert torch.equal(first.logits, want.logits) and torch.equal(second.logits, want.logits)
