"""The load test's workload (Zipf popularity, misses never repeated) and a short run of every side
on a tiny model: each side answers, the summaries and ratios are filled in."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import pytest
from conftest import tiny_model

from chunkcache.bench.serve import Workload, _queries, run
from chunkcache.engine import ChunkCache


def test_queries_follow_zipf_and_misses_are_new():
    corpus = [f"passage {i}" for i in range(20)]
    w = Workload(passages=20, k=4, zipf=1.2, miss=0.1)
    qs = list(islice(_queries(w, corpus, ["fresh a", "fresh b"], ["q1", "q2"], seed=3), 400))
    assert all(len(set(t)) == 4 for t, _ in qs)
    drawn = Counter(x for t, _ in qs for x in t)
    misses = [x for x in drawn if x not in corpus]
    assert all(drawn[m] == 1 for m in misses)  # a miss is never seen again
    assert 0.05 < len(misses) / (400 * 4) < 0.15
    assert drawn[corpus[0]] > 2 * drawn[corpus[9]] > 0  # popular ranks come first
    with pytest.raises(ValueError, match="k must be"):
        Workload(passages=3, k=4)


def test_short_run_of_every_side(smol_tokenizer, tmp_path):
    eng = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=str(tmp_path / "s"), codec="int8")
    out = run(
        eng,
        clients=2,
        seconds=0.5,
        workload=Workload(passages=8, k=2, new_tokens=3),
        warmup=1,
        log=lambda *a: None,
    )
    assert [s["side"] for s in out["sides"]] == ["fused", "full", "full batched"]
    for s in out["sides"]:
        assert s["queries"] >= 1 and s["tokens_per_s"] > 0 and s["ttft_p99_s"] >= s["ttft_p50_s"] > 0
    assert out["ratios"]["baseline"] in ("full", "full batched") and out["ratios"]["qps"] > 0
    eng.store.close()


def test_batched_fused_side_and_its_ratios_against_the_same_run(smol_tokenizer, tmp_path):
    from chunkcache.batch import BatchConfig
    from chunkcache.bench.serve import cross_ratios

    eng = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=str(tmp_path / "s"), codec="int8")
    kw = dict(
        clients=2,
        seconds=0.5,
        workload=Workload(passages=8, k=2, new_tokens=2),
        warmup=1,
        log=lambda *a: None,
    )
    first = run(eng, full="sequential", **kw)
    eng.batching = BatchConfig(max_batch=2)
    batched = run(eng, full="none", **kw)
    assert [s["side"] for s in batched["sides"]] == ["fused batched"]
    assert batched["sides"][0]["mean_batch"] >= 1 and batched["batching"]["max_batch"] == 2
    assert batched["ratios"] == {}
    cross_ratios([first, batched])
    assert batched["ratios"]["baseline"] == "full" and batched["ratios"]["qps"] > 0
    eng.store.close()


def test_fused_side_with_batched_decoding_counts_every_token(smol_tokenizer, tmp_path):
    from chunkcache.decode import DecodeConfig

    eng = ChunkCache(
        model=tiny_model(), tokenizer=smol_tokenizer, store=str(tmp_path / "s"), codec="int8",
        decode_batching=DecodeConfig(max_batch=2), fast_path=True,
    )  # fmt: skip
    out = run(eng, clients=2, seconds=0.5, workload=Workload(passages=8, k=2, new_tokens=3), full="none",
              warmup=1, log=lambda *a: None)  # fmt: skip
    (fused,) = out["sides"]
    assert fused["side"] == "fused +decode batched" and fused["queries"] >= 1
    # every answer is 3 tokens (or ends early at an end-of-sequence token): never more
    assert fused["queries"] <= fused["tokens"] <= 3 * fused["queries"]
    assert fused["graph_warmup"]["fusions"] >= 2  # the CPU fast path ran the warm-up's fusions too
    eng.decoder.close()
    eng.store.close()


@pytest.mark.parametrize("fast_path", [False, True])
def test_queries_with_misses_are_summarised_apart_with_the_engines_miss_figures(
    smol_tokenizer, tmp_path, fast_path
):
    eng = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=str(tmp_path / "s"), codec="int8",
                     fast_path=fast_path)  # fmt: skip
    out = run(eng, clients=2, seconds=0.6, workload=Workload(passages=8, k=3, miss=0.5, new_tokens=1),
              full="sequential", warmup=1, log=lambda *a: None)  # fmt: skip
    fused, full = out["sides"]
    for s in (fused, full):
        assert s["hit_queries"] + s["miss_queries"] == s["queries"]
        assert s["miss_queries"] >= 1  # (half the passages are misses: a query without one is rare)
    b = fused["miss_breakdown"]  # every miss is new, so each query with one encoded it (or waited)
    assert b["calls"] == fused["miss_queries"] and b["chunks"] >= 1 and b["encode_s"] > 0 and b["save_s"] > 0
    assert "miss_breakdown" not in full
    eng.store.close()


def test_engine_reports_the_misses_a_fusion_encoded(smol_tokenizer):
    from conftest import PASSAGES, QUESTION

    for fast in (False, True):
        eng = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, fast_path=fast)
        eng.precompute(PASSAGES[:1])
        res = eng.fuse(PASSAGES[:3], QUESTION)
        assert res.stats["misses"]["chunks"] == 2 and res.stats["misses"]["encode_s"] > 0
        assert "misses" not in eng.fuse(PASSAGES[:3], QUESTION).stats  # stored now


def test_a_second_run_on_the_same_engine_meets_its_own_misses(smol_tokenizer, tmp_path):
    """Every query drawn with a miss encodes it, in a later run on the same engine too (session
    12's asyncio run reused the threads run's streams: most of its misses were stored by then)."""
    eng = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=str(tmp_path / "s"), codec="int8")
    kw = dict(clients=2, seconds=0.5, workload=Workload(passages=8, k=2, miss=0.5, new_tokens=1),
              full="none", warmup=0, log=lambda *a: None)  # fmt: skip
    for base in (0, 100_000):
        (fused,) = run(eng, stream_base=base, **kw)["sides"]
        assert fused["miss_queries"] >= 1
        assert fused["miss_breakdown"]["calls"] == fused["miss_queries"], base
    eng.store.close()
