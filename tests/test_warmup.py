"""``ChunkCache.warmup``: the graph shapes a fusion records (``fuse.graph_shapes``), the few
prompts that cover a range of them (``fuse.warmup_points``), and a warm-up that leaves no trace
but its graphs: nothing stored, nothing left in the device cache, later results unchanged. On
CUDA (``-m gpu``): after a warm-up, fusions in its range record no graph, and the graphs it
recorded are exactly the predicted shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import PASSAGES, QUESTION, tiny_model

from chunkcache.engine import ChunkCache
from chunkcache.fuse import FuseConfig, graph_shapes, warmup_points
from chunkcache.graphs import FusionGraphs

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("policy", ["qfast", "qaware", "gradual", "cacheblend"])
def test_warmup_points_cover_every_shape_of_the_range(policy):
    graphs, cfg = FusionGraphs(n_bucket=256, row_bucket=16, probe_bucket=8), FuseConfig(0.15, policy)
    contexts, questions = range(300, 900), range(3, 40)
    every = set().union(*(graph_shapes(graphs, cfg, 6, 9, c, q) for c in contexts for q in questions))
    points = warmup_points(graphs, cfg, 6, 9, contexts, questions)
    assert set().union(*(graph_shapes(graphs, cfg, 6, 9, c, q) for c, q in points)) == every
    assert len(points) <= len(every)  # each point brings a shape no earlier one had
    kinds = {s[0] for s in every}
    assert kinds == ({"probe", "layers"} if policy in ("qfast", "qaware") else {"layers"})


def test_graph_shapes_pad_rows_and_probe():
    graphs, cfg = FusionGraphs(n_bucket=1024, row_bucket=64, probe_bucket=16), FuseConfig(0.15, "qfast")
    # 8000 chunk tokens: 1200 kept + 20 question rows -> 1280; 30 + 8000 + 20 + 16 phantom -> 8192
    assert graph_shapes(graphs, cfg, 32, 30, 8000, 20) == {("layers", 8192, 1280), ("probe", 8192, 32)}
    assert graph_shapes(graphs, cfg, 32, 30, 8130, 20) == {("layers", 9216, 1280), ("probe", 9216, 32)}
    assert graph_shapes(graphs, FuseConfig(0.0, "qfast"), 32, 30, 8000, 20) == {("layers", 8192, 20)}


@pytest.fixture
def engines(smol_tokenizer, tmp_path):
    model = tiny_model()
    a = ChunkCache(model=model, tokenizer=smol_tokenizer, store=str(tmp_path / "a"), codec="int8",
                   fast_path=True, device_cache_bytes=64 << 20)  # fmt: skip
    b = ChunkCache(
        model=model, tokenizer=smol_tokenizer, store=str(tmp_path / "b"), codec="int8", fast_path=True
    )
    return a, b


def test_warmup_leaves_no_trace_but_its_graphs(engines):
    warm, cold = engines
    n_ctx = sum(len(b) // 8 for b in warm.resolve(PASSAGES)[1])
    out = warm.warmup((n_ctx - 40, n_ctx + 40), (1, 16), chunk_tokens=24)
    assert out["points"] >= 1 and out["fusions"] >= 2 * out["points"]
    assert list(warm.store.keys()) == []  # synthetic entries are never stored
    assert len(warm.device_cache) == 0  # and leave the device cache
    warm.precompute(PASSAGES)
    cold.precompute(PASSAGES)
    for chunks in (PASSAGES, PASSAGES[::-1], PASSAGES[1:3]):
        a, b = warm.fuse(chunks, QUESTION), cold.fuse(chunks, QUESTION)
        assert torch.equal(a.selected, b.selected) and torch.equal(a.logits, b.logits)
        assert torch.equal(a.kv, b.kv)


def test_warmup_without_the_fast_path_does_nothing(smol_tokenizer):
    eng = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=None, fast_path=False)
    assert eng.warmup((100, 200)) == {"points": 0, "fusions": 0, "graphs_recorded": 0, "seconds": 0.0}


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"context_tokens": 8000}, TypeError),
        ({"context_tokens": (200, 100)}, ValueError),
        ({"context_tokens": (0, 100)}, ValueError),
        ({"context_tokens": (10, 20), "question_tokens": (5, 2)}, ValueError),
        ({"context_tokens": (10, 20), "chunk_tokens": 0}, ValueError),
        ({"context_tokens": (10, 20), "recompute_ratio": 1.5}, ValueError),
        ({"context_tokens": (10, 10**7)}, ValueError),  # longer than the model takes
    ],
)
def test_warmup_bad_arguments_fail_first(tiny_engine, kwargs, error):
    with pytest.raises(error):
        tiny_engine.warmup(**kwargs)


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_after_warmup_fusions_in_its_range_record_nothing_on_cuda(smol_tokenizer, tmp_path, cached):
    model = tiny_model().to("cuda")
    kw = {"device_cache_bytes": 256 << 20} if cached else {}
    warm = ChunkCache(model=model, tokenizer=smol_tokenizer, store=str(tmp_path / "w"), codec="int8", **kw)
    cold = ChunkCache(model=model, tokenizer=smol_tokenizer, store=str(tmp_path / "c"), codec="int8")
    sets = [PASSAGES, PASSAGES[::-1], PASSAGES[1:], PASSAGES[:2], PASSAGES[2:]]
    questions = [QUESTION, "Where?", "Which river has the largest discharge volume of all rivers on Earth?"]
    lens = [sum(len(b) // 8 for b in warm.resolve(s)[1]) for s in sets]
    over = len(warm._suffix_ids(""))
    qlens = [len(warm._suffix_ids(q)) - over for q in questions]  # the question's own tokens, about
    out = warm.warmup((min(lens), max(lens)), (min(qlens), max(qlens)), chunk_tokens=20)
    st = warm.stagings().stagings()[0]
    g = st.graphs
    # what it recorded is what graph_shapes predicts for its points, one graph per layer group
    n_b = {id(buf): buf.shape[3] for _, buf in g.buffers.values()}
    recorded = {(k[0], n_b[k[-1]], k[3]) for k in g.graphs}
    assert out["graphs_recorded"] == len(g.graphs) > 0, (out, len(g.graphs))
    cfg = warm.default_fuse
    want = set()
    for c in range(min(lens), max(lens) + 1):
        for q in range(max(1, over + min(qlens) - 2), over + max(qlens) + 3):
            want |= graph_shapes(g, cfg, warm.lm.spec.num_layers, len(warm._prefix_ids), c, q)
    assert recorded == want, (sorted(recorded - want), sorted(want - recorded))
    warm.precompute(PASSAGES)
    cold.precompute(PASSAGES)
    captures = g.captures
    for s in sets:
        for q in questions:
            for _ in range(2):  # store, then (cached) resident
                a, b = warm.fuse(s, q), cold.fuse(s, q)
                assert torch.equal(a.selected.cpu(), b.selected.cpu()) and torch.equal(a.logits, b.logits)
    assert g.captures == captures, sorted(g.graphs)  # nothing new recorded while serving
