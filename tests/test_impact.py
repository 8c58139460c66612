"""Context-impact scores stored at precompute time (``token_scores=True``) and the ``qimpact``
policy that turns them into per-chunk budgets: scores against eager attention, persistence
through LMDB (bit-exact, checksummed), keys, budgets against a reference, compute."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from conftest import PASSAGES, QUESTION, tiny_model

from chunkcache.engine import ChunkCache, PrecomputeConfig
from chunkcache.errors import CorruptEntryError
from chunkcache.format import header_span, read_header, unpack_chunk
from chunkcache.model import wrap_model
from chunkcache.precompute import encode_chunks
from chunkcache.select import POLICIES, QImpact, SelectContext, impact_budgets


def _eager_scores(model, sink: list[int], chunk: list[int]) -> torch.Tensor:
    """[n] reference: eager attention's weights over sink + chunk; each chunk token's attention
    from the chunk's queries (summed), mean over heads, mean over layers."""
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([sink + chunk]), output_attentions=True)
    finally:
        model.config._attn_implementation = "sdpa"
    s = len(sink)
    return torch.stack([a[0].mean(0)[s:, s:].sum(0) for a in out.attentions]).mean(0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_impact_scores_match_eager_attention(arch, smol_tokenizer):
    """``encode_chunks(token_scores=True)`` scores every token as eager attention's weights say
    (batched, right-padded rows of other lengths included), leaves the KV bit for bit as without
    scores, and stores them as ``[tokens]`` fp32."""
    model = tiny_model(arch)
    lm = wrap_model(model, smol_tokenizer)
    chunks = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], list(range(100, 113)), [300]]
    sink = [1, 40, 41]
    scored = encode_chunks(lm, chunks, sink, batch_size=3, token_scores=True)
    plain = encode_chunks(lm, chunks, sink, batch_size=3)
    for c, a, b in zip(chunks, scored, plain, strict=True):
        assert b.token_scores is None
        assert torch.equal(a.kv, b.kv)
        assert a.token_scores.dtype == torch.float32 and a.token_scores.shape == (len(c),)
        torch.testing.assert_close(a.token_scores, _eager_scores(model, sink, c), rtol=1e-5, atol=1e-6)
    # each layer's chunk attention sums to at most the chunk's queries (the rest is on the sink)
    assert all(float(a.token_scores.sum()) <= len(c) + 1e-4 for c, a in zip(chunks, scored, strict=True))


def _scores_section(raw: bytes) -> tuple[int, int]:
    """(start, end) bytes of the token_scores section in an entry."""
    h = read_header(raw)
    sec = h["sections"]["token_scores"]
    base = -(-header_span(raw) // 64) * 64  # the payload starts at the next 64-byte boundary
    return base + sec["offset"], base + sec["offset"] + sec["nbytes"]


def test_scores_persist_bit_exact_through_lmdb_and_are_keyed(tmp_path, smol_tokenizer):
    """An engine with ``token_scores=True`` stores each chunk with its scores in LMDB; a second
    engine on the same store (another process's view) reads them back bit for bit, equal to
    encoding the chunk directly. The setting is part of the keys: an engine without scores has
    other keys (unchanged from before: no ``token_scores`` in its key inputs) and never reads the
    scored entries as its own."""
    model = tiny_model("llama")
    path = str(tmp_path / "store")
    a = ChunkCache(model=model, tokenizer=smol_tokenizer, store=path, token_scores=True)
    keys = a.precompute(PASSAGES[:2])
    want = encode_chunks(a.lm, [a.template.chunk_ids(t) for t in PASSAGES[:2]],
                         a.settings.sink_ids(a.template), token_scores=True)  # fmt: skip
    for key, w in zip(keys, want, strict=True):
        raw = a.store.get(key)
        assert read_header(raw)["has_token_scores"] is True
        assert read_header(raw)["key"]["settings"]["token_scores"] == "impact-v1"
        assert torch.equal(unpack_chunk(raw).token_scores, w.token_scores)
    a.store.close()
    b = ChunkCache(model=model, tokenizer=smol_tokenizer, store=path, token_scores=True)
    for text, w in zip(PASSAGES[:2], want, strict=True):
        got = b.chunk(text)
        assert torch.equal(got.token_scores, w.token_scores) and torch.equal(got.kv, w.kv)
    plain = ChunkCache(model=model, tokenizer=smol_tokenizer, store=None)
    assert "token_scores" not in plain.key_info()["settings"]
    assert plain.key(PASSAGES[0]) != b.key(PASSAGES[0])
    assert b.contains(PASSAGES[:2]) == [True, True]
    b.store.close()


def test_corrupted_scores_are_refused(tmp_path, smol_tokenizer):
    """A flipped byte in the stored score section fails its crc32: decoding refuses the entry,
    and the engine drops it (with a warning) and recomputes the chunk, scores equal to the first."""
    eng = ChunkCache(model=tiny_model("llama"), tokenizer=smol_tokenizer, store=str(tmp_path / "s"),
                     token_scores=True)  # fmt: skip
    [key] = eng.precompute(PASSAGES[:1])
    raw = bytearray(eng.store.get(key))
    good = unpack_chunk(bytes(raw)).token_scores
    start, end = _scores_section(bytes(raw))
    assert torch.equal(torch.frombuffer(bytearray(raw[start:end]), dtype=torch.float32), good)
    raw[start + 1] ^= 0x40
    with pytest.raises(CorruptEntryError):
        unpack_chunk(bytes(raw))
    eng.store.put(key, bytes(raw))
    with pytest.warns(RuntimeWarning, match="damaged"):
        again = eng.chunk(PASSAGES[0])
    assert torch.equal(again.token_scores, good)
    assert torch.equal(unpack_chunk(eng.store.get(key)).token_scores, good)
    eng.store.close()


def test_token_scores_setting_is_checked():
    with pytest.raises(TypeError):
        PrecomputeConfig(token_scores=1)
    cfg = PrecomputeConfig(sink="context", exact_first=True, token_scores=True)
    assert all(v.token_scores for v in cfg.variants())  # the exact variant stores scores too


def _budgets_reference(weights, caps, k):
    """Largest remainder with caps, in exact fractions, written out separately."""
    out = {c: 0 for c in range(len(caps))}
    left = min(k, sum(caps))
    live = [c for c in range(len(caps)) if caps[c] > 0]
    while left and live:
        w = {c: Fraction(weights[c]) for c in live}
        if sum(w.values()) == 0:
            w = {c: Fraction(caps[c]) for c in live}
        quota = {c: left * w[c] / sum(w.values()) for c in live}
        capped = [c for c in live if quota[c] >= caps[c]]
        if capped:
            for c in capped:
                out[c], left = caps[c], left - caps[c]
            live = [c for c in live if c not in capped]
            continue
        for c in live:
            out[c] = quota[c].numerator // quota[c].denominator
        extra = left - sum(out[c] for c in live)
        for c in sorted(live, key=lambda c: (-(quota[c] - out[c]), c))[:extra]:
            out[c] += 1
        left = 0
    return [out[c] for c in range(len(caps))]


def test_impact_budgets_match_reference():
    g = torch.Generator().manual_seed(0)
    cases = [([1, 2, 3], [10, 10, 10], 6), ([100, 1, 1], [2, 10, 10], 6), ([0, 0, 5], [3, 3, 1], 5),
             ([1, 1, 1], [1, 1, 1], 5), ([0, 0], [4, 4], 3), ([2, 0, 1], [0, 5, 5], 7)]  # fmt: skip
    for _ in range(200):
        n = int(torch.randint(1, 7, (1,), generator=g))
        caps = torch.randint(0, 12, (n,), generator=g).tolist()
        weights = [0.0 if float(x) < 0.2 else round(float(x) * 8) / 4 for x in torch.rand(n, generator=g)]
        cases.append((weights, caps, int(torch.randint(0, sum(caps) + 3, (1,), generator=g))))
    for weights, caps, k in cases:
        got = impact_budgets(weights, caps, k)
        assert got == _budgets_reference(weights, caps, k), (weights, caps, k)
        assert sum(got) == min(k, sum(caps)) and all(b <= c for b, c in zip(got, caps, strict=True))
    with pytest.raises(ValueError):
        impact_budgets([1.0], [1, 2], 1)
    with pytest.raises(ValueError):
        impact_budgets([float("nan")], [1], 1)


def _context(lengths, seed, exact_first=False):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([10 + sum(lengths[:i]) for i in range(len(lengths))])
    positions = torch.cat([torch.arange(o, o + n) for o, n in zip(offsets.tolist(), lengths, strict=True)])
    chunk_of = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    c = positions.numel()
    return SelectContext(
        0, positions, chunk_of, offsets, None, None, None, None, torch.arange(100, 103), 1.0,
        probe_attn=torch.rand(3, c, generator=g), token_scores=torch.rand(c, generator=g),
        exact=(chunk_of == 0) if exact_first else None,
    )  # fmt: skip


@pytest.mark.parametrize("exact_first", [False, True])
def test_qimpact_selects_k_within_its_budgets(exact_first):
    """qimpact keeps exactly k tokens: in each chunk its budget (``impact_budgets`` of the stale
    tokens' score sums) of the chunk's best stale tokens by the probe's summed mass; exact tokens
    only once every stale one is in, the best of them by the probe."""
    lengths = [6, 3, 9, 5]
    ctx = _context(lengths, 1, exact_first)
    attn = ctx.probe_attn.sum(0)
    stale = ~ctx.exact if exact_first else torch.ones(sum(lengths), dtype=torch.bool)
    for k in range(sum(lengths) + 1):
        got = QImpact().select(ctx, k)
        assert got.numel() == k and len(set(got.tolist())) == k
        weights = [float(ctx.token_scores[(ctx.chunk_of == c) & stale].sum()) for c in range(len(lengths))]
        caps = [int(((ctx.chunk_of == c) & stale).sum()) for c in range(len(lengths))]
        want = set()
        for c, b in enumerate(_budgets_reference(weights, caps, k)):
            idx = torch.nonzero((ctx.chunk_of == c) & stale).flatten()
            want |= set(ctx.positions[idx[torch.topk(attn[idx], b).indices]].tolist())
        if k > sum(caps):
            idx = torch.nonzero(~stale).flatten()
            want |= set(ctx.positions[idx[torch.topk(attn[idx], k - sum(caps)).indices]].tolist())
        assert set(got.tolist()) == want, k


def test_qimpact_without_scores_is_an_error():
    ctx = _context([4, 4], 0)
    ctx.token_scores = None
    with pytest.raises(ValueError, match="token_scores=True"):
        QImpact().select(ctx, 3)


def test_qimpact_fuses_at_qfasts_compute(smol_tokenizer):
    """Through the engine: qimpact is registered, selects before layer 0 with the probe, spends
    exactly qfast's token-layers at the same ratio (the budgets come from stored scores, no
    compute at fusion), and an engine without scores refuses it with the fix in the message."""
    assert POLICIES["qimpact"].before_layers and POLICIES["qimpact"].probe
    model = tiny_model("llama")
    eng = ChunkCache(model=model, tokenizer=smol_tokenizer, store=None, token_scores=True)
    for r in (0.05, 0.15, 0.4):
        a = eng.fuse(PASSAGES, QUESTION, recompute_ratio=r, policy="qimpact")
        b = eng.fuse(PASSAGES, QUESTION, recompute_ratio=r, policy="qfast")
        for key in ("recomputed_tokens", "token_layers", "probe_token_layers", "compute_fraction"):
            assert a.stats[key] == b.stats[key], (r, key)
        assert a.stats["policy"] == "qimpact"
    plain = ChunkCache(model=model, tokenizer=smol_tokenizer, store=None)
    with pytest.raises(ValueError, match="token_scores=True"):
        plain.fuse(PASSAGES, QUESTION, recompute_ratio=0.15, policy="qimpact")
