"""Adaptive loading: the planner's choices (exact), in-place recompute against its two contracts
(all chunks: a full prefill; none: the plain fused result), the full-prefill fallback, several
stored precisions, and damaged or missing entries (never used silently). CPU, a throttling
wrapper store standing in for a slow link."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import PASSAGES, QUESTION, tiny_model

from chunkcache.adaptive import AdaptiveConfig, Rates, overlap, plan
from chunkcache.engine import ChunkCache
from chunkcache.store import MemoryStore

# ---- the planner (no model) --------------------------------------------------------------------


def test_fast_link_fetches_everything_slow_link_falls_back_to_full_prefill():
    tokens, sizes = [100] * 4, [{"int8": 1000}] * 4
    fast = plan(tokens, sizes, link_bytes_per_s=1e6, recompute_tokens_per_s=100)  # 1 ms vs 1 s a chunk
    assert [c.action for c in fast.chunks] == ["fetch"] * 4 and fast.front == 0
    assert fast.estimate_s == pytest.approx(0.004) and not fast.full_prefill
    slow = plan(tokens, sizes, link_bytes_per_s=1.0, recompute_tokens_per_s=100)  # 1000 s vs 1 s
    assert slow.full_prefill and [c.action for c in slow.chunks] == ["prefill"] * 4
    assert slow.full_s == pytest.approx(4.0) and slow.stats()["choice"] == "full prefill"
    inplace = plan(tokens, sizes, link_bytes_per_s=1.0, recompute_tokens_per_s=100, fallback=False)
    assert [c.action for c in inplace.chunks] == ["recompute"] * 4 and inplace.estimate_s == pytest.approx(
        4.0
    )


def test_balanced_link_recomputes_the_front_and_fetches_the_back():
    """Fetching a chunk takes as long as recomputing it: 2 + 2 gives max(2, 2) = 2 s, and the
    recomputed ones are the first two (they attend to nothing fetched)."""
    p = plan([100] * 4, [{"int8": 100}] * 4, link_bytes_per_s=100, recompute_tokens_per_s=100)
    assert [c.action for c in p.chunks] == ["recompute", "recompute", "fetch", "fetch"]
    assert p.front == 2 and p.estimate_s == pytest.approx(2.0) and p.stats()["recomputed"] == 2
    # the fusion's tail after the last fetched layer: every chunk token / fuse rate, for any mix
    tail = plan([100] * 4, [{"int8": 100}] * 4, 100, 100, fuse_tokens_per_s=400)
    assert tail.front == 2 and tail.estimate_s == pytest.approx(2.0 + 400 / 400)
    # fuse no faster than the recompute itself: a full prefill is as fast, so it is taken
    assert plan([100] * 4, [{"int8": 100}] * 4, 100, 100, fuse_tokens_per_s=100).full_prefill


def test_precision_follows_the_link_rate():
    sizes = [{"int8": 200, "int2": 60}] * 4
    roomy = plan([1000] * 4, sizes, link_bytes_per_s=1e9, recompute_tokens_per_s=1.0)
    assert {c.precision for c in roomy.chunks} == {"int2"}  # 800 ns vs 240 ns: int8 is > 10% slower
    tied = plan([1000] * 4, [{"int8": 100, "int2": 95}] * 4, link_bytes_per_s=1e9, recompute_tokens_per_s=1.0)
    assert {c.precision for c in tied.chunks} == {"int8"} and tied.stats()["fetched"] == {"int8": 4}
    # fuse time dominates at a fast link: both within slack, the better one is kept
    fast = plan([1000] * 4, sizes, 1e9, 1.0, fuse_tokens_per_s=1e3)
    assert fast.stats()["fetched"] == {"int8": 4}
    # a chunk stored at int8 only is fetched at int8 while the others take int2
    mixed = plan([1000] * 3, [sizes[0], {"int8": 200}, sizes[0]], 1e9, 1.0)
    assert [c.precision for c in mixed.chunks] == ["int2", "int8", "int2"]
    # int8 is within slack of int2 but no faster than a full prefill (2.1 + 1.95 s vs 4 s): int2
    # (2.0 + 1.95 s) is fused, not the fallback
    edge = plan([100] * 4, [{"int8": 105, "int2": 95}] * 4, 100, 100, fuse_tokens_per_s=400 / 1.95)
    assert not edge.full_prefill and edge.stats()["fetched"] == {"int2": 2}
    assert edge.estimate_s == pytest.approx(3.95)


def test_off_unmeasured_fixed_and_bad_input():
    sizes = [{"int8": 100}] * 3
    off = plan([5, 3, 9], sizes, 1.0, 1e9, enabled=False)
    assert [c.action for c in off.chunks] == ["fetch"] * 3 and "off" in off.reason
    first = plan([5, 3, 9], sizes, None, None)  # nothing measured: a full prefill measures its rate
    assert first.full_prefill and "not measured" in first.reason and first.estimate_s is None
    # without the fallback: recompute the first, fetch the rest (measures both)
    bare = plan([5, 3, 9], sizes, None, None, fallback=False)
    assert [c.action for c in bare.chunks] == ["recompute", "fetch", "fetch"] and bare.estimate_s is None
    # the prefill rate known, the link not: all but the last recomputed in place, that one fetched
    # (about a prefill plus the tail on any link; it measures the link, the front and the tail)
    probe = plan([5, 3, 9], sizes, None, None, prefill_tokens_per_s=10.0)
    assert [c.action for c in probe.chunks] == ["recompute", "recompute", "fetch"] and not probe.full_prefill
    assert "link not measured" in probe.reason and probe.full_s == pytest.approx(1.7)
    fixed = plan([5, 3, 9], sizes, 1.0, 1.0, front=3)  # fixed: never falls back
    assert fixed.front == 3 and not fixed.full_prefill and "fixed" in fixed.reason
    with pytest.raises(ValueError):
        plan([5, 3], sizes, 1.0, 1.0)
    with pytest.raises(ValueError):
        plan([5, 3, 9], sizes, 1.0, 1.0, front=4)
    for bad in (dict(link_bytes_per_s=0), dict(recompute_chunks=-1), dict(recompute_chunks=True),
                dict(precisions=("int9",)), dict(precisions=("int2", "int2")), dict(slack=-1)):  # fmt: skip
        with pytest.raises((ValueError, TypeError)):
            AdaptiveConfig(**bad)
    with pytest.raises(TypeError):
        AdaptiveConfig(precisions=["int2"])


def test_the_fallback_is_weighed_at_the_prefill_rate_and_an_overrun_is_accounted_for():
    """The H200 case of session 8: the front inside a fusion ran at 8,350 tokens/s (it shared the
    host with the link's reader), a plain prefill at 33,000. Judged at the front's rate, a full
    prefill looked 4x slower than it is and a mix that loses to it was run (1.12x); judged at the
    prefill's, it falls back. A fused call that ran longer than its estimate scales the next
    estimates by that factor at once (a fall is averaged in), so a plan that ended slower than the
    prefill is not repeated; the factor never makes a plan look faster than its estimate."""
    tokens, sizes = [512] * 16, [{"int2m": 10_543_000}] * 16
    link, front, tail = 0.622e9, 8350.0, 16 * 512 / 0.0512  # bytes/s, tokens/s, chunk tokens/s
    wrong = plan(tokens, sizes, link, front, tail)  # the prefill estimated at the front's rate
    assert not wrong.full_prefill and wrong.full_s == pytest.approx(8192 / 8350)
    right = plan(tokens, sizes, link, front, tail, prefill_tokens_per_s=33_000.0)
    assert right.full_prefill and right.full_s == pytest.approx(8192 / 33_000)
    # with the front measured as fast as a prefill, a mix beats it: recompute 5, fetch 11
    fast = plan(tokens, sizes, 1.25e9, 33_000.0, tail, prefill_tokens_per_s=33_000.0)
    assert not fast.full_prefill and fast.front in (5, 6) and fast.estimate_s < fast.full_s
    # that plan ran 2x its estimate, later than the prefill: the next one falls back
    assert 2 * fast.estimate_s > fast.full_s
    r = Rates(0.5)
    r.saw_estimate(1.0, 9.0)  # warm-up: not used
    assert r.overrun is None
    r.saw_estimate(fast.estimate_s, 2 * fast.estimate_s)
    assert r.overrun == pytest.approx(2.0)
    again = plan(tokens, sizes, 1.25e9, 33_000.0, tail, prefill_tokens_per_s=33_000.0, overrun=r.overrun)
    assert again.full_prefill and "overrun" in again.reason
    assert again.estimate_s == pytest.approx(2 * fast.estimate_s)
    r.saw_estimate(1.0, 1.0)  # on time: the factor falls by the smoothing, not at once
    assert r.overrun == pytest.approx(1.5)
    r.saw_estimate(1.0, 2.5)  # late again: at once
    assert r.overrun == pytest.approx(2.5)
    early = plan(tokens, sizes, 1.25e9, 33_000.0, tail, prefill_tokens_per_s=33_000.0, overrun=0.5)
    assert early.estimate_s == pytest.approx(fast.estimate_s)  # never below its own estimate
    # a front is never estimated below the host's time to queue one (a transformers forward's
    # launches): a 2-chunk front at 33,000 tokens/s would be 31 ms, 45 ms of launching is the floor
    floored = plan(tokens, sizes, 1.25e9, 33_000.0, tail, prefill_tokens_per_s=33_000.0,
                   front=2, front_floor_s=0.045)  # fmt: skip
    assert floored.estimate_s == pytest.approx(max(14 * 10_543_000 / 1.25e9, 0.045) + 0.0512)
    # at 25 Gb/s fetching all takes 54 ms: 3 chunks recomputed meanwhile would take 46.5 ms, but
    # not under a 60 ms floor, so nothing is recomputed
    at25 = dict(tokens=tokens, sizes=sizes, link_bytes_per_s=3.125e9, recompute_tokens_per_s=33_000.0,
                fuse_tokens_per_s=tail, prefill_tokens_per_s=33_000.0)  # fmt: skip
    assert plan(**at25).front == 3 and plan(**at25, front_floor_s=0.06).front == 0
    r = Rates(0.5)
    for _ in range(2):  # warm-up, then: a front the host bounded gives the floor, not a rate
        r.saw_front(543, 0.041, 0.040)
    assert r.front_host == pytest.approx(0.040) and r.recompute is None
    r.saw_front(2579, 0.080, 0.050)  # (the recompute's warm-up reading)
    r.saw_front(2579, 0.078, 0.052)  # the device bounded it: a rate
    assert r.recompute == pytest.approx(2579 / 0.078) and r.front_host == pytest.approx(0.0485)
    # a front measured faster than a prefill does not make "everything recomputed in place" a
    # plan: with the fallback allowed, the prefill itself stands for it
    slow_link = plan(tokens, sizes, 1.0, 66_000.0, tail, prefill_tokens_per_s=33_000.0)
    assert slow_link.full_prefill


def test_rates_average_and_overlap_runs_both():
    r = Rates(0.5)
    for what in ("recompute", "fuse"):
        r.saw(what, 1, 1e3)  # warm-up readings (one per kind): not used
    r.saw_fetch("int8", 1, 1e3)
    r.saw_fetch("int2", 1, 1e3)
    assert r.link == {} and r.fuse is None and r.recompute is None
    r.saw_fetch("int8", 100, 1.0)
    r.saw_fetch("int8", 300, 1.0)
    r.saw_fetch("int2", 50, 1.0)
    r.saw("fuse", 0, 1.0)  # nothing seen: ignored
    r.saw("recompute", 10, 2.0)
    assert r.link == {"int8": 200, "int2": 50} and r.fuse is None and r.recompute == 5
    # per-precision rates: int2 decodes so slowly here that int8 is the faster fetch
    p = plan([1000] * 2, [{"int8": 200, "int2": 60}] * 2, r.link, 1.0)
    assert p.stats()["fetched"] == {"int8": 2}
    # a precision not measured yet is assumed as slow as the slowest measured one
    q = plan([1000] * 2, [{"int8": 200, "int4": 100}] * 2, {"int8": 200.0}, 1.0)
    assert q.stats()["fetched"] == {"int4": 2}
    r.discard(["fuse"])  # a call that paid one-off costs (graphs recorded) stands for a warm-up:
    r2 = Rates(0.5)
    r2.discard(["fuse", "link:int8"])
    r2.saw("fuse", 10, 1.0)
    r2.saw_fetch("int8", 10, 1.0)
    assert r2.fuse == 10 and r2.link == {"int8": 10}  # the next readings count at once
    r.forget_link()  # a new link: its first reading counts at once
    r.saw_fetch("int4", 1, 1e3)  # but a precision never seen has its warm-up
    r.saw_fetch("int8", 70, 1.0)
    assert r.link == {"int8": 70}
    got, res, t_fetch, t_compute = overlap(lambda i: i * 10, [1, 2], lambda: "front")
    assert got == [10, 20] and res == "front" and t_fetch >= 0 and t_compute >= 0

    def boom(i):
        raise KeyError(i)

    with pytest.raises(KeyError):
        overlap(boom, [1], lambda: None)


# ---- the engine --------------------------------------------------------------------------------


class SlowStore(MemoryStore):
    """A throttling wrapper for tests: every get takes nbytes / rate seconds."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate
        self.calls = 0  # reads and lookups

    def contains_many(self, keys):
        self.calls += 1
        return super().contains_many(keys)

    def get(self, key, *, touch=True):
        self.calls += 1
        value = super().get(key, touch=touch)
        if value is not None:
            time.sleep(len(value) / self.rate)
        return value


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def engine(model, tok, store=None, **adaptive):
    store = store if store is not None else MemoryStore()
    return ChunkCache(model=model, tokenizer=tok, store=store, adaptive=AdaptiveConfig(**adaptive))


def full_prefill(eng: ChunkCache) -> tuple[torch.Tensor, torch.Tensor]:
    ids = eng.prompt_ids(PASSAGES, QUESTION)
    with torch.no_grad():
        out = eng.model(input_ids=ids, use_cache=True)
    kv = torch.stack([torch.stack([lay.keys[0], lay.values[0]]) for lay in out.past_key_values.layers])
    return out.logits[0, -1].float(), kv


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_the_exact_encoding_is_the_models_own_cache_bit_for_bit(arch, smol_tokenizer):
    """``precompute.encode_exact`` (the fallback's prefill and the front's recompute) writes each
    layer's K/V straight into its ``[L, 2, H, n, D]`` result: exactly what the model's own
    ``DynamicCache`` holds after the same forward, and the same logits; a second prefill into
    the same layers is refused."""
    from transformers import DynamicCache

    from chunkcache.model import cache_kwarg
    from chunkcache.precompute import _into_kv, encode_exact

    model = tiny_model(arch, sliding_window=64) if arch == "mistral" else tiny_model(arch)
    lm = ChunkCache(model=model, tokenizer=smol_tokenizer, store=MemoryStore()).lm
    ids = torch.randint(3, 1000, (1, 150), generator=torch.Generator().manual_seed(1))
    kv, logits = encode_exact(lm, ids[0], host_logits=True)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): DynamicCache()})
    want = torch.stack([torch.stack([lay.keys[0], lay.values[0]]) for lay in out.past_key_values.layers])
    assert kv.shape == want.shape and torch.equal(kv, want)
    assert torch.equal(logits, out.logits[0, -1].float()) and logits.device.type == "cpu"
    layer = _into_kv()(kv[0].clone())
    layer.update(want[0, 0][None], want[0, 1][None])
    with pytest.raises(RuntimeError, match="one prefill"):
        layer.update(want[0, 0][None], want[0, 1][None])
    other = _into_kv()(kv[0].clone())  # not the expected length: a plain layer's update, not written
    k, v = other.update(want[0, 0, :, :9][None], want[0, 1, :, :9][None])
    assert not other.written and torch.equal(k[0], want[0, 0, :, :9])


def test_recompute_all_in_place_equals_full_prefill(model, smol_tokenizer):
    eng = engine(model, smol_tokenizer, recompute_chunks=len(PASSAGES))
    got = eng.fuse(PASSAGES, QUESTION)
    logits, kv = full_prefill(eng)
    torch.testing.assert_close(got.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.kv[:, :, :, :-1], kv[:, :, :, :-1], rtol=1e-5, atol=1e-5)
    s = got.stats
    assert s["recomputed_tokens"] == s["chunk_tokens"] == sum(s["chunk_lengths"]) and s["reused_tokens"] == 0
    n, p = s["prompt_tokens"], s["prefix_tokens"]  # every token, the prefix's too, every layer
    assert s["token_layers"] == eng.lm.spec.num_layers * n and s["compute_fraction"] == pytest.approx(
        n / (n - p)
    )
    assert s["adaptive"]["recomputed"] == len(PASSAGES) and s["adaptive"]["choice"] == "fused"


def test_recompute_none_equals_the_plain_fused_result(model, smol_tokenizer):
    plain = ChunkCache(model=model, tokenizer=smol_tokenizer, store=MemoryStore())
    want = plain.fuse(PASSAGES, QUESTION)
    for conf in (dict(recompute_chunks=0), dict(enabled=False)):
        got = engine(model, smol_tokenizer, **conf).fuse(PASSAGES, QUESTION)
        assert torch.equal(got.logits, want.logits) and torch.equal(got.kv, want.kv)
        assert torch.equal(got.selected, want.selected)
        assert got.stats["token_layers"] == want.stats["token_layers"]
        assert got.stats["adaptive"]["recomputed"] == 0


def test_mixed_split_front_is_exact_and_counted(model, smol_tokenizer):
    eng = engine(model, smol_tokenizer, recompute_chunks=2)
    got = eng.fuse(PASSAGES, QUESTION, recompute_ratio=0.25)
    _, kv = full_prefill(eng)
    s, layers = got.stats, eng.lm.spec.num_layers
    p, lengths = s["prefix_tokens"], s["chunk_lengths"]
    front = sum(lengths[:2])
    torch.testing.assert_close(got.kv[:, :, :, : p + front], kv[:, :, :, : p + front], rtol=1e-5, atol=1e-5)
    back = sum(lengths[2:])
    selected = round(0.25 * back * (front + back) / back)  # the whole budget, spent on the fetched chunks
    assert s["recompute_ratio"] == 0.25 and s["fetched_recompute_ratio"] == pytest.approx(
        0.25 * (front + back) / back
    )
    assert s["recomputed_tokens"] == front + selected and s["front_recomputed_tokens"] == front
    assert got.selected.numel() == front + selected
    assert (
        s["token_layers"] == layers * (p + front + selected + s["question_tokens"]) + s["probe_token_layers"]
    )
    assert s["compute_fraction"] == pytest.approx(s["token_layers"] / (layers * (s["prompt_tokens"] - p)))
    assert torch.equal(got.input_ids, eng.prompt_ids(PASSAGES, QUESTION))
    assert eng.generate_from(got, max_new_tokens=3)  # the cache it hands over is usable


def test_decisions_follow_the_measured_rates(model, smol_tokenizer):
    """Through a throttled store: the first two calls are full prefills (a warm-up, then the
    prefill rate measured) that touch no store; the third a full prefill beside the link's probe
    (two reads on a thread: a warm-up, then the link measured); on a fast link it then fetches all; on a link too slow for any mix it falls back to a full prefill, equal
    to the model's own, without touching the store."""
    fast = SlowStore(rate=1e12)
    eng = engine(model, smol_tokenizer, fast)
    eng.precompute(PASSAGES)
    fast.calls = 0
    for _ in range(2):
        a = eng.fuse(PASSAGES, QUESTION).stats["adaptive"]
        assert a["choice"] == "full prefill" and "not measured" in a["reason"]
    assert fast.calls == 0 and eng._rates.prefill and eng._rates.recompute is None
    a = eng.fuse(PASSAGES, QUESTION).stats["adaptive"]
    assert "link not measured" in a["reason"] and a["choice"] == "full prefill"
    assert _wait_probe(eng) == "done" and eng._rates.link and eng._rates.fuse is None
    eng._rates.fuse = 1e12  # (a tiny model fuses slower than it recomputes: count the fusion as free,
    eng._rates.overrun = None  # and forget that its fused calls overran their estimates)
    eng._rates.link = {"raw": 1e15}
    second = eng.fuse(PASSAGES, QUESTION).stats["adaptive"]
    assert second["recomputed"] == 0 and second["choice"] == "fused" and second["estimate_s"] is not None
    slow = SlowStore(rate=1e12)
    eng2 = engine(model, smol_tokenizer, slow)
    eng2.precompute(PASSAGES)
    for _ in range(3):
        eng2.fuse(PASSAGES, QUESTION)  # the prefill rate, then the link
    assert _wait_probe(eng2) == "done"
    eng2._rates.link = {"raw": 1.0}  # one byte per second: nothing is worth fetching
    slow.calls = 0
    got = eng2.fuse(PASSAGES, QUESTION)
    assert got.stats["adaptive"]["choice"] == "full prefill" and got.stats["policy"] == "full prefill"
    assert slow.calls == 0  # the fallback is planned from the rates alone: no store round trip
    for _ in range(20):  # past explore_every (16): exploring would fetch the last chunk, estimated
        eng2.fuse(PASSAGES, QUESTION)  # longer than a prefill, so it is not, and no call asks the store
    assert slow.calls == 0 and eng2._rates.fallbacks < 16
    logits, kv = full_prefill(eng2)
    torch.testing.assert_close(got.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.kv[:, :, :, :-1], kv[:, :, :, :-1], rtol=1e-5, atol=1e-5)
    n, p = got.stats["prompt_tokens"], got.stats["prefix_tokens"]
    assert got.stats["compute_fraction"] == n / (n - p) and "prefill" in got.stats["adaptive"]["seconds"]


def test_a_bad_rate_reading_does_not_stick(model, smol_tokenizer):
    """A fusion-tail reading far too low makes every plan a full prefill, so no mix would ever
    measure it again; after ``explore_every`` full prefills in a row one call runs a mix (all but
    the last chunk recomputed in place) and its reading replaces the bad one. (Before the tail is
    measured it is counted as 0.4 of a prefill: the fetched mixes measure it.) A recompute reading
    far too low likewise: after ``explore_every`` calls that recomputed nothing, one recomputes
    the first chunk."""
    store = SlowStore(rate=1e12)
    eng = engine(model, smol_tokenizer, store, explore_every=3, link_bytes_per_s=1e15)
    eng.precompute(PASSAGES)
    boot = [eng.fuse(PASSAGES, QUESTION).stats["adaptive"] for _ in range(4)]  # each a warm-up first:
    assert [a["choice"] for a in boot[:2]] == ["full prefill"] * 2  # the prefill rate, then the tail
    assert all(a["reason"].startswith("fusion tail not measured") for a in boot[2:])  # (not counted free)
    assert [a["recomputed"] for a in boot[2:]] == [0, 0]
    assert eng._rates.prefill and eng._rates.fuse and eng._rates.fallbacks == 0
    eng._rates.fuse = 1e-6  # a bad reading: the fusion's tail looks endless
    got = [eng.fuse(PASSAGES, QUESTION).stats["adaptive"] for _ in range(3)]
    assert [a["choice"] for a in got] == ["full prefill", "full prefill", "fused"]
    assert got[2]["reason"].startswith("explore") and got[2]["recomputed"] == len(PASSAGES) - 1
    assert eng._rates.fuse > 1e-3 and eng._rates.fallbacks == 0  # measured again
    # the other way round: a recompute reading far too low makes every plan fetch everything,
    # so nothing is recomputed and the reading would stay; one call recomputes the first chunk
    # (the tail fixed as free, so the tiny model's fusion is not slower than its prefill)
    eng = engine(model, smol_tokenizer, store, explore_every=3, fuse_tokens_per_s=1e12)
    for _ in range(3):
        eng.fuse(PASSAGES, QUESTION)  # the prefill rate, then the link
    assert _wait_probe(eng) == "done" and eng._rates.link
    eng._rates.recompute, eng._rates.link = 1e-3, {"raw": 1e15}  # (fetching all beats the prefill)
    eng._rates.discard(["recompute"])  # (as if read: a reading, not its warm-up)
    got = [eng.fuse(PASSAGES, QUESTION).stats["adaptive"] for _ in range(3)]
    assert [a["recomputed"] for a in got] == [0, 0, 1] and got[2]["reason"].startswith("explore")
    assert eng._rates.recompute > 1 and eng._rates.unrecomputed == 0
    never = engine(model, smol_tokenizer, store, explore_every=0, link_bytes_per_s=1e15)
    for _ in range(4):
        never.fuse(PASSAGES, QUESTION)
    never._rates.fuse = 1e-6
    assert {never.fuse(PASSAGES, QUESTION).stats["adaptive"]["choice"] for _ in range(4)} == {"full prefill"}


def test_several_precisions_stored_and_picked_per_link_rate(model, smol_tokenizer):
    store = MemoryStore()
    kw = dict(precisions=("int2",), recompute_tokens_per_s=1.0, fuse_tokens_per_s=1e12)
    eng = ChunkCache(model=model, tokenizer=smol_tokenizer, store=store, codec="int8",
                     adaptive=AdaptiveConfig(link_bytes_per_s=1e6, **kw))  # fmt: skip
    eng.precompute(PASSAGES)
    assert len(list(store.keys())) == 2 * len(PASSAGES)  # one entry per codec
    slow = eng.fuse(PASSAGES, QUESTION).stats["adaptive"]
    assert slow["fetched"] == {"int2": len(PASSAGES)} and "at int2" in slow["reason"]
    fast_eng = ChunkCache(model=model, tokenizer=smol_tokenizer, store=store, codec="int8",
                          adaptive=AdaptiveConfig(link_bytes_per_s=1e15, **kw))  # fmt: skip
    fast = fast_eng.fuse(PASSAGES, QUESTION)
    assert fast.stats["adaptive"]["fetched"] == {"int8": len(PASSAGES)}
    # the fetched int2 entries are the ones an int2 engine makes: the same fused result
    int2 = ChunkCache(model=model, tokenizer=smol_tokenizer, store=MemoryStore(), codec="int2")
    assert torch.equal(eng.fuse(PASSAGES, QUESTION).logits, int2.fuse(PASSAGES, QUESTION).logits)
    int8 = ChunkCache(model=model, tokenizer=smol_tokenizer, store=MemoryStore(), codec="int8")
    assert torch.equal(fast.logits, int8.fuse(PASSAGES, QUESTION).logits)


def test_damaged_or_missing_entry_is_never_used(model, smol_tokenizer):
    store = MemoryStore()
    conf = AdaptiveConfig(precisions=("int2",), link_bytes_per_s=1e6, recompute_tokens_per_s=1.0,
                          fuse_tokens_per_s=1e12)  # fmt: skip
    eng = ChunkCache(model=model, tokenizer=smol_tokenizer, store=store, codec="int8", adaptive=conf)
    eng.precompute(PASSAGES)
    _, ids = eng.resolve(PASSAGES)
    int2_key = [
        eng.key_inputs_at("int2").key(x) for x in (torch.frombuffer(b, dtype=torch.int64) for b in ids)
    ]
    # chunk 1's int2 entry is missing: it is fetched at int8, the others at int2
    store.delete(int2_key[1])
    got = eng.fuse(PASSAGES, QUESTION).stats["adaptive"]
    assert [c["precision"] for c in got["chunks"]] == ["int2", "int8", "int2", "int2"]
    # chunk 2's int2 entry is damaged: dropped with a warning, recomputed and stored as a miss
    raw = bytearray(store.get(int2_key[2]))
    raw[len(raw) // 2] ^= 0xFF  # inside the codes
    store.put(int2_key[2], bytes(raw))
    with pytest.warns(RuntimeWarning, match="damaged|checksum|corrupt"):
        res = eng.fuse(PASSAGES, QUESTION)
    assert res.stats["adaptive"]["repaired"] == [2] and not store.contains(int2_key[2])
    # what it used for chunk 2 is the engine's own (int8) entry: the same as fusing with it
    mixed = ChunkCache(model=model, tokenizer=smol_tokenizer, store=MemoryStore(), codec="int8")
    chunks = [*eng.chunks(PASSAGES)]  # int8 entries
    chunks[0], chunks[3] = (eng._load_at(i, "int2", {"int2": int2_key}, ids, {"int2": eng.key_inputs_at("int2").to_dict()})
                            for i in (0, 3))  # fmt: skip
    from chunkcache.fuse import FuseConfig, fuse_kv

    want = fuse_kv(
        mixed.lm, eng.prefix_kv(), chunks, eng._prefix_ids, eng._suffix_ids(QUESTION), FuseConfig()
    )
    assert torch.equal(res.logits, want.logits)


def test_not_a_config_is_refused(model, smol_tokenizer):
    with pytest.raises(TypeError):
        ChunkCache(model=model, tokenizer=smol_tokenizer, store=None, adaptive={"enabled": True})


class _LateLayer:
    """Stands in for a CUDA event of the front's layer ``i``: the prefix rows of that layer exist
    only once the fusion waited for it (NaN before), and the waits are logged."""

    def __init__(self, i, src, dest, log):
        self.i, self.src, self.dest, self.log = i, src, dest, log

    def wait(self):
        self.dest[self.i] = self.src[self.i]
        self.log.append(self.i)


@pytest.mark.parametrize("policy", ["qfast", "qaware"])
def test_a_front_ready_layer_by_layer_gives_the_same_fusion_bit_for_bit(model, smol_tokenizer, policy):
    """``fuse_entries`` with one ``prefix_ready`` event per layer (the front's layers as they are
    written): each layer's prefix rows are waited for and written just before that layer is first
    read, in layer order, and the fusion equals the one given the whole prefix up front, bit for
    bit (a layer read before its wait would read NaN). A wrong number of events is refused."""
    from chunkcache.fuse import FuseConfig
    from chunkcache.pipeline import fuse_entries

    eng = ChunkCache(model=model, tokenizer=smol_tokenizer, store=MemoryStore(), fast_path=True)
    eng.precompute(PASSAGES)
    entries = [eng.store.get(k) for k in eng.resolve(PASSAGES)[0]]
    prefix, suffix, cfg = eng.prefix_kv(), eng._suffix_ids(QUESTION), FuseConfig(0.3, policy)
    want = fuse_entries(eng.lm, prefix, entries, eng._prefix_ids, suffix, cfg)
    late, log = torch.full_like(prefix, float("nan")), []
    events = [_LateLayer(i, prefix, late, log) for i in range(eng.lm.spec.num_layers)]
    got = fuse_entries(eng.lm, late, entries, eng._prefix_ids, suffix, cfg, prefix_ready=events)
    assert log == list(range(eng.lm.spec.num_layers))
    assert torch.equal(got.logits, want.logits) and torch.equal(got.kv, want.kv)
    assert torch.equal(got.selected, want.selected)
    with pytest.raises(ValueError, match="events for"):
        fuse_entries(eng.lm, prefix, entries, eng._prefix_ids, suffix, cfg, prefix_ready=events[:-1])


def _wait_probe(eng, timeout=30.0):
    t = time.perf_counter()
    while eng._rates.link_probe == "running" and time.perf_counter() - t < timeout:
        time.sleep(0.01)
    return eng._rates.link_probe


def test_a_fresh_engine_never_runs_a_mix_slower_than_a_prefill_to_measure(model, smol_tokenizer):
    """The bootstrap: two full prefills (the prefill rate), then, the link unknown, a full prefill
    while a thread reads the last chunks' entries (the link's rate, no store read on the call's
    own path); the fusion's tail unknown, it is counted as (2 x ratio + 0.1) of a full prefill,
    not as free: so no call is the bounded mix (all but the last chunk recomputed in place, about
    a prefill plus the tail: session 9's bootstrap). Where nothing can be read (entries missing),
    the next call takes the mix that precomputes them."""
    store = SlowStore(rate=1e12)
    eng = engine(model, smol_tokenizer, store)
    eng.precompute(PASSAGES)
    got = [eng.fuse(PASSAGES, QUESTION).stats["adaptive"] for _ in range(3)]
    assert [a["choice"] for a in got] == ["full prefill"] * 3
    assert got[2]["reason"].startswith("link not measured yet: a full prefill while the link is probed")
    assert _wait_probe(eng) == "done" and eng._rates.link  # (two reads per precision: one counted)
    eng._rates.prefill = 1.0  # (a tiny model fuses slower than it prefills: make every mix look faster)
    nxt = eng.fuse(PASSAGES, QUESTION).stats["adaptive"]
    assert nxt["choice"] == "fused" and nxt["reason"].startswith(
        "fusion tail not measured yet (counted as 0.4"
    )
    assert nxt["recomputed"] < len(PASSAGES) - 1 and nxt["rates"]["fuse_tokens_per_s"] == pytest.approx(
        1.0 / 0.4
    )
    assert eng._rates.fuse is None  # (the first tail reading is the warm-up)
    eng.fuse(PASSAGES, QUESTION)
    assert eng._rates.fuse is not None
    eng._rates.forget_link()  # a new link: probed again beside a prefill, its first read counting
    a = eng.fuse(PASSAGES, QUESTION).stats["adaptive"]
    assert a["choice"] == "full prefill" and "probed" in a["reason"]
    assert _wait_probe(eng) == "done" and eng._rates.link
    # missing entries: the probe reads nothing, and the next call precomputes them through a mix
    bare = engine(model, smol_tokenizer, MemoryStore())
    for _ in range(3):
        a = bare.fuse(PASSAGES, QUESTION).stats["adaptive"]
    assert a["choice"] == "full prefill" and _wait_probe(bare) == "failed" and not list(bare.store.keys())
    a = bare.fuse(PASSAGES, QUESTION).stats["adaptive"]
    assert a["choice"] == "fused" and len(list(bare.store.keys())) == len(PASSAGES)


def test_warmup_measures_the_rates_so_the_second_call_is_planned(model, smol_tokenizer):
    """``warmup`` with adaptive loading runs the streamed adaptive path over synthetic entries (at
    every stored precision, nothing left in the engine's store) and measures the prefill, front
    and tail rates: the first call is a full prefill beside the link's probe, the second is
    planned with every rate measured. Results afterwards equal a cold engine's."""
    store = SlowStore(rate=1e12)
    eng = ChunkCache(model=model, tokenizer=smol_tokenizer, store=store, fast_path=True,
                     adaptive=AdaptiveConfig(precisions=("int2",)))  # fmt: skip
    n_ctx = sum(len(b) // 8 for b in eng.resolve(PASSAGES)[1])
    over = len(eng._suffix_ids(""))
    n_q = len(eng._suffix_ids(QUESTION)) - over
    out = eng.warmup((n_ctx, n_ctx), (n_q, n_q), chunk_tokens=24)
    assert out["adaptive_fusions"] > 0 and out["rates_measured"] == ["prefill", "recompute", "fuse"]
    r = eng._rates
    # (the front: on the CPU its span is the host's, so it gives the floor, not a rate)
    assert r.prefill and r.fuse and (r.recompute or r.front_host) and not r.link and list(store.keys()) == []
    eng.precompute(PASSAGES)
    a = eng.fuse(PASSAGES, QUESTION).stats["adaptive"]
    assert a["choice"] == "full prefill" and "link is probed" in a["reason"] and _wait_probe(eng) == "done"
    r.prefill = 1.0  # (the tiny model: every mix faster than the prefill)
    b = eng.fuse(PASSAGES, QUESTION).stats["adaptive"]
    assert b["choice"] == "fused" and "not measured" not in b["reason"]
    cold = ChunkCache(model=model, tokenizer=smol_tokenizer, store=store, fast_path=True,
                      adaptive=AdaptiveConfig(precisions=("int2",), recompute_chunks=b["recomputed"]))  # fmt: skip
    eng.adaptive = AdaptiveConfig(precisions=("int2",), recompute_chunks=b["recomputed"])
    x, y = eng.fuse(PASSAGES, QUESTION), cold.fuse(PASSAGES, QUESTION)
    assert torch.equal(x.logits, y.logits) and torch.equal(x.kv, y.kv)
