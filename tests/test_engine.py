"""Engine behaviour: precompute is idempotent, misses are precomputed at fuse time, LMDB caches
survive a restart and are reused, damaged or foreign entries are never used silently."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import PASSAGES, QUESTION, tiny_model

from chunkcache.engine import ChunkCache
from chunkcache.format import read_header


def test_precompute_is_idempotent_and_fuse_precomputes_misses(smol_tokenizer):
    eng = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=None)
    keys = eng.precompute(PASSAGES[:2])
    assert len(set(keys)) == 2 and len(eng.store) == 2
    assert eng.precompute(PASSAGES[:2]) == keys and len(eng.store) == 2
    eng.fuse(PASSAGES, QUESTION, recompute_ratio=0.2)  # two misses precomputed on the way
    assert len(eng.store) == 4
    assert eng.key(PASSAGES[0]) == keys[0]


def test_lmdb_store_survives_restart(tmp_path, smol_tokenizer):
    model = tiny_model()
    a = ChunkCache(model=model, tokenizer=smol_tokenizer, store=str(tmp_path / "s"))
    first = a.fuse(PASSAGES, QUESTION, recompute_ratio=0.15)
    a.store.close()
    b = ChunkCache(model=model, tokenizer=smol_tokenizer, store=str(tmp_path / "s"))
    misses_before = b.store.stats().misses
    again = b.fuse(PASSAGES, QUESTION, recompute_ratio=0.15)
    assert b.store.stats().misses == misses_before  # every chunk came from disk
    torch.testing.assert_close(again.logits, first.logits, rtol=0, atol=0)
    b.store.close()


def test_other_model_never_gets_these_caches(tmp_path, smol_tokenizer):
    a = ChunkCache(model=tiny_model(seed=0), tokenizer=smol_tokenizer, store=str(tmp_path / "s"))
    a.precompute(PASSAGES)
    a.store.close()
    b = ChunkCache(model=tiny_model(seed=1), tokenizer=smol_tokenizer, store=str(tmp_path / "s"))
    assert b.key(PASSAGES[0]) != a.key(PASSAGES[0])
    assert not b.store.contains(b.key(PASSAGES[0]))
    b.store.close()


def test_each_sink_has_its_own_caches(tmp_path, smol_tokenizer):
    """Chunks encoded behind another sink (``prefix``, ``context``) have other bytes and other
    keys, so an engine never hits the other's entries; an unknown sink fails before the model
    loads, naming the choices."""
    model = tiny_model()
    a = ChunkCache(model=model, tokenizer=smol_tokenizer, store=str(tmp_path / "s"))
    a.precompute(PASSAGES[:1])
    a.store.close()
    b = ChunkCache(model=model, tokenizer=smol_tokenizer, store=str(tmp_path / "s"), sink="context")
    assert b.key(PASSAGES[0]) != a.key(PASSAGES[0]) and not b.store.contains(b.key(PASSAGES[0]))
    with pytest.warns(RuntimeWarning, match="made with other settings"):  # the store says so too
        chunk = b.chunk(PASSAGES[0])
    assert chunk.base_pos == len(b.template.sink_ids("context")) > len(b.template.prefix_ids())
    b.store.close()
    # a context of the user's passages is another sink again
    c = ChunkCache(
        model=model, tokenizer=smol_tokenizer, store=None, sink="context", sink_context=["T\nSome text."]
    )
    t = c.template
    assert c.chunk(PASSAGES[0]).base_pos == len(t.prefix_ids()) + len(t.chunk_ids("T\nSome text."))
    assert c.key(PASSAGES[0]) not in (a.key(PASSAGES[0]), b.key(PASSAGES[0]))
    with pytest.raises(ValueError, match="'bos', 'prefix', 'context'"):
        ChunkCache(model="no-such-model", sink="passages")
    with pytest.raises(ValueError, match="only for sink='context'"):
        ChunkCache(model="no-such-model", sink_context=["T\nSome text."])
    with pytest.raises(ValueError, match="non-empty list"):
        ChunkCache(model="no-such-model", sink="context", sink_context="T\nSome text.")


def test_entry_under_a_forged_key_is_replaced_not_used(smol_tokenizer):
    """Even if an entry sits under the key this engine computes (a copied store, a bug), it is
    checked against the engine's key inputs and token ids before use; a foreign one is dropped
    with a warning and replaced under the engine's own key, so it never blocks the chunk."""
    a = ChunkCache(model=tiny_model(seed=0), tokenizer=smol_tokenizer, store=None)
    b = ChunkCache(model=tiny_model(seed=1), tokenizer=smol_tokenizer, store=None)
    want = b.fuse([PASSAGES[0]], QUESTION).logits
    a.precompute([PASSAGES[0]])
    b.store.put(b.key(PASSAGES[0]), a.store.get(a.key(PASSAGES[0])))
    with pytest.warns(RuntimeWarning, match="other model_fingerprint than this engine"):
        got = b.fuse([PASSAGES[0]], QUESTION).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert read_header(b.store.get(b.key(PASSAGES[0])))["key"] == b.key_info()  # replaced
    a.store.put(a.key(PASSAGES[1]), a.store.get(a.key(PASSAGES[0])))  # right model, wrong tokens
    with pytest.warns(RuntimeWarning, match="do not hash to the key"):
        a.fuse([PASSAGES[1]], QUESTION)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a.fuse([PASSAGES[1]], QUESTION)  # replaced: a hit now, no warning


def test_corrupted_entry_is_recomputed_not_used(smol_tokenizer):
    eng = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=None)
    # One chunk per encoding, as the recompute below encodes it: a chunk encoded in a padded
    # batch differs from its lone encoding by float rounding (the softmax sums over the padding).
    eng.precompute(PASSAGES, batch_size=1)
    good = eng.fuse(PASSAGES, QUESTION, recompute_ratio=0.0).logits
    key = eng.key(PASSAGES[2])
    raw = bytearray(eng.store.get(key))
    raw[len(raw) // 2] ^= 0xFF  # flip a byte inside the KV payload
    eng.store.put(key, bytes(raw))
    with pytest.warns(RuntimeWarning, match="damaged"):
        again = eng.fuse(PASSAGES, QUESTION, recompute_ratio=0.0).logits
    torch.testing.assert_close(again, good, rtol=0, atol=0)


def test_empty_inputs_give_clear_errors(tiny_engine):
    with pytest.raises(ValueError, match="no chunks"):
        tiny_engine.fuse([], QUESTION)
    with pytest.raises(ValueError, match="recompute_ratio"):
        tiny_engine.fuse(PASSAGES, QUESTION, recompute_ratio=1.5)
    with pytest.raises(ValueError, match="unknown policy"):
        tiny_engine.fuse(PASSAGES, QUESTION, policy="nope")
    with pytest.raises(ValueError, match="non-empty"):
        tiny_engine.precompute(["  \n"])
    with pytest.raises(ValueError, match="non-empty"):
        tiny_engine.fuse([PASSAGES[0], ""], QUESTION)


def test_contains_and_load_time(tiny_engine):
    tiny_engine.precompute(PASSAGES[:1])
    assert tiny_engine.contains([PASSAGES[0], "never stored"]) == [True, False]
    fused = tiny_engine.fuse(PASSAGES[:1], QUESTION, recompute_ratio=0.0)
    secs = fused.stats["seconds"]
    assert secs["load"] >= 0 and secs["total"] >= secs["load"] + secs["recompute"]


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_lossy_codecs_fuse_close_to_lossless(smol_tokenizer, codec):
    model = tiny_model()
    raw = ChunkCache(model=model, tokenizer=smol_tokenizer, store=None).fuse(
        PASSAGES, QUESTION, recompute_ratio=0.0
    )
    lossy = ChunkCache(model=model, tokenizer=smol_tokenizer, store=None, codec=codec).fuse(
        PASSAGES, QUESTION, recompute_ratio=0.0
    )
    p, q = raw.logits.log_softmax(-1), lossy.logits.log_softmax(-1)
    assert float((p.exp() * (p - q)).sum()) < (0.01 if codec == "int8" else 0.05)


@pytest.mark.parametrize("codec", ["raw", "int4"])
def test_fast_path_equals_eager_path(smol_tokenizer, codec, tmp_path):
    """``fast_path`` (the CUDA default: stored entries streamed through ``pipeline.fuse_entries``)
    gives what the eager path gives; on CPU exactly."""
    model = tiny_model()
    store = str(tmp_path / "s")
    eager = ChunkCache(model=model, tokenizer=smol_tokenizer, store=store, codec=codec, fast_path=False)
    ref = eager.fuse(PASSAGES, QUESTION, recompute_ratio=0.3)
    eager.store.close()
    fast = ChunkCache(model=model, tokenizer=smol_tokenizer, store=store, codec=codec, fast_path=True)
    got = fast.fuse(PASSAGES, QUESTION, recompute_ratio=0.3)
    assert got.stats.get("fast_path") is True and "stage_host" in got.stats["seconds"]
    assert torch.equal(got.selected, ref.selected)
    assert torch.equal(got.logits, ref.logits)
    assert fast.generate_from(got, max_new_tokens=4) == eager.generate_from(ref, max_new_tokens=4)
    fast.store.close()


def test_fast_path_refuses_foreign_and_recomputes_damaged(smol_tokenizer):
    a = ChunkCache(model=tiny_model(seed=0), tokenizer=smol_tokenizer, store=None, fast_path=True)
    b = ChunkCache(model=tiny_model(seed=1), tokenizer=smol_tokenizer, store=a.store, fast_path=True)
    a.precompute([PASSAGES[0]])
    b.store.put(b.key(PASSAGES[0]), a.store.get(a.key(PASSAGES[0])))
    with pytest.warns(RuntimeWarning, match="other model_fingerprint"):
        b.fuse([PASSAGES[0]], QUESTION)  # dropped, replaced under b's key
    assert read_header(b.store.get(b.key(PASSAGES[0])))["key"] == b.key_info()
    assert b.fuse([PASSAGES[0]], QUESTION).stats.get("fast_path") is True
    good = a.fuse(PASSAGES, QUESTION, recompute_ratio=0.2)
    key = a.key(PASSAGES[2])
    raw = bytearray(a.store.get(key))
    raw[len(raw) // 2] ^= 0xFF  # inside the KV payload: caught by a layer checksum while staging
    a.store.put(key, bytes(raw))
    with pytest.warns(RuntimeWarning, match="damaged"):
        again = a.fuse(PASSAGES, QUESTION, recompute_ratio=0.2)
    torch.testing.assert_close(again.logits, good.logits, rtol=0, atol=0)
    assert a.store.get(key) != bytes(raw)  # the damaged entry was replaced by a recomputed one
    assert a.fuse(PASSAGES, QUESTION, recompute_ratio=0.2).stats.get("fast_path") is True


@pytest.mark.parametrize("fast_path", [False, True])
def test_exact_first_fuses_the_first_chunk_from_its_prefix_sink_entry(smol_tokenizer, fast_path):
    """With ``exact_first`` every chunk is stored twice: behind the context sink (the engine's
    key) and behind the prefix alone (a prefix-sink engine's key, so that engine hits them). A
    prompt's first chunk comes from the latter: its reused K/V are a full prefill's and it counts
    as exact; the later chunks are the context sink's, bit for bit as a context engine fuses them."""
    model = tiny_model()
    eng = ChunkCache(model=model, tokenizer=smol_tokenizer, store=None, sink="context", exact_first=True,
                     fast_path=fast_path)  # fmt: skip
    eng.precompute(PASSAGES)
    assert len(eng.store) == 2 * len(PASSAGES) and all(eng.contains(PASSAGES))
    plain = ChunkCache(model=model, tokenizer=smol_tokenizer, store=eng.store)  # the prefix sink
    ctx = ChunkCache(
        model=model, tokenizer=smol_tokenizer, store=eng.store, sink="context", fast_path=fast_path
    )
    assert all(plain.contains(PASSAGES)) and all(ctx.contains(PASSAGES))
    assert ctx.key(PASSAGES[0]) == eng.key(PASSAGES[0]) != plain.key(PASSAGES[0])
    fused = eng.fuse(PASSAGES, QUESTION, recompute_ratio=0.0)
    alone = ctx.fuse(PASSAGES, QUESTION, recompute_ratio=0.0)
    assert len(eng.store) == 2 * len(PASSAGES)  # nothing precomputed again
    assert fused.stats["exact_chunks"] == [True] + [False] * (len(PASSAGES) - 1)
    assert alone.stats["exact_chunks"] == [False] * len(PASSAGES)
    p, n0 = fused.stats["prefix_tokens"], fused.stats["chunk_lengths"][0]
    ids = eng.prompt_ids(PASSAGES, QUESTION)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=True).past_key_values
    first = slice(p, p + n0)
    for li, layer in enumerate(full.layers):
        torch.testing.assert_close(fused.kv[li, 0, :, first], layer.keys[0, :, first], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused.kv[li, 1, :, first], layer.values[0, :, first], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(alone.kv[:, :, :, first], fused.kv[:, :, :, first], atol=1e-3)
    rest = slice(p + n0, ids.shape[1] - len(eng.template.suffix_ids(QUESTION)))
    torch.testing.assert_close(fused.kv[:, :, :, rest], alone.kv[:, :, :, rest], rtol=0, atol=0)
    assert fused.stats.get("fast_path", False) == fast_path


def test_exact_first_misses_make_both_variants_and_both_paths_agree(smol_tokenizer):
    """A miss at fuse time stores both variants; the fast path (store views), the eager path and
    the device cache fuse the same prompt to the same logits."""
    model = tiny_model()
    kw = dict(model=model, tokenizer=smol_tokenizer, sink="context", exact_first=True)
    eager = ChunkCache(store=None, **kw)
    want = eager.fuse(PASSAGES, QUESTION, recompute_ratio=0.3)
    assert len(eager.store) == 2 * len(PASSAGES)
    fast = ChunkCache(store=None, fast_path=True, device_cache_bytes=1 << 26, **kw)
    got = fast.fuse(PASSAGES, QUESTION, recompute_ratio=0.3)
    fast.flush()  # (its misses were written behind, through the device cache)
    assert len(fast.store) == 2 * len(PASSAGES) and got.stats["fast_path"]
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    again = fast.fuse(PASSAGES, QUESTION, recompute_ratio=0.3)
    assert again.stats["device_cache"]["hits"] == len(PASSAGES)
    torch.testing.assert_close(again.logits, got.logits, rtol=0, atol=0)
    # another order: the new first chunk comes from its prefix variant and the old first from its
    # context variant, neither fused before, but resident: every variant of a miss was admitted
    # when it was encoded (written behind)
    swapped = [PASSAGES[2], *PASSAGES[:2], *PASSAGES[3:]]
    res = fast.fuse(swapped, QUESTION, recompute_ratio=0.3)
    assert res.stats["exact_chunks"][0] and res.stats["device_cache"]["hits"] == len(PASSAGES)
    for key in fast._prompt_keys(*fast.resolve(swapped))[0][:2]:  # the two entries fused first now
        fast.device_cache.drop(key)  # from the store this time: the same logits
    res = fast.fuse(swapped, QUESTION, recompute_ratio=0.3)
    assert res.stats["exact_chunks"][0] and res.stats["device_cache"]["hits"] == len(PASSAGES) - 2
    torch.testing.assert_close(res.logits, eager.fuse(swapped, QUESTION, recompute_ratio=0.3).logits,
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("fast_path", [False, True])
def test_exact_first_never_uses_the_other_variant_under_the_first_chunks_key(smol_tokenizer, fast_path):
    """The two variants are checked against their own key inputs: the context variant's bytes
    placed under the first chunk's prefix-variant key are dropped with a warning and replaced,
    never fused."""
    model = tiny_model()
    eng = ChunkCache(model=model, tokenizer=smol_tokenizer, store=None, sink="context", exact_first=True,
                     fast_path=fast_path)  # fmt: skip
    want = eng.fuse(PASSAGES, QUESTION, recompute_ratio=0.0).logits
    front = ChunkCache(model=model, tokenizer=smol_tokenizer, store=eng.store).key(PASSAGES[0])
    eng.store.put(front, eng.store.get(eng.key(PASSAGES[0])))
    with pytest.warns(RuntimeWarning, match="other settings than this engine"):
        got = eng.fuse(PASSAGES, QUESTION, recompute_ratio=0.0).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert read_header(eng.store.get(front))["key"]["settings"]["sink"] == "prefix"  # replaced


def test_exact_first_engines_default_to_qvalue_unless_a_policy_is_given(smol_tokenizer):
    """With ``sink="context"`` and ``exact_first`` and no ``policy=``, the engine fuses with qvalue
    (it spends nothing on the exact first chunk; session 10 NOTES section 5); every other engine,
    and one given a policy, keeps its own (qfast by default). A call's ``policy=`` still wins."""
    model = tiny_model()
    kw = dict(model=model, tokenizer=smol_tokenizer, store=None)
    eng = ChunkCache(sink="context", exact_first=True, **kw)
    assert eng.default_fuse.policy == "qvalue"
    res = eng.fuse(PASSAGES, QUESTION, recompute_ratio=0.3)
    assert res.stats["policy"] == "qvalue"
    want = eng.fuse(PASSAGES, QUESTION, recompute_ratio=0.3, policy="qvalue")
    assert torch.equal(res.selected, want.selected) and torch.equal(res.logits, want.logits)
    assert eng.fuse(PASSAGES, QUESTION, recompute_ratio=0.3, policy="qfast").stats["policy"] == "qfast"
    assert ChunkCache(sink="context", exact_first=True, policy="qfast", **kw).default_fuse.policy == "qfast"
    assert ChunkCache(sink="context", **kw).default_fuse.policy == "qfast"
    assert ChunkCache(**kw).default_fuse.policy == "qfast"


def test_exact_first_is_refused_where_it_means_nothing_before_the_model_loads():
    from chunkcache.adaptive import AdaptiveConfig

    with pytest.raises(ValueError, match="only for sink='context'"):
        ChunkCache(model="no-such-model", exact_first=True)
    with pytest.raises(ValueError, match="adaptive"):
        ChunkCache(model="no-such-model", sink="context", exact_first=True, adaptive=AdaptiveConfig())
    with pytest.raises(TypeError, match="bool"):
        ChunkCache(model="no-such-model", sink="context", exact_first="yes")


def _next_passage(text):
    """A per-chunk context: the passage after it in PASSAGES (deterministic)."""
    return [PASSAGES[(PASSAGES.index(text) + 1) % len(PASSAGES)]]


@pytest.mark.parametrize("fast_path", [False, True])
def test_per_chunk_context_encodes_each_chunk_behind_its_own_passages(smol_tokenizer, fast_path):
    """With a function as ``sink_context`` every chunk is encoded behind the prefix and the
    passages it gives for that chunk: its entry is the one a fixed-context engine with those
    passages makes (same key, same bytes), so fusion equals fusing those entries; under
    ``exact_first`` the first chunk is the prefix sink's, exact."""
    model = tiny_model()
    kw = dict(model=model, tokenizer=smol_tokenizer, sink="context")
    eng = ChunkCache(store=None, sink_context=_next_passage, exact_first=True, fast_path=fast_path, **kw)
    fused = eng.fuse(PASSAGES, QUESTION, recompute_ratio=0.2)
    assert len(eng.store) == 2 * len(PASSAGES)
    t = eng.template
    for text in PASSAGES:
        fixed = ChunkCache(store=eng.store, sink_context=_next_passage(text), **kw)
        assert fixed.key(text) == eng.key(text) and fixed.contains([text]) == [True]
        chunk = eng.chunk(text)
        assert chunk.base_pos == len(t.prefix_ids()) + len(t.chunk_ids(_next_passage(text)[0]))
    assert fused.stats["exact_chunks"] == [True] + [False] * (len(PASSAGES) - 1)
    # the same entries through the eager path of a fresh engine (its own memo of the contexts)
    again = ChunkCache(store=eng.store, sink_context=_next_passage, exact_first=True, **kw)
    got = again.fuse(PASSAGES, QUESTION, recompute_ratio=0.2)
    assert len(eng.store) == 2 * len(PASSAGES)  # all hits
    torch.testing.assert_close(got.logits, fused.logits, rtol=1e-5, atol=1e-5)
    # the first chunk's K/V are a full prefill's
    p, n0 = fused.stats["prefix_tokens"], fused.stats["chunk_lengths"][0]
    with torch.no_grad():
        full = model(input_ids=eng.prompt_ids(PASSAGES, QUESTION), use_cache=True).past_key_values
    torch.testing.assert_close(fused.kv[-1, 0, :, p : p + n0], full.layers[-1].keys[0, :, p : p + n0],
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_per_chunk_context_keys_follow_the_function_not_the_text_index(tmp_path, smol_tokenizer):
    """The text index persisted beside an LMDB store is shared by engines of the same model; an
    engine with another context function never takes the other's keys from it."""
    model = tiny_model()
    kw = dict(model=model, tokenizer=smol_tokenizer, store=str(tmp_path / "s"), sink="context")
    a = ChunkCache(sink_context=_next_passage, **kw)
    a.precompute(PASSAGES)
    a.store.close()
    b = ChunkCache(sink_context=lambda text: [PASSAGES[0] if text != PASSAGES[0] else PASSAGES[1]], **kw)
    mem = {**kw, "store": None}
    fixed = ChunkCache(**{**mem, "sink_context": [PASSAGES[0]]})
    assert (
        b.key(PASSAGES[2])
        == fixed.key(PASSAGES[2])
        != ChunkCache(sink_context=_next_passage, **mem).key(PASSAGES[2])
    )
    b.fuse(PASSAGES[1:], QUESTION)  # its own entries, made on the way, but for the last chunk:
    assert len(b.store) == len(PASSAGES) + 2  # behind PASSAGES[0] for both functions, one entry
    b.store.close()


def test_per_chunk_context_refuses_ids_without_text_and_bad_contexts(smol_tokenizer):
    from chunkcache.adaptive import AdaptiveConfig

    eng = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=None, sink="context",
                     sink_context=lambda text: "one string")  # fmt: skip
    with pytest.raises(ValueError, match="list of non-empty passage strings"):
        eng.precompute(PASSAGES[:1])
    ok = ChunkCache(
        model=eng.model, tokenizer=smol_tokenizer, store=None, sink="context", sink_context=_next_passage
    )
    with pytest.raises(ValueError, match="pass chunk texts"):
        ok.precompute_ids([[5, 6, 7]])
    with pytest.raises(ValueError, match="adaptive"):
        ChunkCache(
            model="no-such-model", sink="context", sink_context=_next_passage, adaptive=AdaptiveConfig()
        )
    with pytest.raises(ValueError, match="only for sink='context'"):
        ChunkCache(model="no-such-model", sink_context=_next_passage)


@pytest.mark.parametrize("device_cache", [0, 1 << 26])
def test_a_fusion_with_misses_queues_for_a_staging_once(smol_tokenizer, tmp_path, device_cache):
    # misses are precomputed before the fusion takes a staging: under load, taking one twice (to
    # find the miss, then to fuse) put the request at the back of the queue a second time
    eng = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=str(tmp_path / "s"), codec="int8",
                     fast_path=True, device_cache_bytes=device_cache)  # fmt: skip
    eng.precompute(PASSAGES[:2])
    takes = []
    pool = eng.stagings()
    take = pool.take
    pool.take = lambda: takes.append(1) or take()
    ref = ChunkCache(model=eng.model, tokenizer=smol_tokenizer, store=str(tmp_path / "r"), codec="int8",
                     fast_path=True)  # fmt: skip
    for chunks in (PASSAGES[:2], PASSAGES, PASSAGES[::-1]):  # hits; two misses; all stored
        takes.clear()
        got = eng.fuse(chunks, QUESTION)
        assert got.stats["fast_path"] and len(takes) == 1
        want = ref.fuse(chunks, QUESTION)
        assert torch.equal(got.logits, want.logits) and torch.equal(got.kv, want.kv)
    assert eng.contains(PASSAGES) == [True] * len(PASSAGES)
