"""fuse.refine: a second probe (after generated tokens, or as a second selection stage) that
recomputes more chunk tokens of a fused prompt."""

from __future__ import annotations

import pytest
import torch

from chunkcache.fuse import refine
from tests.conftest import PASSAGES, QUESTION


def test_refining_naive_reuse_to_every_token_is_a_full_prefill_of_the_grown_prompt(tiny_engine):
    """From plain reuse, refining with ratio 1 after three generated tokens recomputes every
    chunk token, the question and the new tokens: a full prefill of the prompt and those tokens,
    and decoding continues from it as from that prefill."""
    eng = tiny_engine
    naive = eng.fuse(PASSAGES, QUESTION, recompute_ratio=0.0)
    new = [int(t) for t in eng.tokenizer.encode(" The tower")][:3]
    grown = refine(eng.lm, naive, new, ratio=1.0)
    ids = torch.cat([eng.prompt_ids(PASSAGES, QUESTION), torch.tensor([new])], 1)
    assert torch.equal(grown.input_ids, ids)
    with torch.no_grad():
        out = eng.model(input_ids=ids)
    torch.testing.assert_close(grown.logits, out.logits[0, -1].float(), rtol=1e-4, atol=1e-4)
    want = eng.model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1] :]
    assert (
        eng.generate_from(grown, max_new_tokens=5)
        == eng.tokenizer.decode(want, skip_special_tokens=True).strip()
    )


def test_refine_adds_tokens_not_yet_recomputed_and_counts_both_passes(tiny_engine):
    eng = tiny_engine
    first = eng.fuse(PASSAGES, QUESTION, recompute_ratio=0.25, policy="qfast")
    c = first.stats["chunk_tokens"]
    second = refine(eng.lm, first, [], ratio=0.25)
    assert second.selected.numel() == len(set(second.selected.tolist())) == 2 * round(0.25 * c)
    assert set(first.selected.tolist()) <= set(second.selected.tolist())
    assert second.stats["token_layers"] > first.stats["token_layers"]
    full = eng.lm.spec.num_layers * (c + first.stats["question_tokens"])
    assert second.stats["compute_fraction"] == pytest.approx(second.stats["token_layers"] / full)
    # the tokens it adds are the ones the second probe attends to most among those left
    assert not torch.equal(second.kv, first.kv)
    with pytest.raises(ValueError, match="probe policy"):
        refine(eng.lm, first, [], ratio=0.1, policy="cacheblend")
    # value-aware refinement gets the V norms through the exclusion wrapper, and skips exact chunks
    third = refine(eng.lm, first, [], ratio=0.25, policy="qvalue")
    added = sorted(set(third.selected.tolist()) - set(first.selected.tolist()))
    assert len(added) == round(0.25 * c)
    assert min(added) >= first.stats["prefix_tokens"] + eng.chunks(PASSAGES)[0].num_tokens
