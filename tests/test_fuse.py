"""Contract tests of fusion: ratio 1 is a full prefill, ratio 0 is plain reuse of re-rotated caches,
re-rotation equals encoding at the offset, the mask is exactly position-causal, and chunk order,
GQA and every supported architecture behave. Tiny random models run fast; the real default model
is checked too (marked slow; it still runs in CI)."""

from __future__ import annotations

import pytest
import torch
from conftest import PASSAGES, QUESTION, tiny_model
from test_impact import _budgets_reference

from chunkcache.engine import ChunkCache
from chunkcache.fuse import FuseConfig, assemble, exact_chunks, fuse_kv
from chunkcache.kernels import rerotate_scatter_reference
from chunkcache.model import cache_kwarg, rotation
from chunkcache.select import POLICIES
from chunkcache.template import CONTEXT_SINK_PASSAGES


def full_logits(engine: ChunkCache, chunks, question) -> torch.Tensor:
    ids = engine.prompt_ids(chunks, question).to(engine.lm.device)
    with torch.no_grad():
        return engine.model(input_ids=ids).logits[0, -1].float()


def make_engine(arch, tok, **overrides):
    return ChunkCache(model=tiny_model(arch, **overrides), tokenizer=tok, store=None)


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("llama", {}),
        ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
        (
            "llama",
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 512,
                    "rope_theta": 500000.0,
                }
            },
        ),
        ("mistral", {"sliding_window": 40}),
        ("qwen2", {}),
        ("qwen3", {}),
        # layer 0 full attention, layers 1-2 a window of 24 (shorter than the prompt)
        ("qwen2", {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1}),
        (
            "qwen3",
            {
                "use_sliding_window": True,
                "sliding_window": 24,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            },
        ),
    ],
    ids=[
        "llama",
        "llama-linear",
        "llama3-rope",
        "mistral-window",
        "qwen2-bias",
        "qwen3-qknorm",
        "qwen2-mixed-window",
        "qwen3-layer-types",
    ],
)
def test_ratio_one_is_full_prefill(smol_tokenizer, arch, overrides):
    """(Ratio 1 bypasses selection, so one policy stands for all: ``test_policy_selects_its_top_k``
    tests the policies.)"""
    eng = make_engine(arch, smol_tokenizer, **overrides)
    ref = full_logits(eng, PASSAGES, QUESTION)
    fused = eng.fuse(PASSAGES, QUESTION, recompute_ratio=1.0)
    torch.testing.assert_close(fused.logits, ref, rtol=1e-4, atol=1e-4)
    assert fused.stats["recomputed_tokens"] == fused.stats["chunk_tokens"]
    # and the cache it hands over continues exactly like the model's own cache
    ids = eng.prompt_ids(PASSAGES, QUESTION)
    with torch.no_grad():
        want = eng.model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=2)[
            0, ids.shape[1] :
        ]
    kv_before = fused.kv.clone()
    cache = fused.fresh_cache()
    assert cache.layers[0].keys.data_ptr() == fused.kv[0, 0].data_ptr()  # a view, not a copy
    got = eng.model.generate(
        input_ids=fused.input_ids,
        **{cache_kwarg(eng.model): cache},
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=2,
    )[0, ids.shape[1] :]
    assert want.tolist() == got.tolist()
    assert torch.equal(fused.kv, kv_before)  # decoding from the views left the fused KV as it was
    assert cache.get_seq_length() == ids.shape[1] + 7  # and grew its own tensors


@pytest.mark.parametrize("sink", ["prefix", "context"])
def test_ratio_zero_is_reuse_of_rerotated_caches(smol_tokenizer, tiny_engine, sink):
    """At ratio 0 only the question is computed over the reused caches. The reference is built by
    transformers alone (no ``assemble``, no rotation code): the prefix encoded on its own, each
    chunk encoded behind its sink with positions shifted to where it sits in the prompt (what
    re-rotating the stored keys must equal), and the question run over that cache. The
    ``context`` sink is the prefix and the generic passages, laid out as chunks."""
    from transformers import DynamicCache

    eng = tiny_engine
    if sink != "prefix":
        eng = ChunkCache(model=tiny_engine.model, tokenizer=smol_tokenizer, store=None, sink=sink)
        t = eng.template
        assert t.sink_ids(sink) == t.prefix_ids() + [x for p in CONTEXT_SINK_PASSAGES for x in t.chunk_ids(p)]
    fused = eng.fuse(PASSAGES, QUESTION, recompute_ratio=0.0)
    pre, suffix = eng._prefix_ids, eng.template.suffix_ids(QUESTION)
    sink = eng.template.sink_ids(eng.settings.sink)
    with torch.no_grad():
        parts = [eng.model(input_ids=torch.tensor([pre]), use_cache=True).past_key_values]
        cuts = [0]
        o = len(pre)
        for text in PASSAGES:
            ids = sink + eng.chunk(text).token_ids.tolist()
            pos = torch.arange(len(ids))[None] + o - len(sink)
            parts.append(
                eng.model(input_ids=torch.tensor([ids]), position_ids=pos, use_cache=True).past_key_values
            )
            cuts.append(len(sink))
            o += len(ids) - len(sink)
        # [L, 2, H, tokens, D] of each encoding, sinks cut off, side by side
        want = torch.cat(
            [
                torch.stack([torch.stack([x.keys[0], x.values[0]]) for x in c.layers])[:, :, :, cut:]
                for c, cut in zip(parts, cuts, strict=True)
            ],
            dim=3,
        )
        assert want.shape[3] == o == fused.kv.shape[3] - len(suffix)
        cache = DynamicCache()
        for i in range(want.shape[0]):
            cache.update(want[i, 0][None].clone(), want[i, 1][None].clone(), i)
        out = eng.model(input_ids=torch.tensor([suffix]), use_cache=True, **{cache_kwarg(eng.model): cache})
    torch.testing.assert_close(fused.kv[:, :, :, :o], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.logits, out.logits[0, -1].float(), rtol=1e-5, atol=1e-5)
    assert fused.stats["recomputed_tokens"] == 0
    # and it differs from a full prefill (reuse is not free)
    assert (fused.logits - full_logits(eng, PASSAGES, QUESTION)).abs().max() > 1e-3


def test_rerotation_matches_encoding_at_offset(tiny_engine):
    """Keys stored at local positions and rotated by delta equal the keys the model computes when
    the same (sink + chunk) is encoded with positions shifted by delta."""
    from transformers import DynamicCache

    eng = tiny_engine
    chunk = eng.chunk(PASSAGES[1])
    sink = eng.template.sink_ids(eng.settings.sink)
    delta = 777
    ids = torch.tensor([sink + chunk.token_ids.tolist()])
    cache = DynamicCache()
    pos = torch.arange(ids.shape[1])[None] + delta
    with torch.no_grad():
        eng.model(input_ids=ids, position_ids=pos, use_cache=True, **{cache_kwarg(eng.model): cache})
    cos, sin = rotation(eng.model, delta, "cpu")
    for layer in range(chunk.num_layers):
        want_k = cache.layers[layer].keys[0, :, len(sink) :]
        want_v = cache.layers[layer].values[0, :, len(sink) :]
        k, v = torch.empty_like(want_k), torch.empty_like(want_v)
        rerotate_scatter_reference("raw", {"kv": chunk.kv[layer]}, cos, sin, k, v, 0)
        # (1e-4: transformers computes the angles of positions near 800 in fp32, 2.4e-5 off)
        torch.testing.assert_close(k, want_k, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v, want_v, rtol=1e-5, atol=1e-5)


def test_mask_is_exactly_position_causal(tiny_engine):
    """A recomputed token must not see keys after its own position: perturbing the reused KV of a
    later chunk leaves the recomputed K/V of an earlier chunk's selected tokens unchanged in every
    layer. (The bottom-right mask of the public implementations fails this.)"""
    eng = tiny_engine
    chunks = eng.chunks(PASSAGES)
    pre, suf = eng._prefix_ids, eng.template.suffix_ids(QUESTION)
    cfg = FuseConfig(recompute_ratio=0.3, policy="epic")  # deterministic: first tokens of each chunk
    a = fuse_kv(eng.lm, eng.prefix_kv(), chunks, pre, suf, cfg)
    noisy = [chunks[0]] + [
        type(c)(token_ids=c.token_ids, kv=c.kv + torch.randn_like(c.kv), base_pos=c.base_pos)
        for c in chunks[1:]
    ]
    b = fuse_kv(eng.lm, eng.prefix_kv(), noisy, pre, suf, cfg)
    first_end = len(pre) + chunks[0].num_tokens
    sel = a.selected[a.selected < first_end]
    assert sel.numel() > 0 and torch.equal(a.selected, b.selected)
    torch.testing.assert_close(a.kv[:, :, :, sel], b.kv[:, :, :, sel], rtol=0, atol=0)
    # while the question (which sees everything) does change
    assert (a.logits - b.logits).abs().max() > 1e-3


def test_chunk_order_permutations(tiny_engine):
    eng = tiny_engine
    for order in ([0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]):
        chunks = [PASSAGES[i] for i in order]
        fused = eng.fuse(chunks, QUESTION, recompute_ratio=1.0)
        torch.testing.assert_close(fused.logits, full_logits(eng, chunks, QUESTION), rtol=1e-4, atol=1e-4)
        assert torch.equal(fused.input_ids, eng.prompt_ids(chunks, QUESTION))
        part = eng.fuse(chunks, QUESTION, recompute_ratio=0.25)
        assert part.stats["recomputed_tokens"] == round(0.25 * part.stats["chunk_tokens"])


def test_intermediate_ratios_between_reuse_and_full(tiny_engine):
    eng = tiny_engine
    ref = full_logits(eng, PASSAGES, QUESTION).log_softmax(-1)

    def kl(r):
        lp = eng.fuse(PASSAGES, QUESTION, recompute_ratio=r, policy="cacheblend").logits.log_softmax(-1)
        return float((ref.exp() * (ref - lp)).sum())

    k0, k5, k1 = kl(0.0), kl(0.5), kl(1.0)
    assert k1 < 1e-6 < k5 < k0


def test_bfloat16_fusion_tracks_prefill_to_rounding(smol_tokenizer):
    """CPU bf16 at ratio 1 runs the model's own ops, with one exception: transformers' prefill
    calls causal SDPA, fusion SDPA with an explicit position mask over a subset of queries, and
    the two kernels accumulate in different orders. So layer 0's K/V (before any attention) are
    bit-identical, and from layer 1 on K/V and logits differ by bf16 rounding only: measured at
    most 0.0234 (1.5 ulp of bf16 at |x| in [2, 4)) for llama, qwen2 and mistral tiny models,
    hence atol 0.04 (the test allowed 0.1 + 5% before)."""
    model = tiny_model("llama").to(torch.bfloat16)
    eng = ChunkCache(model=model, tokenizer=smol_tokenizer, store=None)
    fused = eng.fuse(PASSAGES, QUESTION, recompute_ratio=1.0)
    assert fused.kv.dtype == torch.bfloat16
    ids = eng.prompt_ids(PASSAGES, QUESTION)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    ref = out.logits[0, -1].float()
    assert torch.argmax(fused.logits) == torch.argmax(ref)
    kv = out.past_key_values.layers
    assert torch.equal(fused.kv[0, 0, :, :-1], kv[0].keys[0, :, :-1])
    assert torch.equal(fused.kv[0, 1, :, :-1], kv[0].values[0, :, :-1])
    for li in range(1, len(kv)):
        want = torch.stack([kv[li].keys[0], kv[li].values[0]])[:, :, :-1]
        torch.testing.assert_close(fused.kv[li, :, :, :-1], want, rtol=0, atol=0.04)
    torch.testing.assert_close(fused.logits, ref, rtol=0, atol=0.04)


@pytest.mark.slow
def test_default_model_contracts(smol):
    """The real SmolLM2-135M (30 layers, GQA 9/3): ratio 1 equals full prefill (logits and greedy
    text) and fused generation through ``model.generate`` works."""
    eng = ChunkCache(model=smol.model, tokenizer=smol.tokenizer, store=None)
    ref = full_logits(eng, PASSAGES, QUESTION)
    fused = eng.fuse(PASSAGES, QUESTION, recompute_ratio=1.0)
    torch.testing.assert_close(fused.logits, ref, rtol=1e-4, atol=2e-4)
    ids = eng.prompt_ids(PASSAGES, QUESTION)
    with torch.no_grad():
        want = eng.model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    assert (
        eng.generate_from(fused, max_new_tokens=12)
        == eng.tokenizer.decode(want, skip_special_tokens=True).strip()
    )
    assert "Eiffel" in eng.generate(PASSAGES[::-1], QUESTION, max_new_tokens=12, recompute_ratio=0.15)


def test_qfast_runs_no_layer_at_full_width(tiny_engine):
    """qfast selects before layer 0 from the probe alone: its compute is the ratio (plus the
    question and its probe), while qaware pays a full-width layer 0 for its deviation term."""
    eng = tiny_engine
    fast = eng.fuse(PASSAGES, QUESTION, recompute_ratio=0.25, policy="qfast")
    slow = eng.fuse(PASSAGES, QUESTION, recompute_ratio=0.25, policy="qaware")
    st_f, st_s = fast.stats, slow.stats
    assert st_f["recomputed_tokens"] == st_s["recomputed_tokens"] == round(0.25 * st_f["chunk_tokens"])
    # the recomputed rows and the question through every layer, plus the question's probe
    share = (st_f["recomputed_tokens"] + 2 * st_f["question_tokens"]) / (
        st_f["chunk_tokens"] + st_f["question_tokens"]
    )
    assert st_f["probe_token_layers"] == st_f["question_tokens"] * eng.lm.spec.num_layers
    assert st_f["compute_fraction"] == pytest.approx(share, rel=1e-6)
    assert st_s["compute_fraction"] > st_f["compute_fraction"]
    # no layer-0 projection at full width either: unselected tokens keep their reused K/V there
    naive = eng.fuse(PASSAGES, QUESTION, recompute_ratio=0.0, policy="qfast")
    p, c = st_f["prefix_tokens"], st_f["chunk_tokens"]
    unselected = sorted(set(range(p, p + c)) - set(fast.selected.tolist()))
    assert len(unselected) == c - st_f["recomputed_tokens"]
    assert torch.equal(fast.kv[0, :, :, unselected], naive.kv[0, :, :, unselected])
    assert not torch.equal(fast.kv[0, :, :, fast.selected], naive.kv[0, :, :, fast.selected])


def test_exact_chunks_are_those_at_their_encoding_offset():
    """A chunk is exact where it sits at the positions it was encoded at: behind the prefix sink
    only the first chunk; behind BOS (base_pos 1) none."""
    assert exact_chunks(5, [3, 4, 2], [5, 5, 5]) == [True, False, False]
    assert exact_chunks(5, [3, 4], [1, 1]) == [False, False]
    # behind a context sink of 3 tokens (base_pos 8) the second chunk sits at its encoding offset,
    # but behind another chunk than the one it was encoded behind: not exact, nor is the first
    assert exact_chunks(5, [3, 4], [8, 8]) == [False, False]
    assert exact_chunks(5, [], []) == []


def test_qstale_spends_the_budget_on_stale_chunks(smol_tokenizer, tiny_engine):
    """qstale ranks like qfast but never picks a token of an exact chunk while stale ones are
    left: with the prefix sink, qfast spends part of its budget on the first chunk, where the
    recompute reproduces the reused K/V (so those rows are wasted), and qstale gives the same
    number of tokens to the other chunks. Behind BOS no chunk is exact and the two agree."""
    eng, r = tiny_engine, 0.3
    fast = eng.fuse(PASSAGES, QUESTION, recompute_ratio=r, policy="qfast")
    stale = eng.fuse(PASSAGES, QUESTION, recompute_ratio=r, policy="qstale")
    naive = eng.fuse(PASSAGES, QUESTION, recompute_ratio=0.0, policy="qfast")
    p, first = fast.stats["prefix_tokens"], eng.chunks(PASSAGES)[0].num_tokens
    assert stale.stats["exact_chunks"] == [True, False, False, False]
    wasted = fast.selected[fast.selected < p + first]
    assert wasted.numel() > 0  # the question reads the first chunk: qfast picks some of it
    torch.testing.assert_close(fast.kv[:, :, :, wasted], naive.kv[:, :, :, wasted], rtol=1e-5, atol=1e-5)
    assert int((stale.selected < p + first).sum()) == 0
    assert stale.stats["recomputed_tokens"] == fast.stats["recomputed_tokens"]
    assert set(fast.selected.tolist()) - set(wasted.tolist()) < set(stale.selected.tolist())
    for sink in ("bos", "context"):  # no chunk is exact: qstale is qfast
        other = ChunkCache(model=eng.model, tokenizer=smol_tokenizer, store=None, sink=sink)
        a = other.fuse(PASSAGES, QUESTION, recompute_ratio=r, policy="qfast")
        b = other.fuse(PASSAGES, QUESTION, recompute_ratio=r, policy="qstale")
        assert b.stats["exact_chunks"] == [False] * 4
        assert torch.equal(a.selected, b.selected) and torch.equal(a.logits, b.logits)


def _policy_references(eng):
    """Independent inputs of every policy's score, from transformers alone: the full prefill's
    layer-1 V (fusion's fresh V at its first check layer: layers 0 and 1's projections run at full
    width), the reused cache (``assemble``, itself checked against encoding at the offset above)
    and the probe's per-layer attention mass (the question over the reused cache, eager
    attention's weights)."""
    import copy

    from transformers import DynamicCache

    chunks = eng.chunks(PASSAGES)
    pre, suf = eng._prefix_ids, eng.template.suffix_ids(QUESTION)
    ids = eng.prompt_ids(PASSAGES, QUESTION)
    buf, _, offsets = assemble(eng.lm, eng.prefix_kv(), chunks, len(suf))
    p, n_ctx = len(pre), sum(c.num_tokens for c in chunks)
    ctx = slice(p, p + n_ctx)
    with torch.no_grad():
        full = eng.model(input_ids=ids, use_cache=True)
        v_full = full.past_key_values.layers[1].values[0]  # [H, N, D]
        dev = (v_full[:, ctx] - buf[1, 1, :, ctx]).norm(dim=-1).sum(0)  # [C]
        eager = copy.deepcopy(eng.model)
        eager.set_attn_implementation("eager")
        cache = DynamicCache()
        s = p + n_ctx
        for i in range(buf.shape[0]):
            cache.update(buf[i, 0, :, :s][None].clone(), buf[i, 1, :, :s][None].clone(), i)
        out = eager(
            input_ids=torch.tensor([suf]), use_cache=True, output_attentions=True,
            **{cache_kwarg(eager): cache},
        )  # fmt: skip
    mass = torch.stack([a[0].mean(dim=(0, 1))[ctx] for a in out.attentions])  # [L, C]
    return chunks, pre, suf, p, n_ctx, dev, mass, full


def test_policy_selects_its_top_k(smol_tokenizer):
    """At an intermediate ratio each policy's selection is the top k of its own score, computed
    here from independent references (``_policy_references``), and the recompute is exact where
    it must be: every layer up to the first check layer equals the full prefill for all chunk
    tokens (qfast: layer 0 for the selected ones, whose layer-0 K/V depend on the token alone),
    and every selected token whose whole causal past is exact (the prefix, recomputed tokens,
    and the first chunk, which sits behind the same template prefix it was encoded behind)
    equals the full prefill in every layer (EPIC's first tokens of the second chunk)."""
    layers = 5
    eng = ChunkCache(  # with stored scores for qimpact (the other policies never read them)
        model=tiny_model("llama", num_hidden_layers=layers), tokenizer=smol_tokenizer, store=None,
        token_scores=True,
    )
    chunks, pre, suf, p, n_ctx, dev, mass, full = _policy_references(eng)
    k = 4 * round(0.05 * n_ctx)  # a multiple of the 4 chunks, so EPIC's per-chunk share has no ties
    ratio = k / n_ctx
    assert 3 * k < n_ctx  # gradual's first filter keeps 3k: a real filter
    pos = torch.arange(p, p + n_ctx)

    def top(score, kk=k):
        return set((pos[torch.topk(score, kk).indices]).tolist())

    attn = mass.sum(0)
    reused = assemble(eng.lm, eng.prefix_kv(), chunks, len(suf))[0]
    vnorm = reused[:, 1, :, p : p + n_ctx].float().norm(dim=-1).mean(1)  # [L, C] head-mean V norms
    within = torch.cat([torch.arange(c.num_tokens) for c in chunks])
    in_first = torch.arange(n_ctx) < chunks[0].num_tokens  # exact: behind the prefix it was encoded behind
    # qimpact: per-chunk budgets from the stored scores' sums over the stale chunks (the first is
    # exact: weight 0, cap 0), each chunk's best by the probe's mass (``test_impact`` checks the
    # scores against eager attention and the budgets in detail)
    starts = [sum(c.num_tokens for c in chunks[:i]) for i in range(len(chunks))]
    spans = [range(a, a + c.num_tokens) for a, c in zip(starts, chunks, strict=True)]
    weights = [0.0] + [float(c.token_scores.sum()) for c in chunks[1:]]
    caps = [0] + [c.num_tokens for c in chunks[1:]]
    impact = set()
    for span, b in zip(spans, _budgets_reference(weights, caps, k), strict=True):
        idx = torch.tensor(list(span))
        impact |= set(pos[idx[torch.topk(attn[idx], b).indices]].tolist())
    expected = {
        "cacheblend": top(dev),
        "qfast": top(attn),
        "qshallow": top(mass[: round(layers / 2)].sum(0)),  # the probe over the first half of the layers
        "qdeep": top(mass[: round(layers * 7 / 8)].sum(0)),  # over the first 7/8 of them
        "qstale": top(torch.where(in_first, attn - attn.max() - 1, attn)),
        "qvalue": top(torch.where(in_first, -1.0, (mass * vnorm).sum(0))),
        "qimpact": impact,
        "qaware": top((attn / attn.mean()) * (dev / dev.mean()).sqrt()),
        "epic": set(pos[within < k // 4].tolist()),
        "epic0": set(pos[within < k // 4].tolist()),  # EPIC's, chosen before layer 0 (no probe)
        "random": set(pos[torch.randperm(n_ctx, generator=torch.Generator().manual_seed(0))[:k]].tolist()),
    }
    assert set(expected) | {"gradual"} == set(POLICIES)
    full_kv = torch.stack(
        [torch.stack([layer.keys[0], layer.values[0]]) for layer in full.past_key_values.layers]
    )  # [L, 2, H, N, D]
    first = range(p, p + chunks[0].num_tokens)
    reuse = fuse_kv(eng.lm, eng.prefix_kv(), chunks, pre, suf, FuseConfig(recompute_ratio=0.0))
    torch.testing.assert_close(reuse.kv[:, :, :, first], full_kv[:, :, :, first], rtol=1e-5, atol=1e-5)
    for name, policy in POLICIES.items():
        res = fuse_kv(
            eng.lm, eng.prefix_kv(), chunks, pre, suf, FuseConfig(recompute_ratio=ratio, policy=name)
        )
        sel = res.selected.tolist()
        assert sel == sorted(sel) and len(sel) == k == res.stats["recomputed_tokens"], name
        if name == "gradual":  # 3k by V deviation at layer 1, then 2k and k by later deviations
            assert set(sel) <= top(dev, 3 * k), name
        else:
            assert set(sel) == expected[name], name
        if policy.before_layers:
            exact_layers, cols = [0], res.selected
        else:
            exact_layers, cols = range(min(policy.schedule(layers, ratio)) + 1), pos
        for li in exact_layers:
            torch.testing.assert_close(res.kv[li][:, :, cols], full_kv[li][:, :, cols], rtol=1e-5, atol=1e-5)
        clean = set(first) | set(sel)
        gap = next(i for i in range(p, p + n_ctx + 1) if i not in clean)  # first stale position
        exact = [s for s in sel if s < gap and s not in first]
        if name.startswith("epic"):
            assert exact == list(range(first.stop, first.stop + k // 4))
        torch.testing.assert_close(res.kv[:, :, :, exact], full_kv[:, :, :, exact], rtol=1e-5, atol=1e-5)


def test_question_attention_respects_the_sliding_window():
    """``SelectContext.question_attention`` (for policies that rank by the check layer's own
    attention) is the probe's mass over the assembled keys under the layer's mask, window
    included: keys that slid out of every question token's window get none."""
    from chunkcache.select import SelectContext

    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(4, 3, 16, generator=g), torch.randn(2, 40, 16, generator=g)
    q_pos = torch.tensor([37, 38, 39])
    ctx = SelectContext(
        layer=1, positions=torch.arange(5, 35), chunk_of=torch.zeros(30, dtype=torch.long),
        chunk_offsets=torch.tensor([5]), fresh=None, reused=None, question_q=q, keys=keys,
        question_pos=q_pos, scale=0.25, window=10,
    )  # fmt: skip
    scores = torch.einsum("hqd,hkd->hqk", q, keys.repeat_interleave(2, 0)) * 0.25
    j = torch.arange(40)
    visible = (j[None, :] <= q_pos[:, None]) & (j[None, :] > q_pos[:, None] - 10)
    want = scores.masked_fill(~visible[None], float("-inf")).softmax(-1).mean(dim=(0, 1))[5:35]
    got = ctx.question_attention()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert torch.equal(got[:23], torch.zeros(23)) and bool((got[25:] > 0).all())  # 28..34 visible


def test_chunkfirst_spends_its_share_on_one_chunks_stale_tokens_first():
    """``select.ChunkFirst``: ``share`` of the k tokens are the named chunk's best stale ones
    (by qvalue's score), the rest qvalue's pick among the others; exact tokens never while stale
    ones are left; share 0 is qvalue's selection; k tokens either way."""
    from chunkcache.select import ChunkFirst, QValue, SelectContext

    g = torch.Generator().manual_seed(0)
    chunk_of = torch.tensor([0] * 4 + [1] * 5 + [2] * 6)
    positions = torch.arange(10, 25)
    attn = torch.rand(3, 15, generator=g)
    attn[:, 4:9] *= 0.01  # chunk 1: what the question barely reads
    ctx = SelectContext(
        layer=0, positions=positions, chunk_of=chunk_of, chunk_offsets=torch.tensor([10, 14, 19]),
        fresh=None, reused=None, question_q=None, keys=None, question_pos=torch.tensor([30]),
        scale=1.0, probe_attn=attn, exact=chunk_of == 0, value_norms=torch.rand(3, 15, generator=g) + 0.5,
    )  # fmt: skip
    score = (attn * ctx.value_norms).sum(0)
    sel = ChunkFirst(1).select(ctx, 7)
    assert sel.numel() == 7 and set(range(14, 19)) <= set(sel.tolist())  # all 5 of chunk 1
    rest = [p for p in sel.tolist() if not 14 <= p < 19]
    want = positions[9:][torch.topk(score[9:], 2).indices]  # qvalue's best 2 of chunk 2
    assert sorted(rest) == sorted(want.tolist())
    half = ChunkFirst(1, share=0.5).select(ctx, 6)  # 3 of chunk 1 (its best), then 3 by qvalue
    mine = [p for p in half.tolist() if 14 <= p < 19]
    assert sorted(mine) == sorted((positions[4:9][torch.topk(score[4:9], 3).indices]).tolist())
    assert torch.equal(ChunkFirst(1, share=0.0).select(ctx, 5), QValue().select(ctx, 5))
    assert not set(ChunkFirst(0).select(ctx, 11).tolist()) & set(range(10, 14))  # chunk 0 is exact
    for bad in (dict(chunk=-1), dict(chunk=True), dict(chunk=1, share=1.5)):
        with pytest.raises(ValueError):
            ChunkFirst(**bad)


def test_nearest_picks_the_passage_the_query_names():
    from chunkcache.corpus import nearest

    texts = ["Benum Manufacturing makes frames.", "Desta Industries makes tiles.", "Vesteth makes lanterns."]
    assert nearest(texts, "Who founded Desta Industries?") == 1
    assert nearest(texts, "Who founded Benum Manufacturing?", skip=[0]) in (1, 2)
    assert nearest(texts, "unrelated words only") == 0  # ties: the earliest
    assert nearest(texts, "unrelated words only", skip=[0]) == 1
    with pytest.raises(ValueError):
        nearest(texts, "x", skip=[0, 1, 2])


def test_epic_selects_chunk_starts_depth_by_depth_with_exact_ties():
    """EPIC's selection when k is not a multiple of the chunk count: every chunk's first tokens,
    one depth at a time, the last depth's ties going to the earlier chunks; a chunk shorter than
    the depth gives its place to the others. The key is exact, so CPU and CUDA agree (session 11's
    float score rounded to ties near 1e9 that topk broke differently on CUDA)."""
    from chunkcache.select import Epic, SelectContext

    lengths = [5, 2, 7, 6]
    offsets = torch.tensor([10, 15, 17, 24])
    positions = torch.cat([torch.arange(o, o + n) for o, n in zip(offsets.tolist(), lengths, strict=True)])
    chunk_of = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    ctx = SelectContext(0, positions, chunk_of, offsets, None, None, None, None, None, 1.0)
    within = positions - offsets[chunk_of]
    for k in range(1, positions.numel() + 1):
        got = Epic().select(ctx, k).sort().values.tolist()
        order = sorted(range(positions.numel()), key=lambda i: (int(within[i]), int(positions[i])))
        assert got == sorted(positions[order[:k]].tolist()), k
    # k = 6 over 4 chunks: depth 0 of all four, then depth 1 of the first two chunks
    assert sorted(Epic().select(ctx, 6).tolist()) == [10, 11, 15, 16, 17, 24]
